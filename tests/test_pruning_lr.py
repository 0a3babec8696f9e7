"""Pruning by the noise test: h's noise variance, its law under symmetric data, and pruning at any learning rate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import rng, seeds
from tiny import TinyNet, example, train_steps
from torch import Tensor
from vector_model import VectorNet, make_task

import recm_opt as recm
from recm_opt.modulation import Modulation, _foreach_commit, alpha_map, gamma, kept_terms


def _mods(n: int, m: int = 6) -> list[Modulation]:
    return [Modulation(("u",), state_dim=m, seed=j, in_features=3).double() for j in range(n)]


@given(seed=seeds(), steps=st.integers(1, 30), a=st.sampled_from([1e-3, 0.1, 1.0]), bad=st.integers(-1, 29))
def test_noise_variance_is_the_sum_of_each_increments_squared_weight(seed: int, steps: int, a: float, bad: int) -> None:
    """noise_var after T commits = sum_t (gamma_t prod_{s>t} (1 - gamma_s))^2 ||l_t||^2, per layer and batched.

    A non-finite l leaves h, t and noise_var unchanged (it is not a step of the recurrence).
    """
    g = rng(seed)
    ls = torch.randn(steps, 2, 6, generator=g, dtype=torch.float64)
    if 0 <= bad < steps:
        ls[bad, 1, 0] = math.inf
    single, batched = _mods(2), _mods(2)
    for l in ls:
        for mod, row in zip(single, l):
            if bool(torch.isfinite(row).all()):
                mod.commit(row, a, 1.0)
        _foreach_commit(batched, l, a, 1.0)
    for j in range(2):
        rows = [l[j] for l in ls if bool(torch.isfinite(l[j]).all())]
        gammas = [float(gamma(t, a)) for t in range(1, len(rows) + 1)]
        expected = 0.0
        for t, row in enumerate(rows):
            weight = gammas[t] * math.prod(1 - gs for gs in gammas[t + 1:])
            expected += weight ** 2 * float(row.pow(2).sum())
        for mod in (single[j], batched[j]):
            assert int(mod.t) == len(rows)
            torch.testing.assert_close(mod.noise_var, torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                                       atol=1e-300)


def test_noise_variance_is_the_expected_squared_state_under_symmetric_data() -> None:
    """With E[l] = 0 (symmetric data), E ||h_T||^2 = E noise_var_T: h is a martingale.

    1000 independent chains of 50 steps with l_t ~ N(0, I_6): ||h_T||^2 = (sum w_t^2) chi^2_6
    per chain, so the mean over chains of ||h||^2, over noise_var's mean, is 1 within
    sqrt(2 / (6 * 1000)) = 0.018 (one sd of chi^2_6000 / 6000); noise_var's mean has a
    smaller spread of its own, covered by the factor 1.5; the tolerance is 5 such sd.
    """
    g = rng(0)
    chains, m = 1000, 6
    mods = [Modulation(("u",), state_dim=m, in_features=3).double() for _ in range(chains)]
    for _ in range(50):
        _foreach_commit(mods, torch.randn(chains, m, generator=g, dtype=torch.float64), 0.1, 1.0)
    h_sq = torch.stack([mod.h.pow(2).sum() for mod in mods]).mean()
    noise = torch.stack([mod.noise_var for mod in mods]).mean()
    assert abs(float(h_sq / noise) - 1) < 5 * math.sqrt(2 / (m * chains)) * 1.5


def test_kept_terms_needs_both_tests() -> None:
    """A term is kept when |alpha| >= prune_eps and its layer's ||h||^2 >= prune_z^2 noise_var ; z = 0: the first."""
    alpha = torch.tensor([[0.5, 0.001], [0.5, 0.5]])
    h = torch.tensor([[0.3, 0.0], [0.1, 0.0]])
    noise = torch.tensor([0.01, 0.01])  # ||h||^2 = 0.09 and 0.01 against 9 * 0.01
    assert kept_terms(alpha, h, noise, 0.01, 3.0).tolist() == [[True, False], [False, False]]
    assert kept_terms(alpha, h, noise, 0.01, 0.0).tolist() == [[True, False], [True, True]]


@given(seed=seeds())
def test_odd_gelu_is_odd_increasing_and_below_the_identity(seed: int) -> None:
    """s(x) = sign(x) GELU(|x|): s(-x) = -s(x), s increasing, |s(x)| <= |x|, |s'| <= GELU's Lipschitz constant."""
    x = torch.randn(64, generator=rng(seed), dtype=torch.float64) * 3
    s = alpha_map(x, "odd_gelu")
    torch.testing.assert_close(alpha_map(-x, "odd_gelu"), -s)
    order = x.argsort()
    assert bool((s[order].diff() >= 0).all())
    assert bool((s.abs() <= x.abs()).all())
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(alpha_map(xg, "odd_gelu").sum(), xg)
    assert float(grad.abs().max()) <= recm.modulation.GELU_LIPSCHITZ


def test_noise_variance_travels_with_the_model_and_old_checkpoints_load() -> None:
    """noise_var and prune_z travel in model.state_dict(); a checkpoint without them loads (noise_var 0, prune_z 0)."""
    model = TinyNet()
    opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                             a=0.1, prune_z=2.5, alpha_fn="odd_gelu", example=example(model))
    train_steps(model, opt, range(3))
    sd = model.state_dict()
    assert float(sd["enc.recm_modulation.noise_var"]) > 0
    fresh = TinyNet(seed=3)
    fresh.load_state_dict(sd)
    mod = fresh.enc.recm_modulation
    assert torch.equal(mod.noise_var, model.enc.recm_modulation.noise_var)
    assert (mod.prune_z, mod.alpha_fn) == (2.5, "odd_gelu")
    old = {k: v for k, v in sd.items() if not k.endswith("noise_var")}
    for k in [k for k in old if k.endswith("_extra_state")]:
        config = recm.modulation.config_from(old[k])
        config.pop("prune_z"), config.pop("alpha_fn")
        old[k] = recm.modulation.config_to_tensor(config)
    older = TinyNet(seed=4)
    older.load_state_dict(old)  # strict: the missing noise_var is filled in
    assert float(older.enc.recm_modulation.noise_var) == 0 and older.enc.recm_modulation.prune_z == 0.0
    assert older.enc.recm_modulation.alpha_fn == "gelu"


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_corrupt_noise_variance_is_refused(bad: float) -> None:
    """A NaN or negative noise_var in a checkpoint is a ValueError naming the key; nothing loads."""
    model = TinyNet()
    recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                       example=example(model))
    sd = model.state_dict()
    sd["enc.recm_modulation.noise_var"] = torch.tensor(bad)
    fresh = TinyNet(seed=3)
    with pytest.raises(ValueError, match="enc.recm_modulation.noise_var"):
        fresh.load_state_dict(sd)


def _train_vector(broken: float, lr: float, steps: int, seed: int = 0, alpha_fn: str = "gelu") -> list[Tensor]:
    torch.manual_seed(seed)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             lr=lr, seed=seed, alpha_fn=alpha_fn, example=torch.zeros(1, 4, 3))
    x, y = make_task(steps * 64, broken, seed=seed + 1)
    for i in range(steps):
        (model(x[i * 64:(i + 1) * 64]) - y[i * 64:(i + 1) * 64]).pow(2).mean().backward()
        opt.step(target=y[i * 64:(i + 1) * 64])
        opt.zero_grad()
    mods = [m.recm_modulation for m in model.modules() if hasattr(m, "recm_modulation")]
    out = []
    for z in (3.0, 0.0):
        for mod in mods:
            mod.prune_z = z
        out.append(torch.cat([mod.kept() for mod in mods]))
    return out


def test_symmetric_layers_are_pruned_at_a_high_modulation_learning_rate() -> None:
    """Exactly symmetric data, AdamW at lr 3e-2 for RECM's group: the noise test prunes every term.

    At this learning rate r_theta's weights grow, and with them the noise of l_theta: the
    |alpha| < 0.01 test alone keeps a term after 600 steps (the assertion that makes this
    test mean something); the scale-free noise test (prune_z = 3) prunes all of them.
    """
    with_noise_test, alpha_only = _train_vector(broken=0.0, lr=3e-2, steps=600)
    assert int(alpha_only.sum()) >= 1
    assert int(with_noise_test.sum()) == 0


def test_broken_layers_keep_their_relaxation_under_the_noise_test() -> None:
    """The broken task at the default modulation learning rate: the noise test keeps what the |alpha| test keeps."""
    with_noise_test, alpha_only = _train_vector(broken=1.0, lr=1e-3, steps=600)
    assert int(alpha_only.sum()) >= 3
    assert torch.equal(with_noise_test, alpha_only)
