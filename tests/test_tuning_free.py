"""RECM's own update and the settings derived from the run length.

RECM steps its modulation parameters itself (Adam, :mod:`recm_opt.schedule`); the inner
optimizer trains the model's weights only. So with the model's weights frozen, RECM's
parameters follow the same trajectory under every inner optimizer, and they move under SGD,
LBFGS and Adagrad as under AdamW.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TinyNet, batch, example
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.optimizer import RECMConfig, RECMOptimizer
from recm_opt.schedule import ModulationStep, modulation_lr, run_defaults, run_length

INNER: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "SGD-momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "Adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "LBFGS": lambda ps, lr: torch.optim.LBFGS(ps, lr=lr, max_iter=3),
    "Muon": lambda ps, lr: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=lr),
    "ScheduleFreeAdamW": lambda ps, lr: _schedule_free(ps, lr),
    "Lookahead(SGD)": lambda ps, lr: _lookahead(ps, lr),
}


def _schedule_free(ps: list[Tensor], lr: float) -> torch.optim.Optimizer:
    po = pytest.importorskip("pytorch_optimizer")
    opt = po.ScheduleFreeAdamW(ps, lr=lr)
    opt.train()
    return opt


def _lookahead(ps: list[Tensor], lr: float) -> torch.optim.Optimizer:
    to = pytest.importorskip("torch_optimizer")
    return to.Lookahead(torch.optim.SGD(ps, lr=lr, momentum=0.9), k=2, alpha=0.5)


def _wrap(model: nn.Module, inner: torch.optim.Optimizer, **kw: object) -> RECMOptimizer:
    return RECMOptimizer(inner, model, target=recm.Vector("b xyz"), example=example(model),
                         total_steps=kw.pop("total_steps", 50), **kw)


def _train(model: nn.Module, opt: RECMOptimizer, steps: int) -> None:
    for i in range(steps):
        x, y = batch(seed=i)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure, target=y)


def _recm_params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "recm_modulation" in n]


@pytest.mark.parametrize("name", list(INNER))
def test_recm_parameters_follow_the_same_trajectory_under_every_inner_optimizer(name: str) -> None:
    """Model weights frozen (inner lr 0): RECM's parameters move, bit-identically under every inner optimizer."""
    ref_model, model = TinyNet(), TinyNet()
    ref = _wrap(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=0.0))
    opt = _wrap(model, INNER[name](list(model.parameters()), 0.0))
    start = _recm_params(model)
    _train(ref_model, ref, 6)
    _train(model, opt, 6)
    after = _recm_params(model)
    for p, q in zip(after, _recm_params(ref_model)):
        assert torch.equal(p, q)
    moved = [float((a - b).abs().max()) for a, b in zip(after, start)]
    assert sum(m > 0 for m in moved) >= 5  # w_alpha, w_beta and r_theta (its output bias cancels in l)
    assert int(model.enc.recm_modulation.t) == 6


@pytest.mark.parametrize("name", ["SGD", "SGD-momentum", "LBFGS", "Adagrad"])
def test_under_sgd_lbfgs_adagrad_recm_learns_and_h_leaves_zero_on_broken_data(name: str) -> None:
    """On broken data RECM's parameters move by about its own step size, and h leaves 0."""
    model = TinyNet()
    opt = _wrap(model, INNER[name](list(model.parameters()), 1e-2))
    start = _recm_params(model)
    _train(model, opt, 10)
    moved = max(float((a - b).abs().max()) for a, b in zip(_recm_params(model), start))
    # Adam moves a coordinate by at most ~lr per step; over 10 steps of a steady sign, several lr.
    assert moved > opt.lr
    assert float(model.enc.recm_modulation.h.norm()) > 0 and float(model.dec.recm_modulation.h.norm()) > 0


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6), lr=st.sampled_from([1e-3, 1e-2, 0.05]),
       shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4))
def test_own_update_is_adam(seed: int, steps: int, lr: float, shapes: list[tuple[int, int]]) -> None:
    """ModulationStep equals torch.optim.Adam (betas 0.9/0.999, eps 1e-8) in float64, step by step."""
    g = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    adam = torch.optim.Adam(theirs, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    step = ModulationStep()
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        step.step(ours, lr)
        adam.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_step_size_decays_to_zero_at_the_run_length_and_stays_there() -> None:
    """The cosine reaches 0 at total_steps; RECM's parameters stop moving; h keeps updating."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3), total_steps=4)
    _train(model, opt, 4)
    assert opt.param_groups[-1]["lr"] == pytest.approx(modulation_lr(3, opt.lr, 4)) and modulation_lr(4, 1.0, 4) == 0
    frozen = _recm_params(model)
    _train(model, opt, 2)
    for a, b in zip(_recm_params(model), frozen):
        assert torch.equal(a, b)
    assert int(model.enc.recm_modulation.t) == 6


def test_defaults_derive_from_the_run_length_and_explicit_values_win() -> None:
    """a and the peak step size follow run_defaults(total_steps); a= and lr= are kept as given."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=300)
    assert (opt.a, opt.lr) == (run_defaults(300).a, run_defaults(300).lr)
    assert run_defaults(300).a == pytest.approx(50 / 300) and run_defaults(10**6).lr == pytest.approx(5e-4)
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=300, a=1e-3, lr=2e-3)
    assert (opt.a, opt.lr) == (1e-3, 2e-3)
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), config=RECMConfig(a=1e-2), a=1e-4)
    assert opt.a == 1e-4  # a keyword wins over config


def _hf_linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    return min(1.0, step / max(1, num_warmup_steps)) * max(0.0, 1 - step / num_training_steps)


SCHEDULES: dict[str, tuple[Callable[[torch.optim.Optimizer], object], int]] = {
    "OneCycleLR": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=123), 123),
    "CosineAnnealingLR": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=77), 77),
    "LinearLR-decay": (lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.01, total_iters=55), 55),
    "PolynomialLR": (lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=66), 66),
    "SequentialLR": (lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, total_iters=10),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=90)], milestones=[10]), 100),
    "LambdaLR-hf": (lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, functools.partial(_hf_linear, num_warmup_steps=5, num_training_steps=88)), 88),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("on", ["wrapper", "inner"])
def test_run_length_is_read_from_an_attached_scheduler(name: str, on: str) -> None:
    """The scheduler's length becomes total_steps at the first step, with the defaults derived from it."""
    build, length = SCHEDULES[name]
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = _wrap(model, inner, total_steps=None)
    sched = build(opt if on == "wrapper" else inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing assumed: no warning
        _train(model, opt, 1)
    sched.step()
    assert opt.total_steps == length == run_length(sched)
    assert (opt.a, opt.lr) == (run_defaults(length).a, run_defaults(length).lr)


def test_explicit_a_is_kept_when_a_scheduler_gives_the_length() -> None:
    """a= wins over the derived a; the step size still derives from the scheduler's length."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=None, a=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    _train(model, opt, 1)
    sched.step()
    assert opt.a == 3e-4 and opt.lr == run_defaults(400).lr and opt.total_steps == 400


def test_unknown_length_warns_once_with_what_it_assumed() -> None:
    """No total_steps and no scheduler that knows one: one warning naming the assumption, at the user's line."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=None)
    with pytest.warns(UserWarning, match=r"does not know the run length.*a = 0\.005") as record:
        _train(model, opt, 3)
    assert len([w for w in record if "run length" in str(w.message)]) == 1
    assert record[0].filename == __file__
    assert opt.total_steps is None and opt.param_groups[-1]["lr"] == modulation_lr(2, opt.lr, None)


def test_unknown_settings_are_named() -> None:
    """A misspelt setting raises TypeError naming it and the valid ones; old keywords still work."""
    model = TinyNet()
    with pytest.raises(TypeError, match=r"\['prune_zz'\].*prune_z"):
        _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), prune_zz=3)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=0)
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), a=1e-3, b=2.0, state_dim=8, hidden=8,
                max_units=64, prune_eps=0.02, prune_z=2.0, alpha_fn="gelu", weight_radius=2.0, lr=1e-3,
                weight_decay=0.0, skip_pruned=False, skip_nonfinite=True, seed=1, foreach=False)
    assert opt.config.alpha_fn == "gelu" and model.enc.recm_modulation.h.numel() == 8


def test_checkpoint_resumes_recm_moments_bit_exactly() -> None:
    """state_dict holds RECM's Adam moments under each modulation parameter; a fresh pair resumes exactly."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    _train(model, opt, 3)
    msd, osd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    entries = [e for e in osd["state"].values() if "recm_exp_avg" in e]
    assert len(entries) == 12  # 6 tensors per layer, each with an entry of fixed shape
    _train(model, opt, 2)
    other = TinyNet(seed=3)
    other.load_state_dict(msd)
    other_opt = _wrap(other, torch.optim.SGD(other.parameters(), lr=0.05))
    other_opt.load_state_dict(osd)
    _train(other, other_opt, 2)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_from_before_recm_steps_itself_loads() -> None:
    """An optimizer checkpoint whose inner AdamW stepped RECM's group: its moments are taken over; SGD's are dropped."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, 2)
    osd = copy.deepcopy(opt.state_dict())
    own = [i for i, e in osd["state"].items() if "recm_exp_avg" in e]
    for i in own:  # what an older release saved: the inner AdamW's state, no recm_exp_avg keys
        e = osd["state"][i]
        osd["state"][i] = {**{k: v for k, v in e.items() if not k.startswith(("recm_exp", "recm_step"))},
                           "step": e["recm_step"].clone(), "exp_avg": e["recm_exp_avg"].clone(),
                           "exp_avg_sq": e["recm_exp_avg_sq"].clone()}
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict())
    fresh_opt = _wrap(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    fresh_opt.load_state_dict(osd)
    _train(model, opt, 1)
    _train(fresh, fresh_opt, 1)
    for p, q in zip(_recm_params(model), _recm_params(fresh)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not any(p in fresh_opt.state for g in fresh_opt.param_groups if g.get("recm") for p in g["params"])
    # an inner SGD-momentum state for RECM's parameters is not Adam's: RECM starts its moments afresh
    sgd_model = TinyNet()
    sgd_opt = _wrap(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=1e-2, momentum=0.9))
    _train(sgd_model, sgd_opt, 1)
    osd = copy.deepcopy(sgd_opt.state_dict())
    for i, e in osd["state"].items():
        if "recm_exp_avg" in e:
            osd["state"][i] = {**{k: v for k, v in e.items() if not k.startswith(("recm_exp", "recm_step"))},
                               "momentum_buffer": torch.zeros_like(e["recm_exp_avg"])}
    sgd_opt.load_state_dict(osd)
    assert not sgd_opt._modstep.state and not any(
        p in sgd_opt.state for g in sgd_opt.param_groups if g.get("recm") for p in g["params"])


def test_corrupt_moments_are_named_and_change_nothing() -> None:
    """A NaN or mis-shaped RECM moment: ValueError naming the parameter and key; the optimizer is unchanged."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    _train(model, opt, 2)
    for bad in (lambda e: e["recm_exp_avg"].fill_(float("nan")), lambda e: e.__setitem__("recm_exp_avg_sq",
                                                                                          torch.zeros(2)),
                lambda e: e.pop("recm_step")):
        osd = copy.deepcopy(opt.state_dict())
        entry = next(e for e in osd["state"].values() if "recm_layer" in e and e["recm_layer"] == "dec")
        bad(entry)
        before = [(p, {k: v.clone() for k, v in st.items()}) for p, st in opt._modstep.state.items()]
        with pytest.raises(ValueError, match=r"dec\.w_beta.*recm_"):
            opt.load_state_dict(osd)
        for p, saved in before:
            assert all(torch.equal(saved[k], opt._modstep.state[p][k]) for k in saved)


def test_a_scheduler_stepped_per_epoch_is_named() -> None:
    """A length read from a scheduler that steps once per 10 optimizer steps: one warning saying it counts epochs."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    with pytest.warns(UserWarning, match=r"run length 5 came from CosineAnnealingLR.*once per epoch"):
        for k in range(20):
            _train(model, opt, 1)
            if k % 10 == 9:
                sched.step()
    assert "total_steps=5" in repr(opt)


def test_warnings_point_at_the_users_line() -> None:
    """A warning raised deep in the step (a layer that did not run) names this file, not torch's or recm_opt's."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, _ = batch(seed=0)
    with pytest.warns(UserWarning, match=r"layer 'dec' did not run") as record:
        model.enc(x).pow(2).mean().backward()
        opt.step(target=x[:, 0])
    assert all(w.filename == __file__ for w in record if "did not run" in str(w.message))


def test_a_checkpoint_whose_h_exceeds_its_history_is_refused() -> None:
    """||h||^2 <= t noise_var (Cauchy-Schwarz) holds after training on broken data; an h edited to 1e30 is refused."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    _train(model, opt, 30)
    for mod in (model.enc.recm_modulation, model.dec.recm_modulation):
        assert float(mod.h.double().pow(2).sum()) <= int(mod.t) * float(mod.noise_var) * (1 + 1e-5)
    sd = model.state_dict()
    TinyNet(seed=1).load_state_dict(sd)  # loads back
    bad = dict(sd)
    bad["dec.recm_modulation.h"] = torch.full_like(sd["dec.recm_modulation.h"], 1e30)
    fresh = TinyNet(seed=1)
    with pytest.raises(ValueError, match=r"dec\.recm_modulation\.h is larger than its own history allows"):
        fresh.load_state_dict(bad)
    assert not hasattr(fresh.dec, "recm_modulation")


def test_the_cancelling_output_bias_never_moves() -> None:
    """r_theta's output bias cancels in l_theta: RECM never steps it, however long it trains (no drift)."""
    model = TinyNet()
    opt = _wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = [m.recm_modulation.r_theta[2].bias.detach().clone() for m in (model.enc, model.dec)]
    start = _recm_params(model)
    _train(model, opt, 8)
    for m, b in zip((model.enc, model.dec), before):
        assert m.recm_modulation.cancelling_parameters() == [m.recm_modulation.r_theta[2].bias]
        assert torch.equal(m.recm_modulation.r_theta[2].bias, b)
    assert any(not torch.equal(p, q) for p, q in zip(_recm_params(model), start))  # the others did move
