"""Large finite groups: orders without listing the elements, uniform sampling, and a symmetry gap within its cap.

``S_9`` has 362880 elements, more than :meth:`Group.elements` lists; its order comes
from Schreier-Sims (sympy) and its elements from direct uniform sampling. The
symmetry gap of a group with more elements than ``max_points`` uses ``n_elements``
such samples, so its optimal assignment never exceeds ``max_points`` atoms a side.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import rng, seeds

import recm_opt as recm
import recm_opt.diagnostics as diagnostics
from recm_opt.groups import Group


@pytest.mark.parametrize("n", range(1, 13))
def test_permutation_order_is_n_factorial_without_listing_elements(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """S_n has n! elements, and order() does not enumerate them (the closure would stop at 100000)."""

    def refuse(self: Group, max_order: int = 0) -> torch.Tensor:
        raise AssertionError("order() listed the elements")

    monkeypatch.setattr(Group, "elements", refuse)
    assert recm.PermutationGenerators(n).order() == math.factorial(n)


@pytest.mark.parametrize(
    "group",
    [recm.CyclicGenerators(7), recm.DihedralGenerators(5), recm.PermutationGenerators(4),
     recm.ProductGenerators(recm.CyclicGenerators(3), recm.PermutationGenerators(3))],
    ids=repr,
)
def test_closed_form_order_equals_the_closure(group: Group) -> None:
    """The closed forms (n, 2n, sympy, product) count exactly the closure of C_G."""
    assert group.order() == len(Group.elements(group))


def test_listing_a_too_large_group_says_to_sample() -> None:
    with pytest.raises(ValueError, match=r"S_7: closure exceeds max_order=1000.*sample\(n, generator\)"):
        recm.PermutationGenerators(7).elements(max_order=1000)


# Pearson chi-square with k - 1 degrees of freedom: the 0.999 quantile, so a fair sampler fails 1 time in 1000.
def _chi2_999(dof: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(0.999, dof))


@settings(max_examples=5)
@given(group=st.sampled_from([recm.CyclicGenerators(5), recm.DihedralGenerators(4), recm.PermutationGenerators(4)]),
       seed=seeds())
def test_direct_samplers_are_uniform_on_the_closure(group: Group, seed: int) -> None:
    """Each sample is an element of the closure, and the counts pass a chi-square test of uniformity."""
    elements = Group.elements(group)
    draws = group.sample(60 * len(elements), rng(seed))
    dist = (draws[:, None] - elements[None]).abs().flatten(2).amax(-1)
    assert float(dist.amin(1).max()) < 1e-12  # every draw is a group element
    counts = torch.bincount(dist.argmin(1), minlength=len(elements)).double()
    expected = len(draws) / len(elements)
    assert float(((counts - expected) ** 2 / expected).sum()) < _chi2_999(len(elements) - 1)


def test_large_permutation_samples_are_permutation_matrices() -> None:
    P = recm.PermutationGenerators(12).sample(50, rng(0))
    assert P.shape == (50, 12, 12)
    assert torch.equal(P.sum(1), torch.ones(50, 12, dtype=P.dtype)) and torch.equal(P.sum(2), P.sum(1))


def _spy_assignment(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    real = diagnostics._w1

    def spy(x: torch.Tensor, y: torch.Tensor) -> float:
        sizes.append((len(x), len(y)))
        return real(x, y)

    monkeypatch.setattr(diagnostics, "_w1", spy)
    return sizes


@pytest.mark.parametrize("n", [7, 9])
@pytest.mark.parametrize("max_points", [64, 512])
def test_symmetry_gap_of_a_large_group_respects_max_points(n: int, max_points: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """S_7 (5040 elements) and S_9: the symmetrised measure has at most max_points atoms, and the gap is > 0."""
    sizes = _spy_assignment(monkeypatch)
    z = torch.randn(40, n, 2, generator=rng(1), dtype=torch.float64)
    gap = recm.symmetry_gap(z, recm.PermutationGenerators(n), recm.Permutation("b n f", axis="n"),
                            max_points=max_points)
    (rows,) = sizes
    assert rows[1] <= max_points and rows[0] >= 1
    assert gap > 0.1


def test_symmetry_gap_of_invariant_data_is_zero_under_sampled_elements() -> None:
    """Rows constant along the permuted axis are fixed by every element: the sampled gap is exactly 0."""
    z = torch.randn(30, 1, 3, generator=rng(2), dtype=torch.float64).expand(30, 8, 3)
    assert recm.symmetry_gap(z, recm.PermutationGenerators(8), recm.Permutation("b n f", axis="n")) < 1e-12


def test_stacked_sample_with_more_copies_than_the_cap_is_subsampled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stacked (1 + k, S, d) sample with k > max_points keeps max_points copies and one unit."""
    sizes = _spy_assignment(monkeypatch)
    stacked = torch.randn(1 + 300, 5, 2, generator=rng(3), dtype=torch.float64)
    assert recm.symmetry_gap(stacked, max_points=100) > 0
    assert sizes == [(1, 100)]


def test_small_finite_group_is_still_exact() -> None:
    """Order <= max_points: every element is used, so the value equals the W1 to the full orbit average."""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    gap = recm.symmetry_gap(x, recm.PermutationGenerators(3), recm.Permutation("b n", axis="n"))
    orbit = torch.tensor([[1.0, 2, 3], [2, 1, 3], [3, 2, 1], [1, 3, 2], [2, 3, 1], [3, 1, 2]], dtype=torch.float64)
    assert math.isclose(gap, float((orbit - x).norm(dim=1).mean()), rel_tol=1e-12)
