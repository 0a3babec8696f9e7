"""The optimizer's checkpoint: what of RECM is not in the model, keyed by layer name.

``h``, ``t``, ``gamma_t`` and the modulation's parameters live in ``model.state_dict()``.
The optimizer's ``state_dict`` adds, per layer, what only a resumed run needs: the
newest sample (the gradient path into theta of the next forward), the counters, the
private generator's state.
Each layer's entry sits, as ``recm_*`` keys, inside the inner state of that layer's
``w_beta`` (the standard ``{state, param_groups}`` shape that distributed checkpointing
expects) and names its layer, so that entries are matched by name, never by position.

Loading checks the whole checkpoint first (names, shapes, dtypes, finite values,
``t >= 0``) and changes nothing when a check fails. A checkpoint from recm_opt 0.1
(``recm_h``, ``recm_t``, ``recm_gamma`` in the optimizer, matched by position) is
converted: its values move into the model. :func:`check_model` runs as a pre-hook of the
model's own ``load_state_dict`` and checks every modulation's entries before any tensor loads.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._layers import _Layer
from .modulation import Modulation, check_state
from .tagging import _MODULATION

_LEGACY = ("recm_h", "recm_t", "recm_gamma")


def layer_entries(layers: list[_Layer], skipped_steps: int, rng: torch.Generator) -> dict[_Layer, dict[str, Any]]:
    """Each layer's ``recm_*`` entry for the optimizer's ``state_dict``."""
    out = {}
    for layer in layers:
        mod = layer.mod
        newest = mod.newest if mod.newest is not None else torch.zeros(0)
        out[layer] = {"recm_layer": layer.name, "recm_newest": newest.clone(),
                      "recm_skipped": torch.tensor(layer.skipped), "recm_dropped": torch.tensor(layer.dropped),
                      "recm_skipped_steps": torch.tensor(skipped_steps), "recm_rng": rng.get_state()}
    return out


def save(inner: Optimizer, param_groups: list[dict[str, Any]], layers: list[_Layer], skipped_steps: int,
         rng: torch.Generator) -> dict[str, Any]:
    """The inner state dict with each layer's RECM entry under its ``w_beta``."""
    sd = inner.state_dict()
    index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in param_groups))}
    for layer, entry in layer_entries(layers, skipped_steps, rng).items():
        i = index[id(layer.mod.w_beta)]
        sd["state"][i] = {**sd["state"].get(i, {}), **entry}
    return sd


def split(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, dict[str, Any]]]:
    """Separate the inner state dict from the ``recm_*`` entries (by state key)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("an optimizer state_dict must have 'state' and 'param_groups' keys, got "
                         f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
    groups = [dict(g) for g in state_dict["param_groups"]]
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    recm = {k: {n: v.pop(n) for n in list(v) if n.startswith("recm_")} for k, v in state.items()}
    inner = {"state": {k: v for k, v in state.items() if v}, "param_groups": groups}
    return inner, {k: v for k, v in recm.items() if v}


def match(layers: list[_Layer], entries: dict[Any, dict[str, Any]], saved_ids: list[Any],
          current: list[int]) -> dict[_Layer, dict[str, Any]]:
    """Each layer's entry: by the name it carries, or (recm_opt 0.1 checkpoints) by its ``w_beta``'s position.

    Raises:
        ValueError: for an entry naming no layer of this optimizer.
    """
    named = {e["recm_layer"]: e for e in entries.values() if "recm_layer" in e}
    names = {layer.name for layer in layers}
    unknown = sorted(set(named) - names)
    if unknown:
        raise ValueError(f"the checkpoint has RECM state for layers {unknown}, which this optimizer does not "
                         f"modulate (its layers: {sorted(names)})")
    out = {}
    for layer in layers:
        if layer.name in named:
            out[layer] = named[layer.name]
            continue
        pos = current.index(id(layer.mod.w_beta)) if id(layer.mod.w_beta) in current else None
        entry = entries.get(saved_ids[pos]) if pos is not None and pos < len(saved_ids) else None
        if entry is not None and "recm_layer" not in entry:
            out[layer] = entry
    return out


def check(layers: dict[_Layer, dict[str, Any]]) -> None:
    """Check every matched entry before anything is loaded.

    Raises:
        ValueError: naming the layer and the key.
    """
    for layer, e in layers.items():
        where = f"layer {layer.name!r}"
        if any(k in e for k in _LEGACY):
            try:
                check_state({"h": e.get("recm_h"), "t": e.get("recm_t"), "gamma_t": e.get("recm_gamma")}, "",
                            layer.mod.h.numel())
            except ValueError as err:
                raise ValueError(f"{where}, recm_{err}") from err
        newest = e.get("recm_newest")
        if newest is not None:
            if not isinstance(newest, Tensor) or not (newest.numel() == 0 or newest.is_floating_point()):
                raise ValueError(f"{where}, recm_newest: expected a float tensor, got {_describe(newest)}")
            if newest.numel() and (newest.dim() != 3 or newest.shape[-1] != layer.mod.in_features):
                raise ValueError(f"{where}, recm_newest: expected shape (copies, units, {layer.mod.in_features}), "
                                 f"got {tuple(newest.shape)}")
            if newest.numel() and not bool(torch.isfinite(newest).all()):
                raise ValueError(f"{where}, recm_newest: holds NaN/Inf values")
        for key in ("recm_skipped", "recm_dropped", "recm_skipped_steps"):
            v = e.get(key)
            if v is not None and (not isinstance(v, Tensor) or v.numel() != 1 or v.is_floating_point()
                                  or int(v) < 0):
                raise ValueError(f"{where}, {key}: expected one integer >= 0, got {_describe(v)}")
        rng = e.get("recm_rng")
        if rng is not None and (not isinstance(rng, Tensor) or rng.dtype != torch.uint8):
            raise ValueError(f"{where}, recm_rng: expected a uint8 generator state, got {_describe(rng)}")


def _describe(v: Any) -> str:
    return f"{v.dtype} of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def restore(layer: _Layer, e: dict[str, Any], rng: torch.Generator) -> int | None:
    """Load one checked entry into the layer; return the saved ``skipped_steps`` (if any)."""
    mod = layer.mod
    if "recm_h" in e:  # recm_opt 0.1: the recurrence state moves into the model
        with torch.no_grad():
            mod.h.copy_(e["recm_h"])
            mod.t.copy_(e["recm_t"])
            mod.gamma_t.copy_(e["recm_gamma"])
    newest = e.get("recm_newest", torch.zeros(0))
    mod.newest = newest.to(device=mod.h.device, dtype=mod.h.dtype) if newest.numel() else None
    layer.skipped = int(e.get("recm_skipped", 0))
    layer.dropped = int(e.get("recm_dropped", 0))
    if "recm_rng" in e:
        rng.set_state(e["recm_rng"])
    return int(e["recm_skipped_steps"]) if "recm_skipped_steps" in e else None


def fresh_recm_group(groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A plain inner-optimizer checkpoint's groups, with this optimizer's RECM group inserted (fresh state)."""
    warnings.warn("state dict has no RECM param group (a plain optimizer checkpoint?): loading the inner state; "
                  "RECM's state is what the model holds", stacklevel=3)
    pos = next(i for i, g in enumerate(param_groups) if g.get("recm"))
    start = 1 + max(chain.from_iterable(g["params"] for g in groups), default=-1)
    ours = {k: v for k, v in param_groups[pos].items() if k != "params"}
    ours["params"] = list(range(start, start + len(param_groups[pos]["params"])))
    return groups[:pos] + [ours] + groups[pos:]


def load_inner(inner: Optimizer, param_groups: list[dict[str, Any]], state: Any, state_dict: dict[str, Any]) -> None:
    """Load the inner optimizer, keeping the shared ``param_groups`` and ``state`` objects.

    ``Optimizer.load_state_dict`` replaces them with new objects; copying back keeps the
    sharing (schedulers and wrappers hold them) across a resume.
    """
    inner.load_state_dict(state_dict)
    for old, new in zip(param_groups, inner.param_groups):
        old.clear()
        old.update(new)
    state.clear()
    state.update(inner.state)
    inner.param_groups, inner.state = param_groups, state


def check_model(model: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Check every modulation's entries of a model checkpoint before anything of it loads.

    Registered on the model by the optimizer: names, shapes and dtypes of the tensors,
    finite ``h``, ``t >= 0``. Loading is all or nothing for the RECM state.

    Raises:
        ValueError: naming the key.
    """
    for name, module in model.named_modules():
        mod = module._modules.get(_MODULATION)
        if not isinstance(mod, Modulation):
            continue
        p = f"{prefix}{name + '.' if name else ''}{_MODULATION}."
        if any(k.startswith(p) for k in state_dict):
            mod.check_fits(state_dict, p)
