"""Law 4 (Theorem 4.2): |E_p[l_theta]| <= 2 B W1(p, p_G), and |alpha*| <= 2 sqrt(m) B W1.

B is the library's certified Lipschitz bound (``recm.lipschitz_bound``); W1 between
empirical measures is exact (``recm.symmetry_gap``: optimal assignment), and is
itself checked against scipy's 1-D W1 and a brute force over permutations.
"""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import capture, finite_groups, layer_data, rng, seeds

import recm_opt as recm
from recm_opt.diagnostics import alpha_bound
from recm_opt.groups import Group

# Both sides are computed in float64; the slack only absorbs rounding.
SLACK = 1e-9


@settings(max_examples=20)
@given(data=st.data(), group=finite_groups(), seed=seeds(), units=st.integers(1, 8), m=st.integers(1, 16),
       hidden=st.integers(1, 16), scale=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)))
def test_l_theta_mean_is_bounded_by_symmetry_gap(data: st.DataObject, group: Group, seed: int, units: int, m: int,
                                                hidden: int, scale: tuple[float, float]) -> None:
    """max_j |E_p l_j| <= 2 B W1(p, p_G), and the sharper ||E_p l||_2 <= B W1(p, p_C) <= 2 B W1(p, p_G)."""
    z, y, zrep, yrep = data.draw(layer_data(group, units))
    model, _ = capture(group, zrep, yrep, z, y, scale=scale, state_dim=m, hidden=hidden, seed=seed % 10_000)
    mod = model.recm_modulation
    with torch.no_grad():
        l = mod.l_theta(mod.newest)
    B = recm.lipschitz_bound(model)
    w1_group = recm.symmetry_gap((z, y), group, (zrep, yrep), max_points=10_000)  # every element: exact
    w1_gens = recm.symmetry_gap(model)  # the captured sample against its C_G copies
    assert float(l.abs().max()) <= 2 * B * w1_group * (1 + SLACK) + SLACK
    assert float(l.norm()) <= B * w1_gens * (1 + SLACK) + SLACK
    assert w1_gens <= 2 * w1_group * (1 + SLACK) + SLACK


@settings(max_examples=15)
@given(data=st.data(), group=finite_groups(), seed=seeds(), units=st.integers(1, 8), m=st.integers(1, 16),
       scale=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)))
def test_alpha_is_bounded_by_symmetry_gap(data: st.DataObject, group: Group, seed: int, units: int, m: int,
                                          scale: tuple[float, float]) -> None:
    """After steps on one batch (h -> E_p l), each |alpha_i| <= 2 sqrt(m) B W1(p, p_G); so does the report's bound."""
    z, y, zrep, yrep = data.draw(layer_data(group, units))
    model, opt = capture(group, zrep, yrep, z, y, steps=4, scale=scale, state_dim=m, a=100.0, seed=seed % 10_000)
    (row,) = opt.report(gaps=True)
    w1_group = recm.symmetry_gap((z, y), group, (zrep, yrep), max_points=10_000)
    bound = alpha_bound(recm.lipschitz_bound(model), w1_group, m)
    for value in row["alpha"].values():
        assert abs(value) <= bound * (1 + SLACK) + SLACK
        assert abs(value) <= row["alpha_bound"] * (1 + SLACK) + SLACK
    assert row["gap_w1"] == recm.symmetry_gap(model)


@given(seed=seeds(), n=st.integers(1, 30), k=st.integers(1, 4))
def test_symmetry_gap_matches_scipy_in_one_dimension(seed: int, n: int, k: int) -> None:
    """On a stacked (1 + k, n, 1) sample the W1 is scipy.stats.wasserstein_distance of the two point sets."""
    from scipy.stats import wasserstein_distance

    stacked = torch.randn(1 + k, n, 1, generator=rng(seed), dtype=torch.float64)
    expected = wasserstein_distance(stacked[0, :, 0].numpy(), stacked[1:].flatten().numpy())
    assert math.isclose(recm.symmetry_gap(stacked, max_points=10_000), expected, rel_tol=1e-9, abs_tol=1e-12)


@given(seed=seeds(), n=st.integers(1, 5), d=st.integers(1, 4))
def test_symmetry_gap_matches_brute_force_assignment(seed: int, n: int, d: int) -> None:
    """For n <= 5 atoms per side, W1 is the minimum over all n! matchings of the mean Euclidean distance."""
    stacked = torch.randn(2, n, d, generator=rng(seed), dtype=torch.float64)
    cost = torch.cdist(stacked[0], stacked[1])
    best = min(float(cost[range(n), list(p)].mean()) for p in itertools.permutations(range(n)))
    assert math.isclose(recm.symmetry_gap(stacked), best, rel_tol=1e-9, abs_tol=1e-12)


def test_lipschitz_bound_dominates_observed_slopes() -> None:
    """B = ||W2|| Lip(GELU) ||W1|| is >= every difference quotient of r_theta (sampled and gradient-ascended)."""
    from recm_opt.modulation import Modulation

    mod = Modulation(("weight",), state_dim=6, hidden=16, seed=5, in_features=4).double()
    g = rng(0)
    x = torch.randn(512, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dx = torch.randn(512, 4, generator=g, dtype=torch.float64) * 1e-3
    B = recm.lipschitz_bound(mod)
    opt = torch.optim.Adam([x], lr=1e-2)
    for _ in range(50):  # push the pairs towards the steepest region of r_theta
        ratio = (mod.r_theta(x + dx) - mod.r_theta(x)).norm(dim=1) / dx.norm(dim=1)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    assert float(ratio.detach().max()) <= B


def test_symmetry_gap_accepts_scalar_targets() -> None:
    """Pinned counterexample (C_1, one unit, an invariant target of shape (B,)): per-unit scalars are one feature."""
    z = torch.tensor([[[1.5, -0.3, -2.2], [0.6, -1.1, -1.4]]], dtype=torch.float64)
    y = torch.tensor([0.4], dtype=torch.float64)
    gap = recm.symmetry_gap((z, y), recm.CyclicGenerators(1), (recm.Vector("b c xyz"), recm.Invariant("b")))
    assert gap < 1e-12  # C_1 is trivial: every sample is symmetric
