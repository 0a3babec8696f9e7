"""Alternative relaxation policies: ES's schedule and Lie-derivative penalty, RPP's priors, the one-line swap."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from vector_model import VectorNet, make_task

import recm_opt as recm
from recm_opt.policies import so3_lie_algebra, triangle_schedule


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
    opt = recm.EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=total, peak=2.0,
                                    zero_init=False)
    z = torch.randn(4, 3)
    for t in range(total + 2):
        model.train()
        out = model(z)
        expected = 2 * z + triangle_schedule(t, total, 2.0) * (model.un(z) + model.bias)
        torch.testing.assert_close(out, expected)
        out.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_es_branch_starts_at_zero() -> None:
    """zero_init (the default) zeroes every term parameter and nothing else."""
    model = _toy()
    recm.EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=4)
    assert model.un.weight.abs().max() == 0 and model.bias.abs().max() == 0
    assert torch.equal(model.other.detach(), torch.ones(2))


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


def _lie_derivative_fd(f, z: torch.Tensor, A: torch.Tensor, s: float = 1e-6) -> torch.Tensor:
    """Central difference of s -> exp(-sA) f(exp(sA) z), row vectors (z' = z R^T)."""
    def moved(t: float) -> torch.Tensor:
        R = torch.linalg.matrix_exp(t * A)
        return f(z @ R.T) @ torch.linalg.matrix_exp(-t * A).T
    return (moved(s) - moved(-s)) / (2 * s)


@given(seed=st.integers(0, 2**31 - 1), weight=st.floats(0.001, 1.0))
def test_es_penalty_is_the_lie_derivative_norm_plus_the_branch_norm(seed: int, weight: float) -> None:
    """regularizer() = w (sqrt(sum_k ||L_k f_un||^2) + sqrt(||f_un||^2)), L_k the exact Lie derivative."""
    g = torch.Generator().manual_seed(seed)
    model = Toy().double()
    opt = recm.EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=4,
                                    reg_weight=weight, zero_init=False)
    with torch.no_grad():
        model.un.weight.copy_(torch.randn(3, 3, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    model(z)
    value = opt.regularizer()
    branch = lambda x: model.un(x) + model.bias  # noqa: E731
    with torch.no_grad():
        ld = sum(_lie_derivative_fd(branch, z, A).pow(2).sum() for A in so3_lie_algebra())
        expected = weight * (ld.sqrt() + branch(z).pow(2).sum().sqrt())
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(opt.regularizer()) == 0.0  # consumed


def test_es_penalty_vanishes_on_an_equivariant_branch_and_is_finite_at_zero() -> None:
    """A branch c z has Lie derivative 0 (penalty = w c ||z||); the zero branch gives finite zero gradients."""
    model = _toy()
    opt = recm.EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=4)
    z = torch.randn(6, 3)
    (model(z).pow(2).sum() + opt.regularizer()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.un.weight.grad.abs().max() == 0
    opt.zero_grad()
    with torch.no_grad():
        model.un.weight.copy_(0.5 * torch.eye(3))
    model(z)
    assert float(opt.regularizer().detach()) == pytest.approx(0.01 * 0.5 * float(z.norm()), rel=1e-5)


def _rpp_step_matches(decoupled: bool) -> None:
    model, lr, res, eq = _toy(), 0.1, 0.5, 0.25
    opt = recm.ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=lr), model, residual_prior=res,
                                    equivariant_prior=eq, decoupled=decoupled)
    z = torch.randn(8, 3)
    model(z).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    strength = {"un.weight": res, "bias": res, "other": eq}
    assert {n: s for n, p in model.named_parameters() for q, s in opt.prior_parameters() if p is q} == strength
    opt.step()
    for n, p in model.named_parameters():
        s = strength.get(n, 0.0)
        if decoupled:
            expected = (before[n] - lr * grads[n]) / (1 + 2 * lr * s)
        else:
            expected = before[n] - lr * (grads[n] + 2 * s * before[n])
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_rpp_prior_is_the_gradient_of_its_negative_log_density() -> None:
    """Coupled: SGD(lr) moves p by -lr (g + 2 s p), s = 0.5 on terms, 0.25 on the layer's other weights, 0 else."""
    _rpp_step_matches(decoupled=False)


def test_rpp_decoupled_prior_is_a_proximal_step() -> None:
    """Decoupled: p <- (p - lr g) / (1 + 2 lr s), the proximal map of s ||p||^2 after the inner step."""
    _rpp_step_matches(decoupled=True)


def test_rpp_is_a_plain_residual_sum_and_never_pruned() -> None:
    """No scale parameter: train and eval output f_eq + sum_i f_un_i; every term kept in report and export."""
    model = _toy()
    opt = recm.ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=0.0), model)
    assert not any("recm_modulation" in n for n, p in model.named_parameters() if p.requires_grad
                   and n != "recm_modulation.w_beta")
    z = torch.randn(4, 3)
    for mode in (True, False):
        model.train(mode)
        torch.testing.assert_close(model(z), 2 * z + model.un(z) + model.bias)
    assert opt.report()[0]["kept"] == ["weight", "bias"]
    model.eval()
    torch.testing.assert_close(recm.export(model)(z), 2 * z + model.un(z) + model.bias)


@pytest.mark.parametrize("policy", ["es", "rpp"])
def test_policy_state_dict_round_trips(policy: str) -> None:
    """Save after 3 steps, load into a fresh copy: the next 2 steps give identical parameters."""
    def make(model: nn.Module) -> recm.RECMOptimizer:
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        if policy == "es":
            return recm.EquivarianceSchedule(inner, model, total_steps=8)
        return recm.ResidualPathwayPrior(inner, model, residual_prior=0.1)

    def step(model: nn.Module, opt: recm.RECMOptimizer, z: torch.Tensor) -> None:
        penalty = opt.regularizer() if isinstance(opt, recm.EquivarianceSchedule) else 0.0
        (model(z).pow(2).sum() + penalty).backward()
        opt.step(target=z)
        opt.zero_grad()

    z = torch.randn(8, 3)
    model = _toy()
    opt = make(model)
    for _ in range(3):
        step(model, opt, z)
    clone = _toy(seed=1)
    opt2 = make(clone)
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert int(clone.recm_modulation.t) == 3
    for _ in range(2):
        step(model, opt, z)
        step(clone, opt2, z)
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
        penalty = opt.regularizer() if isinstance(opt, recm.EquivarianceSchedule) else 0.0
        (loss + penalty).backward()
        opt.step(target=yb)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: recm.RECMOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), m, target=recm.Vector("b xyz"),
                                     example=torch.zeros(1, 4, 3)),
        lambda m: recm.EquivarianceSchedule(torch.optim.Adam(m.parameters(), lr=1e-2), m, total_steps=120),
        lambda m: recm.ResidualPathwayPrior(torch.optim.Adam(m.parameters(), lr=1e-2), m),
    ],
    ids=["recm", "es", "rpp"],
)
def test_one_line_swap_trains(make_opt) -> None:
    """The same loop (``step(target=y)``) trains under each policy: the loss drops by a third or more."""
    first, last = _train_vector(make_opt)
    assert last < 0.67 * first, (first, last)
