"""The coupling estimate of the symmetry gap: 0 on symmetric data, growing with the asymmetry, above W1."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import recm_opt as recm

VEC = recm.Vector("b xyz")
CHANNELS = recm.Vector("b c xyz")


def _task(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) = (x, sum_c |x_c| x_c + eps * ((x_0 . e_1) e_1 + 0.5 e_2)): equivariant at eps = 0."""
    y = (x.norm(dim=-1, keepdim=True) * x).sum(1)
    e1, e2 = torch.eye(3, dtype=x.dtype)[:2]
    return x, y + eps * ((x[:, 0] @ e1)[:, None] * e1 + 0.5 * e2)


@given(seed=st.integers(0, 2**31 - 1))
def test_coupling_gap_is_exactly_zero_on_symmetric_data(seed: int) -> None:
    """An equivariant (z, y) of an isotropic input: every coupled pair coincides, to float64 rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 2, 3, generator=g, dtype=torch.float64)
    value = recm.coupling_gap(lambda v: _task(v, 0.0), x, recm.SO3Generators(), CHANNELS, (CHANNELS, VEC),
                              generator=torch.Generator().manual_seed(seed))
    assert value < 1e-12


def test_coupling_gap_grows_with_the_symmetry_breaking() -> None:
    """Same inputs and rotations, eps = 0 < 0.03 < 0.1 < 0.3 < 1 < 3: the estimate increases strictly."""
    x = torch.randn(256, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = [recm.coupling_gap(lambda v, e=e: _task(v, e), x, recm.SO3Generators(), CHANNELS, (CHANNELS, VEC),
                                generator=torch.Generator().manual_seed(1))
              for e in (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] < 1e-12
    assert all(a < b for a, b in zip(values, values[1:])), values


@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 2.0), n=st.integers(1, 6))
def test_coupling_gap_bounds_the_exact_w1_on_an_invariant_sample(seed: int, eps: float, n: int) -> None:
    """Inputs closed under C_4 (an invariant empirical law): the coupling value >= the exact W1(p, p_G)."""
    g = torch.Generator().manual_seed(seed)
    group, rep = recm.CyclicGenerators(4), recm.Vector("b xy", axis="xy", size=2)
    base = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = torch.cat([base @ r.T for r in group.elements()])  # the orbit of every point: an invariant sample
    shift = torch.randn(2, generator=g, dtype=torch.float64)

    def q(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v, v.norm(dim=1, keepdim=True) * v + eps * shift

    upper = recm.coupling_gap(q, x, group, rep, (rep, rep))
    exact = recm.symmetry_gap(q(x), group, (rep, rep), max_points=10_000)
    assert exact <= upper + 1e-9
