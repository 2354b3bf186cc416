"""The one statistic behind every ownership verdict."""

import math

import pytest
from scipy.stats import binom

from divqat.errors import ConfigError
from divqat.ownership import binomial_p_value, verdict


def test_p_value_is_the_upper_binomial_tail():
    # P[X >= 3] for Binomial(10, 0.1), summed by hand.
    expected = sum(math.comb(10, k) * 0.1**k * 0.9 ** (10 - k) for k in range(3, 11))
    assert binomial_p_value(3, 10, 0.1) == pytest.approx(expected, rel=1e-12)
    assert binomial_p_value(0, 10, 0.1) == 1.0
    assert binomial_p_value(0, 0, 0.5) == 1.0


def test_far_tail_keeps_its_precision():
    # 50 of 50 marks at chance 0.1: 1e-50, where 1 - cdf would round to 0.
    p = binomial_p_value(50, 50, 0.1)
    assert 0 < p == pytest.approx(binom.pmf(50, 50, 0.1), rel=1e-9)
    assert p < 2.0 ** -64


def test_chance_of_zero_does_not_give_certainty():
    assert binomial_p_value(1, 100, 0.0) > 0.0


def test_verdict_at_the_stated_significance():
    strong, weak = verdict("key alice", 40, 50, 0.1), verdict("key bob", 8, 50, 0.1)
    assert strong.verified and strong.p_value < 1e-6 and strong.agreement == 0.8
    assert not weak.verified and weak.p_value > 1e-6
    assert strong.as_row()["evidence"] == "key alice"


@pytest.mark.parametrize("args", [(5, 3, 0.1), (-1, 3, 0.1), (1, 3, 1.5), (1, 3, float("nan"))])
def test_bad_counts_are_refused(args):
    with pytest.raises(ConfigError):
        binomial_p_value(*args)
