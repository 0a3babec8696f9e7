"""Property tests over the loaders: a corrupted checkpoint loads exactly, or fails naming the key and changes nothing.

Corruptions of a valid ``model.state_dict()`` (RECM's entries) and ``opt.state_dict()``:
dropped keys, wrong shapes and dtypes, NaN/inf/huge values, garbage configuration bytes
and edited configuration values.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from tiny import TinyNet, train_steps
from tiny import example as example_batch
from torch import Tensor

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

KINDS = ("drop", "shape", "dtype", "nan", "inf", "huge", "negative", "garbage", "config")
CONFIG_VALUES = (float("nan"), -3, 5, 16000, 0, "x", None, True, [1], 1e300)


def _build() -> tuple[TinyNet, RECMOptimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                        example=example_batch(model), total_steps=50)
    return model, opt


@functools.lru_cache(maxsize=1)
def _trained() -> tuple[dict[str, Any], dict[str, Any]]:
    model, opt = _build()
    train_steps(model, opt, range(3))
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@st.composite
def corruptions(draw: st.DrawFn, keys: list[str]) -> tuple[str, str, int, Any]:
    """A corruption: (kind, key, seed, config value)."""
    return (draw(st.sampled_from(KINDS)), draw(st.sampled_from(keys)), draw(st.integers(0, 2**32 - 1)),
            draw(st.sampled_from(CONFIG_VALUES)))


def _corrupt_tensor(value: Tensor, kind: str, g: torch.Generator) -> Tensor | None:
    """The corrupted tensor, or ``None`` when ``kind`` does not apply to it."""
    if kind == "shape":
        return torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if value.numel() else torch.zeros(2)
    if kind == "dtype":
        return value.to(torch.int64) if value.is_floating_point() else value.to(torch.float32)
    if not value.is_floating_point() or value.numel() == 0:
        return -value - 1 if kind == "negative" and value.dtype != torch.uint8 and value.numel() else None
    out = value.clone().reshape(-1)
    i = int(torch.randint(out.numel(), (), generator=g))
    out[i] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30, "negative": -abs(float(out[i])) - 1}.get(
        kind, float(out[i]))
    return out.reshape(value.shape) if kind in ("nan", "inf", "huge", "negative") else None


def _corrupted(sd: dict[str, Any], kind: str, key: str, seed: int, config_value: Any) -> dict[str, Any] | None:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    if kind == "drop":
        del out[key]
        return out
    if key.endswith("_extra_state"):
        if kind == "garbage":
            out[key] = torch.randint(128, 256, (8,), generator=g, dtype=torch.uint8)
        elif kind == "config":
            config = json.loads(bytes(sd[key].tolist()).decode())
            name = sorted(config)[int(torch.randint(len(config), (), generator=g))]
            config[name] = config_value
            out[key] = torch.tensor(list(json.dumps(config).encode()), dtype=torch.uint8)
        else:
            return None
        return out
    value = _corrupt_tensor(sd[key], kind, g)
    if value is None:
        return None
    out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
                and bool(torch.equal(a.isnan(), b.isnan())))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _settings(model: TinyNet) -> list[tuple[Any, ...]]:
    return [(m.recm_modulation.prune_eps, m.recm_modulation.prune_z, m.recm_modulation.alpha_fn)
            for m in (model.enc, model.dec)]


RECM_KEYS = [k for k in _trained()[0] if ".recm_modulation." in k]


@given(corruptions(RECM_KEYS))
@example(("config", "enc.recm_modulation._extra_state", 0, 16000))
@example(("garbage", "dec.recm_modulation._extra_state", 1, None))
@example(("inf", "enc.recm_modulation.noise_var", 0, None))
def test_corrupted_model_state_dict_loads_exactly_or_names_the_key(case: tuple[str, str, int, Any]) -> None:
    """A corrupted model state_dict loads exactly, or raises a ValueError naming the key and changes nothing."""
    kind, key, seed, value = case
    sd, _ = _trained()
    bad = _corrupted(sd, kind, key, seed, value)
    if bad is None:
        return
    model, _opt = _build()  # an optimizer is attached: the whole model is checked before anything loads
    model.load_state_dict(sd)
    before, settings = copy.deepcopy(model.state_dict()), _settings(model)
    try:
        result = model.load_state_dict(bad, strict=False)
    except ValueError as err:
        assert key.rsplit(".", 1)[0] in str(err) or key in str(err), (key, str(err))
        assert _same(model.state_dict(), before) and _settings(model) == settings
        return
    after = model.state_dict()
    for k, v in bad.items():
        if k in after and isinstance(v, Tensor) and not k.endswith("_extra_state"):
            assert _same(after[k], v), k
    dropped = set(sd) - set(bad)  # a missing noise_var is an older checkpoint's: documented to start at 0
    assert set(result.missing_keys) == {k for k in dropped if not k.endswith(".noise_var")}


@given(corruptions(RECM_KEYS))
def test_corrupted_checkpoint_never_half_builds_a_fresh_layer(case: tuple[str, str, int, Any]) -> None:
    """Into a fresh model without optimizer: loads exactly, or a ValueError naming the key and the layer unbuilt."""
    kind, key, seed, value = case
    sd, _ = _trained()
    bad = _corrupted(sd, kind, key, seed, value)
    if bad is None:
        return
    fresh = TinyNet(seed=4)
    try:
        fresh.load_state_dict(bad, strict=False)
    except ValueError as err:
        layer = key.split(".")[0]
        assert layer in str(err), (key, str(err))
        mod = getattr(fresh, layer)._modules.get("recm_modulation")
        assert mod is None or int(mod.t) == 0  # never built from the bad entry (or loaded nothing into it)
        return
    after = fresh.state_dict()
    for k, v in bad.items():
        if k in after and isinstance(v, Tensor) and not k.endswith("_extra_state"):
            assert _same(after[k], v), k


def _opt_paths(osd: dict[str, Any]) -> list[str]:
    return [f"{i}/{k}" for i, entry in osd["state"].items() for k in entry]


OPT_PATHS = _opt_paths(_trained()[1])


@given(corruptions(OPT_PATHS))
@example(("garbage", OPT_PATHS[0], 0, None))
def test_corrupted_optimizer_state_dict_loads_exactly_or_names_the_key(case: tuple[str, str, int, Any]) -> None:
    """A corrupted optimizer state_dict loads exactly, or raises a ValueError naming the entry, changing nothing."""
    kind, path, seed, value = case
    _, osd = _trained()
    index, name = path.split("/", 1)
    entry = osd["state"][int(index)]
    g = torch.Generator().manual_seed(seed)
    if kind == "drop":
        bad_entry = {k: v for k, v in entry.items() if k != name}
    elif kind == "garbage":
        bad_entry = {**entry, name: "garbage"}
    else:
        v = entry[name]
        bad_value = _corrupt_tensor(v, kind, g) if isinstance(v, Tensor) else None
        if bad_value is None:
            return
        bad_entry = {**entry, name: bad_value}
    bad = {**osd, "state": {**osd["state"], int(index): bad_entry}}
    model, opt = _build()
    model.load_state_dict(_trained()[0])
    opt.load_state_dict(copy.deepcopy(osd))
    before = copy.deepcopy(opt.state_dict())
    try:
        opt.load_state_dict(copy.deepcopy(bad))
    except ValueError as err:
        assert name in str(err), (path, str(err))
        assert _same(opt.state_dict(), before)
        return
    after = opt.state_dict()
    if kind != "drop":  # what was given is what is held (torch casts a state tensor to its parameter's dtype)
        held, given = after["state"][int(index)][name], bad_entry[name]
        assert _same(held, given.to(held.dtype) if isinstance(held, Tensor) else given), path


@st.composite
def capture_inputs(draw: st.DrawFn) -> tuple[int, float, str]:
    """(seed, scale of one sample kept out of the loss, or 'inf' in that sample)."""
    return (draw(st.integers(0, 2**32 - 1)), 10.0 ** draw(st.integers(-30, 30)), draw(st.sampled_from(["loss", "inf"])))


def _capture_run(case: tuple[int, float, str]) -> TinyNet:
    seed, scale, how = case
    model, opt = _build()
    train_steps(model, opt, range(12))  # an outlier is capped once the layer has a history of 10 captures
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, 3, generator=g)
    y = x[:, 0] * 2
    x[0] = x[0] * scale if how == "loss" else float("inf")
    (model(x)[1:] - y[1:]).pow(2).mean().backward()
    opt.step(target=y)
    return model


@given(capture_inputs())
@example((0, 1e30, "loss"))
@example((0, 1.0, "inf"))
def test_model_state_dict_loads_back_after_any_capture(case: tuple[int, float, str]) -> None:
    """Whatever one capture holds (scales 1e-30..1e30, inf), the model's state_dict loads back exactly."""
    model = _capture_run(case)
    fresh = TinyNet(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert _same(fresh.state_dict(), model.state_dict())


@given(capture_inputs())
@example((0, 1e30, "loss"))
def test_one_capture_keeps_h_noise_var_and_alpha_finite_and_bounded(case: tuple[int, float, str]) -> None:
    """Whatever one capture holds, h, noise_var and alpha stay finite, and |h| within 10x its clean run's."""
    model = _capture_run(case)
    clean = _capture_run((case[0], 1.0, "loss"))
    for layer, ref in ((model.enc, clean.enc), (model.dec, clean.dec)):
        mod, cmod = layer.recm_modulation, ref.recm_modulation
        alpha, _ = mod.coefficients()
        assert torch.isfinite(mod.h).all() and torch.isfinite(mod.noise_var) and torch.isfinite(alpha).all()
        assert float(mod.h.double().norm()) <= 10 * float(cmod.h.double().norm()) + 1e-6
