"""Misuse and fault cases, third round: each ends with the right result or a clear error, nothing half-applied.

Outliers and the model's own state_dict, load order, ``detach()``, weight tying, threads,
per-group schedules, absurd checkpoint values, pairing, shared and frozen layers,
wrapped inner optimizers, tuple outputs and hostile checkpoints.
"""

from __future__ import annotations

import copy
import io
import threading
import time
import warnings
from typing import Any

import pytest
import torch
from tiny import TinyNet, TinyVectorLinear, batch, example, train_steps
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.modulation import config_from, config_to_tensor
from recm_opt.optimizer import RECMOptimizer


def build(seed: int = 0, inner: Any = None, model: nn.Module | None = None, **kw: Any
          ) -> tuple[nn.Module, RECMOptimizer]:
    torch.manual_seed(seed)
    model = TinyNet() if model is None else model
    make = inner or (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    kw.setdefault("total_steps", 100)
    opt = RECMOptimizer(make(model.parameters()), model, target=recm.Vector("b xyz"), a=0.1,
                        example=example(model), **kw)
    return model, opt


def mods(model: nn.Module) -> list[Any]:
    return [m.recm_modulation for m in model.modules() if recm.is_relaxed(m)]


def eval_out(model: nn.Module, x: Tensor) -> Tensor:
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(mode)
    return out


def tensors(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------- 1. one outlier
def _outlier_step(model: nn.Module, opt: RECMOptimizer, scale: float) -> None:
    """One sample scaled by ``scale`` runs through the model but is kept out of the loss."""
    x, y = batch(16, seed=99)
    x = x.clone()
    x[0] *= scale
    (model(x)[1:] - y[1:]).pow(2).mean().backward()
    opt.step(target=y)
    opt.zero_grad()


def test_state_dict_after_an_outlier_loads_back() -> None:
    """A model whose state an outlier poisoned still loads its own state_dict, exactly."""
    model, opt = build()
    train_steps(model, opt, range(3))
    _outlier_step(model, opt, 1e30)
    sd = model.state_dict()
    fresh = TinyNet(seed=5)
    fresh.load_state_dict(sd)
    assert_same(tensors(fresh), tensors(model))


def test_one_outlier_capture_does_not_steer_h() -> None:
    """A capture scaled by 1e30 leaves h and noise_var finite and within their clean run's order of magnitude."""
    model, opt = build()
    train_steps(model, opt, range(12))  # the cap needs a history of 10 captures
    clean, clean_opt = build()
    train_steps(clean, clean_opt, range(12))
    _outlier_step(model, opt, 1e30)
    x, y = batch(16, seed=99)
    (clean(x)[1:] - y[1:]).pow(2).mean().backward()
    clean_opt.step(target=y)
    for m, c in zip(mods(model), mods(clean)):
        assert torch.isfinite(m.noise_var) and torch.isfinite(m.h.norm())
        assert float(m.h.norm()) <= 10 * float(c.h.norm()) + 1e-6


# ------------------------------------------------------------------- 3. load order
def _saved_with(alpha_fn: str, prune_z: float) -> dict[str, Tensor]:
    model, opt = build(alpha_fn=alpha_fn, prune_z=prune_z)
    train_steps(model, opt, range(6))
    return model.state_dict()


@pytest.mark.filterwarnings("ignore:.*settings are replaced")
def test_load_order_does_not_change_the_model() -> None:
    """Build-then-load and load-then-build give the same model: the optimizer's settings, in both orders."""
    sd = _saved_with("gelu", 0.0)
    x = batch(8, seed=40)[0]
    first = TinyNet(seed=3)
    _, opt_first = build(model=first)  # build, then load
    first.load_state_dict(sd)
    second = TinyNet(seed=3)
    second.load_state_dict(sd)  # load, then build
    _, opt_second = build(model=second)
    for m1, m2 in zip(mods(first), mods(second)):
        assert (m1.alpha_fn, m1.prune_z, m1.prune_eps) == (m2.alpha_fn, m2.prune_z, m2.prune_eps) == \
            ("odd_gelu", 3.0, 0.01)
    torch.testing.assert_close(eval_out(first, x), eval_out(second, x), atol=0, rtol=0)


def test_load_order_warns_naming_the_replaced_settings() -> None:
    """Either order names the checkpoint's settings that the optimizer's replace."""
    sd = _saved_with("gelu", 0.0)
    model = TinyNet(seed=3)
    _, opt = build(model=model)
    with pytest.warns(UserWarning, match=r"prune_z=0\.0 -> 3\.0.*alpha_fn='gelu' -> 'odd_gelu'"):
        model.load_state_dict(sd)
    model = TinyNet(seed=3)
    model.load_state_dict(sd)
    assert mods(model)[0].alpha_fn == "gelu"  # no optimizer: the checkpoint's own
    with pytest.warns(UserWarning, match=r"prune_z=0\.0 -> 3\.0.*alpha_fn='gelu' -> 'odd_gelu'"):
        build(model=model)
    assert opt is not None


# ------------------------------------------------------------------- 4. detach
def test_detached_model_stays_what_export_bakes_under_plain_training() -> None:
    """After detach(), plain training moves no modulation parameter; train and eval outputs equal export's."""
    model, opt = build()
    train_steps(model, opt, range(8))
    opt.detach()
    kept = [m.live for m in mods(model)]
    frozen = [[p.clone() for p in m.parameters()] for m in mods(model)]
    plain = torch.optim.AdamW(model.parameters(), lr=1e-1)
    for step in range(10):
        x, y = batch(16, seed=step)
        (model(x) - y).pow(2).mean().backward()
        plain.step()
        opt.inner.step()  # the detached optimizer's inner one too
        plain.zero_grad()
        opt.inner.zero_grad()
    for m, ps in zip(mods(model), frozen):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ps))
        assert float(m.w_alpha.norm(dim=1).max()) <= 1
    assert [m.live for m in mods(model)] == kept
    x = batch(8, seed=50)[0]
    exported = recm.export(model)
    torch.testing.assert_close(eval_out(model, x), eval_out(exported, x))
    with torch.no_grad():
        torch.testing.assert_close(model(x), exported(x))  # training mode: the same function


def test_new_optimizer_after_detach_trains_the_modulation_again() -> None:
    """A RECMOptimizer built after detach() unfreezes the modulations it adopts."""
    model, opt = build()
    train_steps(model, opt, range(2))
    opt.detach()
    model2, opt2 = build(model=model)
    before = [m.w_beta.clone() for m in mods(model)]
    train_steps(model, opt2, range(2, 5))
    assert all(m.w_beta.requires_grad for m in mods(model))
    assert any(not torch.equal(m.w_beta, b) for m, b in zip(mods(model), before))


# ------------------------------------------------------------------- 5. weight tying
class _Tied(nn.Module):
    """One tagged layer applied ``calls`` times per forward."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.layer = TinyVectorLinear(4, 4, seed=1)
        self.calls = calls

    def forward(self, z: Tensor) -> Tensor:
        for _ in range(self.calls):
            z = torch.tanh(self.layer(z))
        return z[:, 0]


def test_layer_called_twenty_times_per_forward_uses_every_call() -> None:
    """A weight-tied layer run 20 times per forward: every call's capture reaches h, none is dropped."""
    model = _Tied(20)
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                        a=0.1, example=torch.zeros(1, 4, 3))
    x, y = batch(16)
    (model(x) - y).pow(2).mean().backward()
    assert len(opt._book.records) == 20
    opt.step(target=y)
    assert opt.report()[0]["dropped"] == 0


def test_forwards_whose_graph_is_gone_are_dropped_at_once() -> None:
    """Forwards in training mode whose outputs are thrown away (no backward possible) hold no capture."""
    model, opt = build()
    for i in range(40):
        model(batch(8, seed=100 + i)[0])
    # each layer's latest captures at most (a capture's input can hold the previous layer's graph one forward longer)
    assert len(opt._book.records) <= 4


# ------------------------------------------------------------------- 6. threads
def test_global_step_hooks_of_other_threads_always_fire() -> None:
    """While RECM's inner optimizer steps, a plain optimizer in another thread sees every process-wide step hook."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    fired = {"pre": 0, "post": 0}
    lock = threading.Lock()

    def count(key: str) -> Any:
        def hook(*_: Any) -> None:
            with lock:
                fired[key] += 1
        return hook

    handles = [register_optimizer_step_pre_hook(count("pre")), register_optimizer_step_post_hook(count("post"))]
    done = threading.Event()
    steps = [0]

    def run() -> None:
        p = nn.Parameter(torch.zeros(3))
        other = torch.optim.SGD([p], lr=0.1)
        while not done.is_set():
            p.grad = torch.ones(3)
            other.step()
            steps[0] += 1

    try:
        model, opt = build()
        opt.inner.register_step_pre_hook(lambda *_: time.sleep(2e-3))  # the other thread runs inside inner steps
        thread = threading.Thread(target=run)
        thread.start()
        try:
            train_steps(model, opt, range(10))
        finally:
            done.set()
            thread.join()
    finally:
        for h in handles:
            h.remove()
    assert steps[0] > 10
    assert fired == {"pre": steps[0] + 10, "post": steps[0] + 10}


def test_inner_hooks_and_scheduler_bookkeeping_stay_right() -> None:
    """The inner optimizer's own hooks fire once per step, and a scheduler on it sees its step."""
    model, opt = build()
    calls: list[str] = []
    opt.inner.register_step_pre_hook(lambda *_: calls.append("inner-pre"))
    opt.inner.register_step_post_hook(lambda *_: calls.append("inner-post"))
    opt.register_step_pre_hook(lambda *_: calls.append("outer-pre"))
    sched = torch.optim.lr_scheduler.StepLR(opt.inner, 1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be an error
        train_steps(model, opt, range(1))
        sched.step()
    assert calls == ["outer-pre", "inner-pre", "inner-post"]


# ------------------------------------------------------------------- 7. per-group schedules
def test_empty_inner_group_keeps_its_place_for_per_group_schedules() -> None:
    """(no_decay: empty, model, head) + RECM: a 4-lambda LambdaLR applies each lambda to its own group."""
    model = TinyNet()
    inner = torch.optim.AdamW([{"params": [], "weight_decay": 0.0}, {"params": model.enc.parameters()},
                               {"params": model.dec.parameters()}], lr=1.0)
    opt = RECMOptimizer(inner, model, target=recm.Vector("b xyz"), a=0.1, total_steps=100,
                        example=example(model))
    assert len(opt.param_groups) == 4 and opt.param_groups[0]["params"] == []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.1, lambda s: 0.2, lambda s: 0.3, lambda s: 0.4])
    assert [g["lr"] / g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert opt.param_groups[3].get("recm") and sched.last_epoch == 0


# ------------------------------------------------------------------- 8. absurd checkpoint values
def _config_with(sd: dict[str, Any], **change: Any) -> dict[str, Any]:
    key = "enc.recm_modulation._extra_state"
    config = config_from(sd[key])
    config.update(change)
    return {**sd, key: config_to_tensor(config)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prune_eps": float("nan")}, r"prune_eps must be in \[0, 1\), got nan"),
        ({"prune_eps": 5}, r"prune_eps must be in \[0, 1\), got 5"),
        ({"prune_eps": -1}, r"prune_eps must be in \[0, 1\), got -1"),
        ({"prune_z": float("nan")}, r"prune_z must be >= 0, got nan"),
        ({"prune_z": -3}, r"prune_z must be >= 0, got -3"),
        ({"alpha_fn": "relu"}, r"alpha_fn must be one of"),
        ({"train_all_live": "no"}, r"train_all_live must be true or false"),
        ({"kind": "mystery"}, r"kind 'mystery'"),
        ({"terms": ["a", "b"]}, r"terms"),
    ],
)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-model", "with-optimizer"])
def test_loaded_config_is_validated_as_the_constructor_validates(change: dict[str, Any], message: str,
                                                                 fresh: bool) -> None:
    """A configuration the constructor would refuse fails the load naming the key, and changes nothing."""
    model, opt = build()
    train_steps(model, opt, range(2))
    bad = _config_with(model.state_dict(), **change)
    target = TinyNet(seed=4) if fresh else build(seed=4)[0]
    before = tensors(target)
    with pytest.raises(ValueError, match=r"enc\.recm_modulation\._extra_state: .*" + message):
        target.load_state_dict(bad)
    assert_same(tensors(target), before)
    if fresh:
        assert not hasattr(target.enc, "recm_modulation")


def test_constructor_and_loader_accept_the_same_settings() -> None:
    """For each setting value, the constructor refuses it exactly when a loaded configuration does."""
    model, opt = build()
    sd = model.state_dict()
    for key, values in {"prune_eps": [0.0, 0.5, 0.999, 1.0, -0.1, float("inf")],
                        "prune_z": [0.0, 3.0, 1e3, -1e-9, float("inf")],
                        "alpha_fn": ["gelu", "odd_gelu", "tanh"]}.items():
        for v in values:
            try:
                m = TinyNet()
                RECMOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, target=recm.Vector("b xyz"),
                              example=example(m), total_steps=100, **{key: v})
                built = True
            except (TypeError, ValueError):
                built = False
            try:
                TinyNet().load_state_dict(_config_with(sd, **{key: v}))
                loaded = True
            except ValueError:
                loaded = False
            assert built == loaded, (key, v)


# ------------------------------------------------------------------- 9. pairing, added and frozen layers
def test_second_target_for_an_already_paired_forward_is_an_error() -> None:
    """observe(y) then step(target=other): the forward already has its target; the step changes nothing."""
    model, opt = build()
    x, y = batch(16)
    (model(x) - y).pow(2).mean().backward()
    opt.observe(y)
    before = tensors(model)
    with pytest.raises(ValueError, match=r"already paired with a target"):
        opt.step(target=y + 1)
    assert_same(tensors(model), before)
    opt.step(target=y)  # the same target again is no conflict
    assert int(mods(model)[0].t) == 1


def test_tagged_layer_added_after_construction_is_named() -> None:
    """A @relaxed layer added after the optimizer was built is named by a warning at the first step."""
    model, opt = build()
    model.head = TinyVectorLinear(1, 1, seed=9)
    with pytest.warns(UserWarning, match=r"\['head'\] are @relaxed but were added"):
        train_steps(model, opt, range(1))


def test_frozen_tagged_layer_keeps_its_output() -> None:
    """A tagged layer whose parameters are all frozen, behind a trained one, keeps its function."""
    model, opt = build()
    for p in model.dec.parameters():
        p.requires_grad_(False)
    z = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(0))
    before = eval_out(model.dec, z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "did not run in training mode" warning for it
        train_steps(model, opt, range(5))
    assert float(mods(model)[0].h.norm()) > 0
    assert float(mods(model)[1].h.norm()) == 0
    torch.testing.assert_close(eval_out(model.dec, z), before, atol=0, rtol=0)


# ------------------------------------------------------------------- 10. shared with another model
def test_layer_shared_with_a_plainly_trained_model_gives_a_clear_error() -> None:
    """Another model's forward and backward through a shared layer: the error names the shared layer and the fix."""
    model, opt = build()
    other = nn.Sequential(model.enc)
    plain = torch.optim.SGD(other.parameters(), lr=0.01)
    x, y = batch(16)
    other(x).sum().backward()
    plain.step()
    plain.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"layers \['enc'\] ran a forward and backward of their own, without layers "
                                         r"\['dec'\].*shared with another model.*opt\.zero_grad\(\)"):
        opt.step(target=y)
    opt.zero_grad()  # the suggested fix: drops the other model's backed capture
    other(x).sum().backward()
    plain.step()
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step(target=y)
    assert int(mods(model)[0].t) == 1


# ------------------------------------------------------------------- 11. Lookahead
def test_lookahead_inner_optimizer_checkpoints_and_resumes_bit_exactly() -> None:
    """RECM around pytorch_optimizer's Lookahead: state_dict, weights_only load, and a bit-exact resume."""
    lookahead = pytest.importorskip("pytorch_optimizer").Lookahead

    def make(ps: Any) -> torch.optim.Optimizer:
        return lookahead(torch.optim.AdamW(ps, lr=1e-2), k=2, alpha=0.5)

    ref, ref_opt = build(inner=make)
    train_steps(ref, ref_opt, range(6))
    model, opt = build(inner=make)
    train_steps(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model, opt = build(seed=7, inner=make)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.param_groups is opt.inner.param_groups
    train_steps(model, opt, range(3, 6))
    assert_same(tensors(model), tensors(ref))


# ------------------------------------------------------------------- LBFGS's own checkpoint
def test_lbfgs_optimizer_loads_its_own_state_dict() -> None:
    """A RECM+LBFGS state_dict loads into a fresh RECM+LBFGS without the plain-checkpoint warning."""
    def closure_step(model: nn.Module, opt: RECMOptimizer, seed: int) -> None:
        x, y = batch(16, seed=seed)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure, target=y)

    make = lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=3)  # noqa: E731
    model, opt = build(inner=make)
    closure_step(model, opt, 0)
    sd = opt.state_dict()
    model2, opt2 = build(inner=make)
    model2.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    closure_step(model, opt, 1)
    closure_step(model2, opt2, 1)
    assert_same(tensors(model2), tensors(model))


# ------------------------------------------------------------------- 12. unclear errors
@recm.relaxed(inputs=recm.Vector("b c xyz", c=4), terms={"weight": "un"})
class _TwoOutputs(TinyVectorLinear):
    """Returns (vectors, their norms): both outputs are modulated by the same alpha and beta."""

    def equivariant(self, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out = super().equivariant(z)
        return out, out.norm(dim=-1)

    def unconstrained(self, term: str, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out = super().unconstrained(term, z)
        return out, out.norm(dim=-1)


class _TwoOutputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = _TwoOutputs(4, 2, seed=3)

    def forward(self, z: Tensor) -> Tensor:
        vectors, norms = self.layer(z)
        return vectors.sum(1) * norms.sum(1, keepdim=True)


def test_tagged_layer_returning_a_tuple_trains_and_exports() -> None:
    """A layer with several outputs: each output is beta * f_eq + sum alpha f_un; export agrees."""
    model = _TwoOutputNet()
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"), a=0.5,
                        total_steps=100)
    train_steps(model, opt, range(3))
    x = batch(8, seed=30)[0]
    alpha, beta = mods(model)[0].coefficients()
    eq, un = model.layer.equivariant(x), model.layer.unconstrained("weight", x)
    model.eval()
    out = model.layer(x)
    live = mods(model)[0].live[0]
    for o, e, u in zip(out, eq, un):
        torch.testing.assert_close(o, beta * e + (alpha[0] * u if live else 0))
    torch.testing.assert_close(eval_out(model, x), eval_out(recm.export(model), x))


@pytest.mark.parametrize("layer", ["enc", "dec"])
def test_garbage_config_bytes_name_the_key(layer: str) -> None:
    """Bytes that are not UTF-8 JSON in the stored configuration: a ValueError naming the key, nothing loaded."""
    model, _ = build()
    key = f"{layer}.recm_modulation._extra_state"
    sd = {**model.state_dict(), key: torch.tensor([255, 0, 7], dtype=torch.uint8)}
    fresh = TinyNet()  # no optimizer: each layer is checked before its own tensors load
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r": the stored configuration is not"):
        fresh.load_state_dict(sd)
    assert not hasattr(getattr(fresh, layer), "recm_modulation")
    driven, _ = build(seed=3)  # with an optimizer: the whole model is checked first
    before = tensors(driven)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        driven.load_state_dict(sd)
    assert_same(tensors(driven), before)


def test_partial_load_without_h_gives_no_old_version_hint() -> None:
    """strict=False without h reports h as missing, with no "saved by recm_opt 0.1" warning."""
    model, opt = build()
    train_steps(model, opt, range(2))
    sd = model.state_dict()
    del sd["enc.recm_modulation.h"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = TinyNet().load_state_dict(sd, strict=False)
    assert result.missing_keys == ["enc.recm_modulation.h"]


def test_optimizer_checkpoint_of_another_state_dim_is_refused_before_loading() -> None:
    """An optimizer-only load from a model with another state_dim fails naming the entry, and changes nothing."""
    small, small_opt = build(state_dim=8)
    train_steps(small, small_opt, range(2))
    model, opt = build()
    train_steps(model, opt, range(1))
    before = copy.deepcopy(opt.inner.state_dict())
    with pytest.raises(ValueError, match=r"(?s)enc\.w_alpha.*\(1, 8\)|\(1, 8\).*enc\.w_alpha"):
        opt.load_state_dict(small_opt.state_dict())
    after = opt.inner.state_dict()
    assert all(torch.equal(before["state"][i]["exp_avg"], after["state"][i]["exp_avg"]) for i in before["state"])


def test_bad_rng_entry_fails_before_the_inner_state_loads() -> None:
    """A corrupt generator state in an optimizer checkpoint: a ValueError naming it, the inner state untouched."""
    model, opt = build()
    train_steps(model, opt, range(2))
    sd = opt.state_dict()
    for entry in sd["state"].values():
        if "recm_rng" in entry:
            entry["recm_rng"] = torch.zeros(3, dtype=torch.uint8)
    fresh, fresh_opt = build(seed=1)
    with pytest.raises(ValueError, match=r"recm_rng: expected a CPU generator state"):
        fresh_opt.load_state_dict(sd)
    assert not fresh_opt.state


def test_deep_copy_of_the_optimizer_says_how_to_copy_a_run() -> None:
    """copy.deepcopy(opt) and pickling fail with a TypeError that says to use state_dicts."""
    _, opt = build()
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict"):
        copy.deepcopy(opt)


class _TrainOnlyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyVectorLinear(4, 4, seed=1)
        self.aux = recm.relaxed(TinyVectorLinear(4, 1, seed=2), inputs=recm.Vector("b c xyz"))

    def forward(self, z: Tensor) -> Tensor:
        z = self.body(z)
        return self.aux(z)[:, 0] if self.training else z[:, 0]


def test_example_that_misses_a_training_only_head_says_why() -> None:
    """example= runs in eval mode: a head that runs only in training says so, and how to declare sizes."""
    model = _TrainOnlyHead()
    with pytest.raises(ValueError, match=r"\['aux'\] did not run.*eval mode.*only in training mode"):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                      example=torch.zeros(1, 4, 3))


def test_failed_construction_leaves_the_model_as_it_was() -> None:
    """An inner optimizer that refuses RECM's param group: the model keeps no modulation and no hook."""
    class Refusing(torch.optim.SGD):
        def add_param_group(self, param_group: dict[str, Any]) -> None:
            if param_group.get("recm"):
                raise ValueError("this optimizer takes no more groups")
            super().add_param_group(param_group)

    model = TinyNet()
    with pytest.raises(ValueError, match="no more groups"):
        RECMOptimizer(Refusing(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                      example=example(model))
    assert not hasattr(model.enc, "recm_modulation") and not model.enc._forward_pre_hooks


# ------------------------------------------------------------------- 13. sizes before allocation
@pytest.mark.parametrize("key", ["hidden", "in_features", "state_dim"])
def test_checkpoint_config_cannot_make_the_load_allocate(key: str) -> None:
    """A config edited to size 16000 fails at once, naming the key, before any modulation is built."""
    model, _ = build()
    bad = _config_with(model.state_dict(), **{key: 16000})
    fresh = TinyNet()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"enc\.recm_modulation\.\S+: the saved configuration .* gives"):
        fresh.load_state_dict(bad)
    assert time.perf_counter() - start < 1.0
    assert not hasattr(fresh.enc, "recm_modulation")


def test_config_without_its_tensors_cannot_size_a_new_modulation() -> None:
    """A partial checkpoint (strict=False) without r_theta: the config alone never sizes an allocation."""
    model, _ = build()
    bad = {k: v for k, v in _config_with(model.state_dict(), hidden=16000).items() if "r_theta" not in k}
    fresh = TinyNet()
    with pytest.raises(ValueError, match=r"enc\.recm_modulation\.r_theta\.0\.weight is missing"):
        fresh.load_state_dict(bad, strict=False)
    assert not hasattr(fresh.enc, "recm_modulation")
