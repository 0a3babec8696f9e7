"""The benchmarks' one statistics helper: t-intervals and paired differences, on scipy.stats."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import paired, t_interval

pytest.importorskip("scipy")


def test_t_interval_matches_the_textbook_value() -> None:
    """[1, 2, 3]: mean 2, half-width t(0.975, 2) * s / sqrt(3) = 4.3027 * 1 / 1.7321 = 2.4841."""
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - 2.48414, abs=1e-5) and hi == pytest.approx(2.0 + 2.48414, abs=1e-5)


def test_one_value_has_no_interval_and_equal_values_a_point() -> None:
    """A single value gives NaN bounds; identical values give a zero-width interval, not NaN."""
    one = t_interval([0.3])
    assert one.mean == 0.3 and math.isnan(one.lo) and math.isnan(one.hi) and not one.within_noise
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_paired_is_the_interval_of_b_minus_a() -> None:
    """paired(a, b) is t_interval(b - a); it says whether 0 is inside; mismatched or short lists are rejected."""
    d = paired([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert d == t_interval([1.0, 2.0, 3.0]) and d.within_noise
    assert not paired([0.0, 0.0, 0.0], [3.0, 4.0, 5.0]).within_noise
    with pytest.raises(ValueError, match="equal-length"):
        paired([1.0], [2.0])
