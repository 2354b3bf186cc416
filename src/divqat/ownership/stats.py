"""One test for every ownership claim: agreement on k of n probes against a chance rate.

A suspect that was not taken from the victim agrees with a probe's recorded label at some chance
rate p0 (measured on the suspect itself: its agreement with matched probes that carry no mark, or
with an independent model's labels). Under that null hypothesis the agreements are Binomial(n, p0);
the claim's p-value is the one-sided upper tail P[X >= k] (DAWN, Szyller et al. 2021, sec. 4.3;
IPGuard's matching rate is read the same way). A verdict is stated at a significance level,
1e-6 by default (DAWN states ownership with confidence above 1 - 2^-64 at its sizes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.stats import binom

from divqat.errors import ConfigError

#: The default significance of a verdict: a claim is "verified" when p < this.
SIGNIFICANCE = 1e-6

# p0 is clipped away from 0 and 1: an agreement rate measured as exactly 0 on a few probes does
# not mean that agreement is impossible, and a p-value of exactly 0 would overstate the evidence.
_P0_FLOOR = 1e-3


def binomial_p_value(agreed: int, probes: int, chance: float) -> float:
    """P[X >= agreed] for X ~ Binomial(probes, chance): the one-sided p-value of ``agreed``
    agreements on ``probes`` probes when the suspect agrees by chance at rate ``chance``.

    ``chance`` is clipped to [1e-3, 1 - 1e-3]. Returns 1.0 when there are no probes."""
    if probes < 0 or agreed < 0 or agreed > probes:
        raise ConfigError(f"agreement {agreed} of {probes} probes is not a count")
    if not (0.0 <= chance <= 1.0) or math.isnan(chance):
        raise ConfigError(f"chance agreement must be a rate in [0, 1], got {chance!r}")
    if probes == 0 or agreed == 0:
        return 1.0
    p0 = min(max(chance, _P0_FLOOR), 1.0 - _P0_FLOOR)
    # sf(k - 1) = P[X > k - 1] = P[X >= k], computed in the tail without 1 - cdf cancellation.
    return float(binom.sf(agreed - 1, probes, p0))


@dataclass(frozen=True)
class Verdict:
    """One ownership test: ``agreed`` of ``probes`` against ``chance``; ``verified`` when
    ``p_value < significance``. ``evidence`` names what was tested (a key's marks, a fingerprint)."""

    evidence: str
    agreed: int
    probes: int
    chance: float
    p_value: float
    significance: float
    verified: bool

    @property
    def agreement(self) -> float:
        return self.agreed / self.probes if self.probes else 0.0

    def as_row(self) -> dict:
        return {**asdict(self), "agreement": self.agreement}


def verdict(evidence: str, agreed: int, probes: int, chance: float,
            significance: float = SIGNIFICANCE) -> Verdict:
    """Test ``agreed`` of ``probes`` against ``chance`` at ``significance`` (default 1e-6)."""
    if not (0.0 < significance < 1.0):
        raise ConfigError(f"significance must be in (0, 1), got {significance!r}")
    p = binomial_p_value(agreed, probes, chance)
    return Verdict(evidence, int(agreed), int(probes), float(chance), p, float(significance),
                   p < significance)
