"""Issue law 7: after every step, ||w_alpha_i|| <= 1, ||w_beta|| <= 1 and every term weight is within its radius."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import rng, seeds
from torch import nn
from vector_model import VectorNet

import recm_opt as recm
from recm_opt.modulation import project_norm_
from recm_opt.tagging import get_relaxation

OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.1),
}


def _term_params(layer: nn.Module) -> list[torch.Tensor]:
    tag = get_relaxation(layer)
    assert tag is not None
    out = []
    for attrs in tag.terms.values():
        for a in attrs:
            obj = getattr(layer, a)
            out += [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())
    return out


def _constraints(model: nn.Module, radius: float) -> dict[str, list[float]]:
    """Each constrained norm divided by its radius (must be <= 1)."""
    ratios: dict[str, list[float]] = {"w_alpha": [], "w_beta": [], "terms": []}
    for layer in model.modules():
        if get_relaxation(layer) is None:
            continue
        mod = layer.recm_modulation
        ratios["w_alpha"] += mod.w_alpha.detach().norm(dim=1).tolist()
        ratios["w_beta"].append(float(mod.w_beta.detach().norm()))
        ratios["terms"] += [float(p.detach().norm()) / radius for p in _term_params(layer)]
    return ratios


def _adversarial_grads(model: nn.Module, scale: float, mode: str, seed: int) -> None:
    """Overwrite every gradient: random directions, or straight away from the origin (norm-increasing)."""
    g = rng(seed)
    for p in model.parameters():
        if p.grad is None:
            continue
        if mode == "outward":
            direction = -torch.sign(p.detach()) - (p.detach() == 0).to(p.dtype)  # descent moves away from 0
        else:
            direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad.copy_(direction * scale)


@pytest.mark.filterwarnings("ignore:layer .* did not run in training mode")  # inf activations skip captures
@settings(max_examples=20)
@example(seed=0, name="sgd", log_lr=1.0, log_scale=38.5, radius=1.0, mode="outward", dtype=torch.float32)
@example(seed=0, name="sgd", log_lr=25.0, log_scale=15.0, radius=1.0, mode="outward", dtype=torch.float32)
@example(seed=0, name="adam", log_lr=30.0, log_scale=10.0, radius=1.0, mode="outward", dtype=torch.float32)
@given(seed=seeds(), name=st.sampled_from(sorted(OPTIMIZERS)), log_lr=st.floats(-4, 30),
       log_scale=st.floats(-3, 38.5), radius=st.floats(1e-3, 10.0), mode=st.sampled_from(["outward", "random"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_projection_bounds_hold_after_adversarial_steps(seed: int, name: str, log_lr: float, log_scale: float,
                                                        radius: float, mode: str, dtype: torch.dtype) -> None:
    """Huge or norm-increasing gradients, any inner optimizer: the three projection bounds hold after each step."""
    torch.manual_seed(seed % 2**31)  # the example model initialises from the global stream
    model = VectorNet(c_in=2, hidden=4).to(dtype)
    opt = recm.RECMOptimizer(OPTIMIZERS[name](model.parameters(), 10**log_lr), model,
                             target=recm.Vector("b xyz"), weight_radius=radius, a=0.5, seed=seed % 1000,
                             example=torch.zeros(1, 2, 3, dtype=dtype))
    x = torch.randn(6, 2, 3, generator=rng(seed), dtype=torch.float64).to(dtype)
    # Slack: the projected norm is radius * (1 + a few ulps) after rounding.
    slack = 1 + 16 * torch.finfo(dtype).eps
    for step in range(3):
        model(x).pow(2).sum().backward()
        _adversarial_grads(model, 10**log_scale, mode, seed + step)
        opt.step(target=x[:, 0])
        opt.zero_grad()
        for key, values in _constraints(model, radius).items():
            assert max(values) <= slack, (key, max(values))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_skip_the_step_and_keep_the_bounds(bad: float) -> None:
    """A NaN/Inf gradient skips the whole step (skip_nonfinite), so the bounds and parameters are unchanged."""
    torch.manual_seed(0)
    model = VectorNet(c_in=2, hidden=4)
    opt = recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 2, 3))
    x = torch.randn(6, 2, 3, generator=rng(0))
    model(x).sum().backward()
    opt.step(target=x[:, 0])  # one real step first, so that r_theta has a gradient path too
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    model(x).sum().backward()
    next(model.parameters()).grad.view(-1)[0] = bad
    opt.step(target=x[:, 0])
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@given(seed=seeds(), log_scale=st.floats(-3, 30), radius=st.floats(1e-3, 10.0), rows=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_projection_is_idempotent(seed: int, log_scale: float, radius: float, rows: int, dtype: torch.dtype) -> None:
    """project_norm_ twice equals once (to rounding), and leaves points inside the ball untouched."""
    w = (torch.randn(rows, 7, generator=rng(seed), dtype=torch.float64) * 10**log_scale).to(dtype)
    for dim in (None, 1):
        once = w.clone()
        project_norm_([once], radius, dim=dim)
        twice = once.clone()
        project_norm_([twice], radius, dim=dim)
        tol = 4 * torch.finfo(dtype).eps * radius
        torch.testing.assert_close(twice, once, atol=tol, rtol=4 * torch.finfo(dtype).eps)
        norms = once.norm() if dim is None else once.norm(dim=1)
        assert float(norms.max()) <= radius * (1 + 16 * torch.finfo(dtype).eps)
    inside = w / (w.norm() / radius * 2)  # strictly inside the ball
    kept = inside.clone()
    project_norm_([kept], radius)
    assert torch.equal(kept, inside)
