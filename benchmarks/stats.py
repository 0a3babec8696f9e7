"""The benchmarks' statistics, in one place: a mean with its 95 % t-interval, and paired differences over seeds.

Both use ``scipy.stats`` (``t.interval`` with the standard error ``sem``), so every table of the
results pages computes its intervals the same way. A single value has no interval: its bounds are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Interval(NamedTuple):
    """A mean and the bounds of its confidence interval."""

    mean: float
    lo: float
    hi: float

    @property
    def within_noise(self) -> bool:
        """Whether the interval covers 0 (for a difference: no difference shown)."""
        return bool(self.lo <= 0.0 <= self.hi)


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``xs`` and its two-sided t-interval (``n - 1`` degrees of freedom); NaN bounds for one value."""
    from scipy import stats

    if len(xs) == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(stats.sem(xs))
    if sem == 0.0:  # identical values: scipy would return NaN bounds
        return Interval(mean, mean, mean)
    lo, hi = stats.t.interval(confidence, len(xs) - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi))


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """The paired difference ``b - a`` (same seeds, same order): its mean and t-interval.

    Raises:
        ValueError: unless ``a`` and ``b`` have the same length, at least 2.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired: need two equal-length lists of >= 2 values, got {len(a)} and {len(b)}")
    return t_interval([y - x for x, y in zip(a, b)], confidence)
