"""Law 1 and 2: the closed form of the h recurrence, and its convergence (Lemma 4.1)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import rng, seeds
from torch import nn

import recm_opt as recm
from recm_opt.modulation import Modulation


def _closed_form(h0: torch.Tensor, ys: torch.Tensor, a: float, b: float) -> torch.Tensor:
    lam = b / (b + a * len(ys))
    return lam * h0 + (1 - lam) * ys.mean(0)


@given(
    seed=seeds(),
    steps=st.integers(1, 40),
    m=st.integers(1, 8),
    a=st.floats(1e-6, 1e3),
    b=st.floats(1e-3, 1e3),
    scale=st.floats(1e-3, 1e3),
)
def test_recurrence_matches_closed_form(seed: int, steps: int, m: int, a: float, b: float, scale: float) -> None:
    """h_t = lambda_t h_0 + (1 - lambda_t) mean(Y_1..Y_t), lambda_t = b / (b + a t), for every t (float64)."""
    g = rng(seed)
    mod = Modulation(("weight",), state_dim=m, in_features=3).double()
    h0 = torch.randn(m, generator=g, dtype=torch.float64) * scale
    ys = torch.randn(steps, m, generator=g, dtype=torch.float64) * scale
    mod.h.copy_(h0)
    for t in range(1, steps + 1):
        mod.commit(ys[t - 1], a, b)
        assert int(mod.t) == t
        # Each step rounds once (relative 2^-52); t steps accumulate at most ~t of them.
        tol = 8 * t * torch.finfo(torch.float64).eps * scale * (1 + math.sqrt(m))
        torch.testing.assert_close(mod.h, _closed_form(h0, ys[:t], a, b), atol=tol, rtol=0)
        assert math.isclose(float(mod.gamma_t), a / (b + a * t), rel_tol=1e-12)


@recm.relaxed(inputs=recm.Vector("b xyz"), terms={"weight": "un"})
class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Linear(3, 3, dtype=torch.float64)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def equivariant(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * z

    def unconstrained(self, term: str, z: torch.Tensor) -> torch.Tensor:
        return self.un(z)


@settings(max_examples=10)
@given(seed=seeds(), steps=st.integers(1, 12), a=st.floats(1e-4, 10.0), b=st.floats(1e-2, 10.0))
def test_optimizer_recurrence_matches_closed_form(seed: int, steps: int, a: float, b: float) -> None:
    """Through RECMOptimizer.step (theta frozen, lr 0), h_t is the closed form of the l_theta it committed."""
    g = rng(seed)
    model = _Layer()
    opt = recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, recm.SO3Generators(),
                             target=recm.Vector("b xyz"), a=a, b=b, state_dim=5, lr=0.0, seed=seed % 1000)
    ls = []
    for _ in range(steps):
        x = torch.randn(7, 3, generator=g, dtype=torch.float64)
        model(x).sum().backward()
        opt.step(target=x.flip(1))
        opt.zero_grad()
        mod = model.recm_modulation
        # newest is the sample behind the step's l (7 units < max_units: no subsampling).
        ls.append(mod.l_theta(mod.newest).detach())
    expected = _closed_form(torch.zeros(5, dtype=torch.float64), torch.stack(ls), a, b)
    torch.testing.assert_close(model.recm_modulation.h, expected, atol=1e-12, rtol=1e-10)


@settings(max_examples=8)
@given(seed=seeds(), support=st.integers(3, 12), batch=st.integers(1, 4), a=st.floats(0.5, 5.0))
def test_h_converges_to_expected_l(seed: int, support: int, batch: int, a: float) -> None:
    """Lemma 4.1: with i.i.d. batches from a fixed p and fixed theta, h_T -> E_p[l] within a CLT bound.

    p is uniform on ``support`` stacked points, so E_p[l] and the per-unit covariance are
    exact. By the closed form, h_T - E l = lambda_T (h_0 - E l) + (1 - lambda_T)(mean Y - E l),
    and mean Y has per-coordinate std sigma / sqrt(T * batch).
    """
    g = rng(seed)
    m, steps = 6, 400
    mod = Modulation(("weight",), state_dim=m, seed=seed % 1000, in_features=4).double()
    atoms = torch.randn(3, support, 4, generator=g, dtype=torch.float64)  # (1 + |C_G|, support, d)
    per_unit = torch.stack([mod.l_theta(atoms[:, i : i + 1]) for i in range(support)]).detach()
    mean_l, sigma = per_unit.mean(0), per_unit.std(0, unbiased=False)
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.randint(support, (batch,), generator=g)
            mod.commit(mod.l_theta(atoms[:, idx]), a, 1.0)
    lam = 1.0 / (1.0 + a * steps)
    # 5.5 sigma per coordinate: a union bound over m = 6 coordinates keeps the false-alarm rate < 1e-6.
    tol = lam * mean_l.abs() + 5.5 * sigma / math.sqrt(steps * batch) + 1e-12
    assert bool(((mod.h - mean_l).abs() <= tol).all()), ((mod.h - mean_l).abs() / tol).max()
