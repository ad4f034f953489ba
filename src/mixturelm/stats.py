"""Intervals over seeds: how far a mean over a few training seeds can be trusted.

A compare trains every architecture at each of n seeds (initialisation and data order; the held-out tokens
are the same for all). Its final validation losses are n draws of a random variable, and with n this small the
mean's 95 % interval is Student's t interval, mean ± t_{0.975, n-1} · s / sqrt(n), s the sample standard
deviation (n - 1 in its denominator). A difference between two architectures is taken paired by seed,
d_i = loss_i - loss_ref_i: both runs of a seed saw the same data order, so the pairing removes what the order
does to both. A difference is resolved when its interval excludes 0. One seed gives no interval at all: its
difference is reported, never resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its two-sided t interval (low and high None for one value)."""

    n: int
    mean: float
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (never with one value: there is no interval)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "low": self.low, "high": self.high,
                "half_width": self.half_width, "confidence": self.confidence}


def t_quantile(confidence: float, dof: int) -> float:
    """t_{(1 + confidence) / 2, dof}: the two-sided critical value of Student's t."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, dof))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` with its Student-t interval: mean ± t_{(1+c)/2, n-1} · s / sqrt(n)."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(x) for x in xs):
        raise ValueError(f"mean_interval needs at least one finite value, got {values!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(1, mean, None, None, confidence)
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(confidence, n - 1) * s / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, confidence)


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """The mean of values_i - reference_i (the i-th of each from the same seed) with its t interval."""
    if len(values) != len(reference):
        raise ValueError(f"paired_difference needs one value per reference value, got {len(values)} and "
                         f"{len(reference)}")
    return mean_interval([v - r for v, r in zip(values, reference)], confidence)


def describe(d: Interval, digits: int = 4) -> str:
    """'-0.0191 [-0.0300, -0.0082], resolved', or for one seed '-0.0191 (1 seed: not resolved)'."""
    if d.low is None:
        return f"{d.mean:+.{digits}f} (1 seed: not resolved)"
    return (f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}], "
            f"{'resolved' if d.resolved else 'not resolved'}")
