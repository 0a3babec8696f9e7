"""RECMOptimizer behaves like a native torch optimizer.

Each test trains a tiny noise-free vector model for a few steps; nothing here
depends on the RECM maths, only on how the wrapper plugs into torch's optimizer
machinery (param groups, hooks, schedulers, closures, third-party optimizers).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny import TinyNet, batch, example
from torch import Tensor, nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer
from recm_opt.schedule import modulation_lr


def wrap(model: nn.Module, inner: torch.optim.Optimizer, **kw: object) -> RECMOptimizer:
    return RECMOptimizer(inner, model, target=recm.Vector("b xyz"), a=0.1, example=example(model), **kw)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> Tensor:
    x, y = batch(seed=seed)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if isinstance(opt, RECMOptimizer):
        opt.step(target=y)
    else:
        opt.step()
    opt.zero_grad()
    return loss.detach()


# ----------------------------------------------------------------------------- 1. identity
def test_wrapper_is_a_real_optimizer_sharing_the_inner_groups() -> None:
    """isinstance holds, Optimizer.__init__ ran, groups and state are the inner's, no attribute forwarding."""
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    opt = wrap(model, inner)
    assert isinstance(opt, torch.optim.Optimizer)
    # Attributes that only Optimizer.__init__ creates.
    assert isinstance(opt._optimizer_step_pre_hooks, dict) and isinstance(opt._optimizer_state_dict_pre_hooks, dict)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert "__getattr__" not in dir(type(opt))
    with pytest.raises(AttributeError):
        opt.fused_kernels  # noqa: B018 - an inner-only name must not resolve through the wrapper
    # The inner fused AdamW can take a grad scale, but the wrapper must be unscaled by GradScaler itself.
    assert inner._step_supports_amp_scaling is True
    assert opt._step_supports_amp_scaling is False
    recm_groups = [g for g in opt.param_groups if g.get("recm")]
    assert len(recm_groups) == 1 and recm_groups[0]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- 2. schedulers
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SWALR": lambda o: SWALR(o, swa_lr=0.01, anneal_epochs=3),
}


def _scheduled_lrs(wrapped: bool, name: str, steps: int = 4, used: list[float] | None = None) -> list[list[float]]:
    model = TinyNet()
    params = [p for n, p in model.named_parameters()]
    inner = torch.optim.AdamW(params, lr=0.05)
    opt = wrap(model, inner) if wrapped else inner
    sched = SCHEDULERS[name](opt)
    lrs = []
    for i in range(steps):
        train_step(model, opt, seed=i)
        if used is not None:  # RECM's group holds the step size RECM just used
            used.append(opt.param_groups[-1]["lr"])
            assert used[-1] == pytest.approx(modulation_lr(i, opt.lr, opt.total_steps))
        if name == "ReduceLROnPlateau":
            sched.step(1.0)  # a flat metric: the plateau rule fires every step
        else:
            sched.step()
        lrs.append([g["lr"] for g in inner.param_groups])
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_on_wrapper_changes_inner_learning_rates(name: str) -> None:
    """A scheduler attached to the wrapper drives the inner groups exactly as on the bare optimizer.

    RECM's group keeps RECM's own step size (its schedule, not the scheduler's): it is what RECM used.
    """
    used: list[float] = []
    wrapped, bare = _scheduled_lrs(True, name, used=used), _scheduled_lrs(False, name)
    assert [lrs[0] for lrs in wrapped] == [lrs[0] for lrs in bare]
    assert len({lrs[0] for lrs in wrapped}) > 1, "the schedule never changed the learning rate"
    assert len(used) == 4


# ----------------------------------------------------------------------------- 3. hooks
def test_step_hooks_fire_exactly_once_per_step() -> None:
    """Pre- and post-hooks on the wrapper, and the inner's own hooks, fire once per step."""
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = wrap(model, inner)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    inner.register_step_pre_hook(lambda *_: calls.append("inner-pre"))
    for i in range(3):
        train_step(model, opt, seed=i)
    assert calls == ["pre", "inner-pre", "post"] * 3


# ----------------------------------------------------------------------------- 4. inner optimizers
def _third_party(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name.startswith("torch_optimizer."):
        mod = pytest.importorskip("torch_optimizer")
    else:
        mod = pytest.importorskip("pytorch_optimizer")
    return getattr(mod, name.split(".")[1])


def _fused_adamw(params: object, **kw: object) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, fused=True, **kw)  # type: ignore[arg-type]
    except RuntimeError as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fused AdamW is not supported on CPU in this torch: {err}")


INNER: dict[str, Callable[[object], torch.optim.Optimizer]] = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "AdamW-fused": lambda p: _fused_adamw(p, lr=1e-2),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "torch_optimizer.Lamb": lambda p: _third_party("torch_optimizer.Lamb")(p, lr=1e-2),
    "torch_optimizer.RAdam": lambda p: _third_party("torch_optimizer.RAdam")(p, lr=1e-2),
    "pytorch_optimizer.Lion": lambda p: _third_party("pytorch_optimizer.Lion")(p, lr=1e-3),
}


@pytest.mark.parametrize("name", list(INNER))
def test_inner_state_keys_match_an_unwrapped_run(name: str) -> None:
    """The wrapped optimizer trains, and its state holds exactly the keys of an unwrapped run."""
    bare_model, model = TinyNet(), TinyNet()
    bare = INNER[name](bare_model.parameters())
    inner = INNER[name](model.parameters())
    opt = wrap(model, inner)
    for i in range(3):
        train_step(bare_model, bare, seed=i)
        train_step(model, opt, seed=i)
    # Unattached, the unconstrained weights get no gradient (Adagrad still makes their state eagerly).
    bare_keys = {n: set(bare.state[p]) for n, p in bare_model.named_parameters() if bare.state[p]}
    assert {"enc.weight", "dec.weight"} <= set(bare_keys)
    wrapped = dict(model.named_parameters())
    assert {n: set(inner.state[wrapped[n]]) for n in bare_keys} == bare_keys
    # Every other model parameter gets the same kind of state; RECM's own parameters get none there
    # (RECM steps them itself).
    (expected,) = {frozenset(k) for k in bare_keys.values()}
    own = {id(p) for g in opt.param_groups if g.get("recm") for p in g["params"]}
    assert len(inner.state) == len(wrapped) - len(own) and not any(id(p) in own for p in inner.state)
    for st in inner.state.values():
        assert set(st) == expected
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(model.enc.recm_modulation.t) == 3


# ----------------------------------------------------------------------------- 5. closure, zero_grad, groups
def test_closure_is_evaluated_once_and_its_loss_returned() -> None:
    """step(closure) calls the closure exactly once, with grad enabled, and returns its loss."""
    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = batch()
    calls = []

    def closure() -> Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.observe(y)
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, Tensor) and torch.isfinite(loss)
    assert int(model.enc.recm_modulation.t) == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_is_forwarded(set_to_none: bool) -> None:
    """zero_grad(set_to_none) clears every gradient the inner optimizer owns, as asked."""
    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
    train_step(model, opt)  # materialises r_theta
    x, y = batch()
    (model(x) - y).pow(2).mean().backward()
    opt.observe(y)
    opt.zero_grad(set_to_none=set_to_none)
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if set_to_none:
        assert all(p.grad is None for p in params)
    else:
        assert all(p.grad is None or not p.grad.any() for p in params)
        assert any(p.grad is not None for p in params)


def test_add_param_group_reaches_inner_and_can_be_scheduled() -> None:
    """A group added to the wrapper lands in the inner optimizer, trains, and follows a scheduler."""
    model = TinyNet()
    head = nn.Linear(3, 3)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(model, inner)
    opt.add_param_group({"params": head.parameters(), "lr": 0.2})
    assert opt.param_groups is inner.param_groups and inner.param_groups[-1]["lr"] == 0.2
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = head.weight.detach().clone()
    x, y = batch()
    loss = (head(model(x)) - y).pow(2).mean()
    loss.backward()
    opt.step(target=y)
    opt.zero_grad()
    sched.step()
    assert not torch.equal(before, head.weight)
    assert inner.param_groups[-1]["lr"] == pytest.approx(0.1)


def test_load_state_dict_keeps_groups_shared_and_schedulers_attached() -> None:
    """After load_state_dict the groups are still the inner's; a scheduler made before the load still drives them."""
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = wrap(model, inner)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    groups = opt.param_groups
    train_step(model, opt)
    sched.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is groups and inner.param_groups is groups and opt.state is inner.state
    train_step(model, opt, seed=1)
    sched.step()
    assert [g["lr"] for g in inner.param_groups] == [pytest.approx(0.025)] * 2


def test_state_dict_hooks_on_the_wrapper_run() -> None:
    """state_dict / load_state_dict pre- and post-hooks registered on the wrapper run once each."""
    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd-pre", "sd-post", "load-pre", "load-post"]


# ------------------------------------------------------------------- ecosystem details
def test_fused_sgd_with_momentum_steps_past_the_second_step() -> None:
    """SGD(momentum, fused): r_theta's first gradient arrives a step after w_beta's, and fused SGD still steps."""
    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True))
    for step in range(3):
        train_step(model, opt, seed=step)
    assert int(model.enc.recm_modulation.t) == 3


def test_global_optimizer_step_hooks_fire_once_per_step() -> None:
    """Hooks registered for every optimizer (register_optimizer_step_pre/post_hook) fire once per wrapper step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
    calls: list[str] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(f"pre:{type(o).__name__}")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(f"post:{type(o).__name__}"))]
    try:
        for step in range(2):
            train_step(model, opt, seed=step)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["pre:RECMOptimizer", "post:RECMOptimizer"] * 2


def test_train_and_eval_reach_a_schedule_free_inner_optimizer() -> None:
    """opt.train() / opt.eval() switch a schedule-free inner optimizer between its two points."""
    schedule_free = pytest.importorskip("pytorch_optimizer").ScheduleFreeAdamW
    model = TinyNet()
    inner = schedule_free(model.parameters(), lr=1e-2)
    opt = wrap(model, inner)
    opt.train()
    for step in range(3):
        train_step(model, opt, seed=step)
    before = model.enc.weight.detach().clone()
    opt.eval()
    assert not torch.equal(model.enc.weight, before)  # the eval point (x) differs from the train point (y)
    opt.train()
    torch.testing.assert_close(model.enc.weight, before)


def test_report_measures_symmetry_gaps_only_when_asked() -> None:
    """report() is cheap (no W1 assignment problem); report(gaps=True) adds gap_w1, lipschitz and alpha_bound."""
    pytest.importorskip("scipy")
    model = TinyNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
    train_step(model, opt)
    assert not any("gap_w1" in row for row in opt.report())
    assert all({"gap_w1", "lipschitz", "alpha_bound"} <= set(row) for row in opt.report(gaps=True))


def test_one_cycle_lr_takes_one_max_lr_per_group_including_recms() -> None:
    """OneCycleLR with a per-group max_lr list: one entry per group, the RECM group last."""
    model = TinyNet()
    opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert [bool(g.get("recm")) for g in opt.param_groups] == [False, True]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 1e-3], total_steps=10)
    train_step(model, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] > 10 * opt.param_groups[1]["lr"] * 0.99
