"""Alternative relaxation policies: ES's triangle schedule, RPP's prior, and the one-line swap with RECM."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from vector_model import VectorNet, make_task

import recm_opt as recm
from recm_opt.policies import triangle_schedule


@recm.relaxed(inputs=recm.Vector("b xyz"), terms={"weight": "un", "bias": "bias"})
class Toy(nn.Module):
    """f_eq(z) = 2 z, f_un: a dense map and a bias (both non-equivariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Linear(3, 3, bias=False)
        self.bias = nn.Parameter(torch.full((3,), 0.1))
        self.other = nn.Parameter(torch.ones(2))  # not a term: never under the prior

    def equivariant(self, z: torch.Tensor) -> torch.Tensor:
        return 2 * z

    def unconstrained(self, term: str, z: torch.Tensor) -> torch.Tensor:
        return self.un(z) if term == "weight" else self.bias.expand_as(z)


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def _step(model: nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor) -> None:
    model(z).pow(2).sum().backward()
    opt.step(target=z)
    opt.zero_grad()


@given(total=st.integers(1, 200), peak=st.floats(0.01, 10.0), t=st.integers(-5, 250))
def test_triangle_schedule_is_a_triangle(total: int, peak: float, t: int) -> None:
    """0 outside (0, T), symmetric about T/2, linear on each half, peak at T/2, never above peak."""
    a = triangle_schedule(t, total, peak)
    assert 0.0 <= a <= peak + 1e-12
    if t <= 0 or t >= total:
        assert a == 0.0
    else:
        assert a == pytest.approx(triangle_schedule(total - t, total, peak), abs=1e-12)
        assert a == pytest.approx(peak * min(t, total - t) * 2 / total, rel=1e-12)


def test_es_training_forward_follows_the_schedule() -> None:
    """In training, every term's alpha at step s is triangle(s - 1); beta = 1."""
    model, total = _toy(), 6
    opt = recm.EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=total, peak=2.0)
    z = torch.randn(4, 3)
    for t in range(total + 2):
        model.train()
        out = model(z)
        expected = 2 * z + triangle_schedule(t, total, 2.0) * (model.un(z) + model.bias)
        torch.testing.assert_close(out, expected)
        out.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_es_eval_and_export_drop_the_branch() -> None:
    """Mid-schedule (alpha > 0 in training), eval and the export are the equivariant map; all terms pruned."""
    model = _toy()
    opt = recm.EquivarianceSchedule(torch.optim.Adam(model.parameters(), lr=1e-2), model, total_steps=10)
    z = torch.randn(8, 3)
    for _ in range(5):
        _step(model, opt, z)
    assert opt.scheduled_alpha("Toy") == pytest.approx(1.0)
    model.eval()
    torch.testing.assert_close(model(z), 2 * z)
    exported = recm.export(model)
    torch.testing.assert_close(exported(z), 2 * z)
    assert not hasattr(exported, "un") and not hasattr(exported, "bias")
    (row,) = opt.report()
    assert row["pruned"] == ["weight", "bias"] and row["params_after"] == row["params_equivariant"]


def test_rpp_prior_is_a_gradient_term() -> None:
    """With SGD(lr), a step moves each prior parameter by -lr (g + prior p) and every other one by -lr g."""
    model, lr, prior = _toy(), 0.1, 0.5
    opt = recm.ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=lr), model, prior=prior, init_scale=0.7,
                                     weight_radius=100.0)  # no projection in play
    z = torch.randn(8, 3)
    model(z).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    under_prior = {"un.weight", "bias", "recm_modulation.alpha"}
    assert {n for n, p in model.named_parameters() if any(p is q for q in opt.prior_parameters())} == under_prior
    for n, p in model.named_parameters():
        expected = before[n] - lr * (grads[n] + (prior * before[n] if n in under_prior else 0))
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_rpp_keeps_the_branch_until_its_scale_is_pruned() -> None:
    """RPP's eval output is f_eq + sum alpha_i f_un_i; a scale below prune_eps prunes its term."""
    model = _toy()
    opt = recm.ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=0.0), model, init_scale=0.5)
    z = torch.randn(4, 3)
    model.eval()
    torch.testing.assert_close(model(z), 2 * z + 0.5 * (model.un(z) + model.bias))
    with torch.no_grad():
        model.recm_modulation.alpha[1] = 1e-3
    model.train()
    _step(model, opt, z)
    assert opt.report()[0]["pruned"] == ["bias"]
    assert not hasattr(recm.export(model), "bias")


@pytest.mark.parametrize("policy", ["es", "rpp"])
def test_policy_state_dict_round_trips(policy: str) -> None:
    """Save after 3 steps, load into a fresh copy: the next 2 steps give identical parameters."""
    def make(model: nn.Module) -> recm.RECMOptimizer:
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        if policy == "es":
            return recm.EquivarianceSchedule(inner, model, total_steps=8)
        return recm.ResidualPathwayPrior(inner, model, prior=0.1)

    z = torch.randn(8, 3)
    model = _toy()
    opt = make(model)
    for _ in range(3):
        _step(model, opt, z)
    clone = _toy(seed=1)
    opt2 = make(clone)
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert int(clone.recm_modulation.t) == 3
    for _ in range(2):
        _step(model, opt, z)
        _step(clone, opt2, z)
    for (n, p), q in zip(model.named_parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert opt.report()[0]["alpha"] == opt2.report()[0]["alpha"]


def _train_vector(make_opt, steps: int = 120) -> tuple[float, float]:
    torch.manual_seed(0)
    model = VectorNet()
    opt = make_opt(model)  # the one line that differs between policies
    x, y = make_task(512, broken=1.0)
    losses = []
    for i in range(steps):
        xb, yb = x[(i * 32) % 512 :][:32], y[(i * 32) % 512 :][:32]
        loss = (model(xb) - yb).pow(2).mean()
        loss.backward()
        opt.step(target=yb)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: recm.RECMOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), m, target=recm.Vector("b xyz")),
        lambda m: recm.EquivarianceSchedule(torch.optim.Adam(m.parameters(), lr=1e-2), m, total_steps=120),
        lambda m: recm.ResidualPathwayPrior(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    ],
    ids=["recm", "es", "rpp"],
)
def test_one_line_swap_trains(make_opt) -> None:
    """The same loop (``step(target=y)``) trains under each policy: the loss drops by a third or more."""
    first, last = _train_vector(make_opt)
    assert last < 0.67 * first, (first, last)
