"""Law 3 (Theorem 4.2, first part): on symmetric data the mean of l_theta is zero."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import capture, finite_groups, layer_data, orbit_closure, rng, seeds

import recm_opt as recm
from recm_opt.groups import Group
from recm_opt.modulation import Modulation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@settings(max_examples=15)
@given(data=st.data(), group=finite_groups(), seed=seeds(), n0=st.integers(1, 3), hidden=st.integers(1, 16),
       m=st.integers(1, 16))
def test_l_theta_has_zero_mean_on_closed_data(data: st.DataObject, dtype: torch.dtype, group: Group, seed: int,
                                              n0: int, hidden: int, m: int) -> None:
    """Data closed under a finite group (uniform over orbits): the optimizer's l_theta and h_1 are 0 for any theta."""
    z0, y0, zrep, yrep = data.draw(layer_data(group, n0, dtype))
    z, y = orbit_closure(group, zrep, z0), orbit_closure(group, yrep, y0)
    model, _ = capture(group, zrep, yrep, z, y, state_dim=m, hidden=hidden, seed=seed % 10_000)
    mod = model.recm_modulation
    with torch.no_grad():
        l = mod.l_theta(mod.newest)
        # l is a difference of two means of the same O(1)-sized values in another order: rounding only.
        scale = 1 + float(mod.r_theta(mod.newest).abs().max())
    tol = 64 * torch.finfo(dtype).eps * scale
    assert float(l.abs().max()) <= tol
    assert float(mod.h.abs().max()) <= tol


@pytest.mark.parametrize("n_batches", [16, 256])
def test_l_theta_monte_carlo_mean_shrinks_like_inverse_sqrt_n(n_batches: int) -> None:
    """SO(3), Haar-random rotations of random vectors: |mean l_theta| <= 5 sigma / sqrt(N) at N = 64 n_batches."""
    group, rep, size = recm.SO3Generators(), recm.Vector("b c xyz"), 64
    mod = Modulation(("weight",), state_dim=8, seed=3, in_features=6).double()
    g = rng(11)
    base = torch.randn(n_batches * size, 2, 3, generator=g, dtype=torch.float64)
    rotations = group.sample(len(base), g)
    z = torch.einsum("nij,ncj->nci", rotations, base)  # x' = R x on every channel: a Haar-invariant law
    stacked = torch.cat([z[None], rep.act(group, group.generators(), z)]).flatten(2)
    with torch.no_grad():
        means = torch.stack([mod.l_theta(stacked[:, i * size : (i + 1) * size]) for i in range(n_batches)])
    # E[l] = 0 exactly (each generator copy has the same Haar-invariant law); the batch means
    # are i.i.d., so the overall mean is within 5 standard errors per coordinate.
    stderr = means.std(0) / math.sqrt(n_batches)
    assert bool((means.mean(0).abs() <= 5 * stderr).all())


def test_l_theta_monte_carlo_mean_does_not_shrink_on_asymmetric_data() -> None:
    """Power check for the test above: an unrotated (non-invariant) law keeps a mean many standard errors away."""
    group, rep, size, n_batches = recm.SO3Generators(), recm.Vector("b c xyz"), 64, 256
    mod = Modulation(("weight",), state_dim=8, seed=3, in_features=6).double()
    z = torch.randn(n_batches * size, 2, 3, generator=rng(11), dtype=torch.float64) + torch.tensor([2.0, 0, 0],
                                                                                                   dtype=torch.float64)
    stacked = torch.cat([z[None], rep.act(group, group.generators(), z)]).flatten(2)
    with torch.no_grad():
        means = torch.stack([mod.l_theta(stacked[:, i * size : (i + 1) * size]) for i in range(n_batches)])
    stderr = means.std(0) / math.sqrt(n_batches)
    assert float((means.mean(0).abs() / stderr).max()) > 20
