"""RECM's state belongs to the model: saving, loading, copying, attaching and detaching.

h, t and gamma_t are persistent buffers of each layer's modulation, next to its
parameters, so ``model.state_dict()`` alone reproduces a trained model; the
optimizer's own state is keyed by layer name; no lazy parameter is ever visible;
a second optimizer takes over from the first; every checkpoint is checked whole
before anything changes.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from tiny import TinyNet, TinyVectorLinear, batch, example, train_steps
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer


def build(model: nn.Module | None = None, **kw: Any) -> tuple[nn.Module, RECMOptimizer]:
    model = TinyNet() if model is None else model
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                        a=0.1, example=example(model), **kw)
    return model, opt


def trained(steps: int = 4, **kw: Any) -> tuple[nn.Module, RECMOptimizer]:
    model, opt = build(**kw)
    train_steps(model, opt, range(steps))
    return model, opt


def eval_output(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


def rows(model: nn.Module) -> list[dict[str, Any]]:
    from recm_opt.export import layer_row

    return [layer_row(n, m) for n, m in model.named_modules() if recm.is_relaxed(m)]


def through_bytes(obj: Any, weights_only: bool = True) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


# ------------------------------------------------------------------- the model alone
def test_model_state_dict_alone_reproduces_eval_outputs_report_and_export() -> None:
    """A fresh model that loads model.state_dict() (no optimizer) gives the trained eval outputs, report and export."""
    model, _ = trained(steps=6, prune_eps=1e-4, prune_z=0.0)  # few steps: the |alpha| test alone keeps terms
    x = batch(8, seed=99)[0]
    sd = through_bytes(model.state_dict())
    assert {"enc.recm_modulation.h", "enc.recm_modulation.t", "enc.recm_modulation.gamma_t"} <= set(sd)
    fresh = TinyNet(seed=3)  # another init: everything must come from the checkpoint
    fresh.load_state_dict(sd)
    assert int(fresh.enc.recm_modulation.t) == 6 and fresh.enc.recm_modulation.h.abs().max() > 0
    torch.testing.assert_close(eval_output(fresh, x), eval_output(model, x), rtol=0, atol=0)
    assert rows(fresh) == rows(model)
    assert any(row["kept"] for row in rows(model)), "the check needs a kept term to mean something"
    torch.testing.assert_close(recm.export(fresh)(x), recm.export(model)(x), rtol=0, atol=0)


def test_optimizer_built_after_loading_continues_the_models_state() -> None:
    """Loading the model first (Lightning's order), then building the optimizer, continues h and t."""
    model, opt = trained(steps=3)
    sd, osd = through_bytes(model.state_dict()), through_bytes(opt.state_dict())
    ref_model, ref_opt = copy.deepcopy(model), None
    fresh = TinyNet(seed=7)
    fresh.load_state_dict(sd)
    new_opt = RECMOptimizer(torch.optim.AdamW(fresh.parameters(), lr=1e-2), fresh, target=recm.Vector("b xyz"),
                            a=0.1)  # no example needed: the loaded modulations know their widths
    new_opt.load_state_dict(osd)
    assert [len(g["params"]) for g in new_opt.param_groups] == [len(g["params"]) for g in opt.param_groups]
    train_steps(fresh, new_opt, range(3, 5))
    train_steps(model, opt, range(3, 5))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        if isinstance(a, Tensor):
            assert torch.equal(a, b)
    del ref_model, ref_opt


def test_optimizer_state_entries_name_their_layers_and_unknown_names_are_rejected() -> None:
    """Each RECM entry carries its layer name; an entry for a layer this optimizer lacks is an error."""
    model, opt = trained(steps=2)
    osd = opt.state_dict()
    names = sorted(e["recm_layer"] for e in osd["state"].values() if "recm_layer" in e)
    assert names == ["dec", "enc"]
    bad = copy.deepcopy(osd)
    entry = next(e for e in bad["state"].values() if e.get("recm_layer") == "enc")
    entry["recm_layer"] = "encoder"
    with pytest.raises(ValueError, match=r"layers \['encoder'\].*does not modulate"):
        opt.load_state_dict(bad)


class Reordered(nn.Module):
    """TinyNet's layers registered in the other order (same names)."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = TinyVectorLinear(6, 1, seed=2)
        self.enc = TinyVectorLinear(4, 6, seed=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(z)))[:, 0]


def test_reordered_layers_keep_their_own_state() -> None:
    """A model whose layers are registered in another order loads each layer's h by name, never by position."""
    model, _ = trained(steps=3)
    other = Reordered()
    other.load_state_dict(model.state_dict())
    for name in ("enc", "dec"):
        a, b = getattr(other, name).recm_modulation, getattr(model, name).recm_modulation
        assert torch.equal(a.h, b.h) and torch.equal(a.r_theta[0].weight, b.r_theta[0].weight)


def test_smaller_state_dim_is_rejected_naming_the_key_and_loads_nothing() -> None:
    """A checkpoint with state_dim 8 into a model built with 16 fails naming the key; no tensor changed."""
    small, _ = trained(steps=2, state_dim=8)
    model, _ = build()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    with pytest.raises(ValueError, match=r"enc\.recm_modulation\.\w+: .*(shape|state_dim=8)"):
        model.load_state_dict(small.state_dict())
    for k, v in model.state_dict().items():
        if isinstance(v, Tensor):
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("key", "value", "message"), [
    ("dec.recm_modulation.h", float("nan"), r"dec\.recm_modulation\.h holds NaN"),
    ("dec.recm_modulation.t", -1, r"dec\.recm_modulation\.t must be one integer >= 0"),
    ("dec.recm_modulation.gamma_t", 2.0, r"dec\.recm_modulation\.gamma_t must be one float in \[0, 1\]"),
])
def test_corrupt_model_checkpoint_is_rejected_before_anything_loads(key: str, value: float, message: str) -> None:
    """NaN h, t < 0 or gamma_t outside [0, 1] in the last layer: a ValueError naming the key, nothing loaded."""
    source, _ = trained(steps=2)
    sd = source.state_dict()
    sd[key] = torch.full_like(sd[key], value) if key.endswith(".h") else torch.tensor(value, dtype=sd[key].dtype)
    model, _ = build(TinyNet(seed=4))
    before = [v.clone() for v in model.state_dict().values() if isinstance(v, Tensor)]
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(sd)
    after = [v for v in model.state_dict().values() if isinstance(v, Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_corrupt_optimizer_checkpoint_is_checked_whole_and_changes_nothing() -> None:
    """A NaN newest sample in the second layer's entry: ValueError naming layer and key; state and groups unchanged."""
    model, opt = trained(steps=2)
    osd = copy.deepcopy(opt.state_dict())
    for group in osd["param_groups"]:
        group["lr"] = 123.0
    entry = next(e for e in osd["state"].values() if e.get("recm_layer") == "dec")
    entry["recm_newest"] = (torch.full_like(entry["recm_newest"][0], float("nan")),)
    inner_before = copy.deepcopy(opt.inner.state_dict())
    lrs = [g["lr"] for g in opt.param_groups]
    newest = model.enc.recm_modulation.newest
    with pytest.raises(ValueError, match=r"layer 'dec', recm_newest: holds NaN"):
        opt.load_state_dict(osd)
    assert [g["lr"] for g in opt.param_groups] == lrs
    after = opt.inner.state_dict()
    for k, v in inner_before["state"].items():
        for name, t in v.items():
            assert torch.equal(after["state"][k][name], t)
    assert model.enc.recm_modulation.newest is newest


# ------------------------------------------------------------------- old checkpoints
def legacy_checkpoint(model: nn.Module, opt: RECMOptimizer) -> tuple[dict, dict]:
    """What recm_opt 0.1 saved: h, t, gamma_t only in the optimizer, entries matched by position."""
    sd = {k: v for k, v in model.state_dict().items()
          if not k.endswith((".h", ".t", ".gamma_t", "._extra_state"))}
    osd = copy.deepcopy(opt.state_dict())
    for entry in osd["state"].values():
        name = entry.pop("recm_layer", None)
        if name is not None:
            mod = getattr(model, name).recm_modulation
            entry.update(recm_h=mod.h.clone(), recm_t=mod.t.clone(), recm_gamma=mod.gamma_t.clone())
            entry.pop("recm_dropped")
    return sd, osd


def test_old_format_checkpoint_gives_one_conversion_error_or_converts() -> None:
    """Model-only load of a 0.1 checkpoint says how to convert; model (strict=False) + optimizer loads convert it."""
    model, opt = trained(steps=3)
    sd, osd = legacy_checkpoint(model, opt)
    fresh, fresh_opt = build(TinyNet(seed=9))
    with pytest.warns(UserWarning, match=r"saved by recm_opt 0\.1.*strict=False.*opt\.load_state_dict"), \
            pytest.raises(RuntimeError, match=r"Missing key.*enc\.recm_modulation\.h"):
        fresh.load_state_dict(sd)
    with pytest.warns(UserWarning, match=r"saved by recm_opt 0\.1"):
        fresh.load_state_dict(sd, strict=False)
    fresh_opt.load_state_dict(osd)
    for name in ("enc", "dec"):
        a, b = getattr(fresh, name).recm_modulation, getattr(model, name).recm_modulation
        assert torch.equal(a.h, b.h) and int(a.t) == int(b.t) == 3 and torch.equal(a.gamma_t, b.gamma_t)
    x = batch(8, seed=5)[0]
    torch.testing.assert_close(eval_output(fresh, x), eval_output(model, x), rtol=0, atol=0)


# ------------------------------------------------------------------- no lazy parameters
def test_no_uninitialized_parameter_after_construction_and_counts_never_change() -> None:
    """Right after construction every parameter has its shape; training adds none."""
    model, opt = build()
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    train_steps(model, opt, range(2))
    assert sum(p.numel() for p in model.parameters()) == count


def test_missing_width_is_an_error_that_says_how_to_declare_it() -> None:
    """Without declared sizes and without an example, construction fails naming the layer, input and both fixes."""
    model = TinyNet()
    with pytest.raises(ValueError, match=r"(?s)layer 'enc', input 'z'.*axes \['c'\].*example=x.*c=4"):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"))
    assert not any("recm_modulation" in k for k in model.state_dict())


def test_checkpoint_saved_before_the_first_step_loads_with_weights_only() -> None:
    """Model and optimizer saved right after construction load with weights_only=True into fresh ones."""
    model, opt = build()
    ckpt = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()}, weights_only=True)
    fresh, fresh_opt = build(TinyNet(seed=2))
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_averaged_model_built_before_the_first_step_tracks_every_parameter() -> None:
    """An EMA (AveragedModel) made before step 1 updates after steps: same parameter list, no lazy shapes."""
    model, opt = build()
    ema = AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    train_steps(model, opt, range(3))
    ema.update_parameters(model)
    assert [p.shape for p in ema.module.parameters()] == [p.shape for p in model.parameters()]
    x = batch(4, seed=1)[0]
    ema.eval()
    with torch.no_grad():
        assert torch.isfinite(ema(x)).all()


def test_pytorch_optimizer_lookahead_built_before_the_first_step_trains() -> None:
    """pytorch_optimizer's Lookahead around the wrapper, built before step 1, steps and moves h."""
    lookahead = pytest.importorskip("pytorch_optimizer").Lookahead
    model, opt = build()
    outer = lookahead(opt, k=2, alpha=0.5)
    for step in range(4):
        x, y = batch(16, seed=step)
        (model(x) - y).pow(2).mean().backward()
        opt.observe(y)
        outer.step()
        outer.zero_grad()
    assert int(model.enc.recm_modulation.t) == 4


# ------------------------------------------------------------------- copies and moves
@recm.relaxed(inputs=recm.Vector("b c xyz", c=4), terms={"weight": "un"})
class _ClassTagged(TinyVectorLinear):
    pass


class _Plain(nn.Module):
    """An untagged layer with the two methods; one instance gets tagged."""

    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Parameter(torch.zeros(3, 3))

    def equivariant(self, z: Tensor) -> Tensor:
        return 2 * z

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return z @ self.un.T


def _instance_tagged() -> nn.Module:
    return recm.relaxed(_Plain(), inputs=recm.Vector("b xyz"), terms={"weight": "un"})


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.inner, self.shape = inner, shape

    def forward(self, z: Tensor) -> Tensor:
        out = self.inner(z)
        return out.reshape(out.shape[0], -1)[:, :3]


@pytest.mark.parametrize("kind", ["class", "instance", "exported"])
@pytest.mark.parametrize("steps", [0, 2])
def test_to_double_deepcopy_save_and_pickle_work_before_and_after_steps(kind: str, steps: int) -> None:
    """to / double / deepcopy / torch.save(model) / pickle, for class- and instance-tagged and exported models."""
    layer = _ClassTagged(4, 2, seed=0) if kind == "class" else _instance_tagged()
    shape = (4, 3) if kind == "class" else (3,)
    model = _Wrapped(layer, shape)
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"), a=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=g)
        (model(x) - x.reshape(8, -1)[:, :3] - 1).pow(2).mean().backward()
        opt.step(target=x.reshape(8, -1)[:, :3] + 1)
        opt.zero_grad()
    target = recm.export(model) if kind == "exported" else model
    x = torch.randn(5, *shape, generator=g)
    ref = eval_output(target, x)
    for copied in (copy.deepcopy(target), pickle.loads(pickle.dumps(target)),
                   through_bytes(target, weights_only=False)):
        torch.testing.assert_close(eval_output(copied, x), ref, rtol=0, atol=0)
    moved = copy.deepcopy(target).to("cpu").double()
    torch.testing.assert_close(eval_output(moved, x.double()), ref.double(), rtol=1e-5, atol=1e-6)
    if kind != "exported":  # the original keeps training after all that, and in float64 too
        x = torch.randn(8, *shape, generator=g)
        (model(x) - 1).pow(2).mean().backward()
        opt.step(target=x.reshape(8, -1)[:, :3])
        assert int(layer.recm_modulation.t) == steps + 1
        model.double()
        xd = x.double()
        opt.zero_grad()
        model(xd).pow(2).mean().backward()  # a float64 forward uses the float32-era newest sample
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------- attach and detach
def hook_counts(model: nn.Module) -> list[tuple[int, int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), len(m._load_state_dict_pre_hooks))
            for m in model.modules()]


def test_detach_removes_every_hook_and_optionally_the_state() -> None:
    """opt.detach() leaves no capture hook; detach(keep_state=False) restores the equivariant-only model."""
    model = TinyNet()
    before_hooks = hook_counts(model)
    before_keys = set(model.state_dict())
    model, opt = build(model)
    train_steps(model, opt, range(2))
    opt.detach()
    from recm_opt._capture import _Hook

    assert not any(isinstance(h, _Hook) for m in model.modules()
                   for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()])
    x, y = batch(seed=3)
    (model(x) - y).pow(2).mean().backward()  # nothing is captured any more
    assert int(model.enc.recm_modulation.t) == 2  # the state stays with the model
    with pytest.raises(RuntimeError, match="detached"):
        opt.step(target=y)
    opt.detach(keep_state=False)
    assert set(model.state_dict()) == before_keys
    assert [c[:2] for c in hook_counts(model)] == [c[:2] for c in before_hooks]
    assert not any(g.get("recm") for g in opt.inner.param_groups)


def test_recreating_the_optimizer_after_a_detach_works_without_a_warning() -> None:
    """detach(), then a new optimizer: no warning, the state continues."""
    model, opt = trained(steps=2)
    opt.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, new = build(model)
    train_steps(model, new, range(2, 3))
    assert int(model.dec.recm_modulation.t) == 3


def _state(model: nn.Module) -> tuple[dict, list]:
    sd = {k: v.clone() if isinstance(v, Tensor) else v for k, v in model.state_dict().items()}
    return sd, hook_counts(model)


@pytest.mark.parametrize("failure", ["missing-param", "bad-group", "bad-hyperparameter", "bad-example",
                                     "incompatible-state"])
def test_failed_construction_leaves_the_model_exactly_as_it_was(failure: str) -> None:
    """Each way construction can fail leaves state_dict, modulations and hooks as they were; a retry works."""
    model, _ = trained(steps=2) if failure == "incompatible-state" else (TinyNet(), None)
    before = _state(model)
    kw: dict[str, Any] = {"target": recm.Vector("b xyz"), "example": example(model)}
    params: Any = model.parameters()
    if failure == "missing-param":
        params = [model.enc.weight]
    elif failure == "bad-group":
        kw["group"] = recm.PermutationGenerators(3)
    elif failure == "bad-hyperparameter":
        kw["weight_decay"] = float("nan")
    elif failure == "bad-example":
        kw["example"] = torch.zeros(1, 5, 3)
    else:
        kw["state_dim"] = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            RECMOptimizer(torch.optim.SGD(params, lr=0.1), model, **kw)
    after = _state(model)
    assert after[1] == before[1]
    assert set(after[0]) == set(before[0])
    for k, v in before[0].items():
        assert (torch.equal(v, after[0][k]) if isinstance(v, Tensor) else v == after[0][k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(model)  # the retry with a correct configuration works


# ------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"a": float("inf")}, r"a must be finite, got inf"),
    ({"b": float("nan")}, r"b must be > 0, got nan"),
    ({"lr": -1e-3}, r"lr must be >= 0, got -0.001"),
    ({"lr": float("nan")}, r"lr must be >= 0, got nan"),
    ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
    ({"weight_decay": float("inf")}, r"weight_decay must be finite, got inf"),
    ({"weight_radius": float("inf")}, r"weight_radius must be finite, got inf"),
    ({"hidden": 0}, r"hidden must be an int >= 1, got 0"),
    ({"seed": -1}, r"seed must be an int >= 0, got -1"),
    ({"prune_eps": float("nan")}, r"prune_eps must be in \[0, 1\), got nan"),
    ({"prune_z": -1.0}, r"prune_z must be >= 0, got -1.0"),
    ({"prune_z": float("inf")}, r"prune_z must be finite, got inf"),
    ({"alpha_fn": "relu"}, r"alpha_fn must be one of \('gelu', 'odd_gelu'\), got 'relu'"),
])
def test_every_hyperparameter_is_validated_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    """Non-finite or out-of-range a, b, lr, weight_decay, weight_radius, sizes, seed, prune_eps: a ValueError."""
    model = TinyNet()
    with pytest.raises(ValueError, match=message):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                      example=example(model), **kwargs)
    assert not hasattr(model.enc, "recm_modulation")


def test_model_state_dict_holds_only_tensors() -> None:
    """Every entry of model.state_dict(), the modulation's configuration included, is a tensor (safetensors-ready)."""
    model, _ = trained(steps=1)
    sd = model.state_dict()
    assert "enc.recm_modulation._extra_state" in sd
    assert all(isinstance(v, Tensor) for v in sd.values())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"state_dim": 2.5}, r"state_dim must be an int >= 1, got 2.5"),
    ({"max_units": True}, r"max_units must be an int >= 1, got True"),
    ({"a": "1e-3"}, r"a must be a number, got '1e-3'"),
    ({"prune_eps": None}, r"prune_eps must be a number in \[0, 1\), got None"),
    ({"total_steps": 300.0}, r"total_steps must be an int >= 1, got 300.0"),
    ({"foreach": "yes"}, r"foreach must be True, False or None, got 'yes'"),
])
def test_a_setting_of_the_wrong_type_is_a_type_error(kwargs: dict[str, Any], message: str) -> None:
    """A wrong type is a TypeError, a wrong value a ValueError; each names the setting and the value."""
    model = TinyNet()
    with pytest.raises(TypeError, match=message):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                      example=example(model), **kwargs)
    assert not hasattr(model.enc, "recm_modulation")
