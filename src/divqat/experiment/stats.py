"""The statistics of the report: mean ± standard deviation over seeds, and the 95 % confidence
interval of a difference paired by seed.

A "divqat − qat" difference is taken seed by seed (the same seed's teacher, holdout and thief),
d_i = divqat_i − qat_i, and its interval is the t interval of their mean:

    mean(d) ± t_{0.975, n−1} · sd(d) / sqrt(n)

(Student's t with n − 1 degrees of freedom; sd the sample standard deviation). With one seed
there is no interval. An interval that contains 0 means the difference is within the noise of
retraining with another seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scipy import stats as _scipy_stats

LEVEL = 0.95


def finite(values: Iterable[Any]) -> list[float]:
    """The values that are finite numbers (bools, None, NaN and text dropped), as floats."""
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)]


def mean_sd(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count of the finite values."""
    xs = finite(values)
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences with its confidence interval (``low``/``high`` None for n < 2)."""

    mean: float
    n: int
    sd: float | None = None
    low: float | None = None
    high: float | None = None
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    @property
    def within_noise(self) -> bool:
        """The interval contains 0 (False without an interval: nothing to say)."""
        return self.has_interval and self.low <= 0 <= self.high


def paired_difference(differences: Iterable[Any], level: float = LEVEL) -> PairedDifference | None:
    """The t interval of the mean of per-seed differences; None when there are none."""
    d = finite(differences)
    if not d:
        return None
    n = len(d)
    mean = statistics.fmean(d)
    if n < 2:
        return PairedDifference(mean, n, level=level)
    sd = statistics.stdev(d)
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, n, sd, mean - half, mean + half, level)


__all__ = ["LEVEL", "PairedDifference", "finite", "mean_sd", "paired_difference"]
