"""The optimizer's checkpoint: what of RECM is not in the model, keyed by layer name.

``h``, ``t``, ``gamma_t`` and the modulation's parameters live in ``model.state_dict()``.
The optimizer's ``state_dict`` adds, per layer, what only a resumed run needs: the
newest sample (the gradient path into theta of the next forward), the counters, the
private generator's state.
Each layer's entry sits, as ``recm_*`` keys, inside the inner state of that layer's
``w_beta`` (the standard ``{state, param_groups}`` shape that distributed checkpointing
expects) and names its layer, so that entries are matched by name, never by position.
The newest sample is held in a tuple, ``()`` or ``(tensor,)``: its shape follows the
batch, and distributed checkpointing saves a tuple whole and loads it by replacement,
where a tensor is loaded in place into a template of the same shape. So ``dcp.load``
works into a freshly built optimizer, which has no sample yet.

Loading checks the whole checkpoint first (names, shapes, dtypes, finite values,
``t >= 0``) and changes nothing when a check fails. A checkpoint from recm_opt 0.1
(``recm_h``, ``recm_t``, ``recm_gamma`` in the optimizer, matched by position) is
converted: its values move into the model. :func:`check_model` runs as a pre-hook of the
model's own ``load_state_dict`` and checks every modulation's entries before any tensor loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._layers import _Layer
from ._warn import warn
from .modulation import Modulation, check_state
from .tagging import _MODULATION

_LEGACY = ("recm_h", "recm_t", "recm_gamma")


def layer_entries(layers: list[_Layer], skipped_steps: int, rng: torch.Generator) -> dict[_Layer, dict[str, Any]]:
    """Each layer's ``recm_*`` entry for the optimizer's ``state_dict``."""
    out = {}
    for layer in layers:
        mod = layer.mod
        newest = () if mod.newest is None else (mod.newest.clone(),)
        out[layer] = {"recm_layer": layer.name, "recm_newest": newest,
                      "recm_skipped": torch.tensor(layer.skipped), "recm_dropped": torch.tensor(layer.dropped),
                      "recm_skipped_steps": torch.tensor(skipped_steps), "recm_rng": rng.get_state()}
    return out


def save(inner: Optimizer, param_groups: list[dict[str, Any]], layers: list[_Layer], skipped_steps: int,
         rng: torch.Generator, inner_view: Callable[[], ContextManager[None]] = contextlib.nullcontext
         ) -> dict[str, Any]:
    """The inner state dict with each layer's RECM entry under its ``w_beta``.

    An inner optimizer whose own ``state_dict`` has another shape (pytorch_optimizer's
    ``Lookahead``) is saved as it sees the groups when it steps (inside ``inner_view``,
    without RECM's group), whole under ``recm_inner`` beside the standard keys.
    """
    sd = inner.state_dict()
    if not _standard(sd):
        with inner_view():
            own = inner.state_dict()
        sd = {"state": {}, "param_groups": _packed(param_groups), _INNER: own}
    index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in param_groups))}
    for layer, entry in layer_entries(layers, skipped_steps, rng).items():
        i = index[id(layer.mod.w_beta)]
        sd["state"][i] = {**sd["state"].get(i, {}), **entry}
    return sd


_INNER = "recm_inner"


def _standard(sd: Any) -> bool:
    return isinstance(sd, dict) and isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list)


def _packed(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as ``Optimizer.state_dict`` writes them: options, and parameters as running indices."""
    out, start = [], 0
    for g in param_groups:
        out.append({**{k: v for k, v in g.items() if k != "params"},
                    "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return out


def split(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[Any, dict[str, Any]]]:
    """Separate what the inner optimizer loads, the param groups and the ``recm_*`` entries (by state key).

    Raises:
        ValueError: for a dict without the standard keys, or entries that are not dicts.
    """
    if not _standard(state_dict) or not all(isinstance(v, dict) for v in state_dict["state"].values()) or \
            not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state_dict["param_groups"]):
        raise ValueError("an optimizer state_dict must have 'state' (a dict of dicts) and 'param_groups' (a list "
                         "of groups with 'params') keys, got "
                         f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
    groups = [dict(g) for g in state_dict["param_groups"]]
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    recm = {k: {n: v.pop(n) for n in list(v) if isinstance(n, str) and n.startswith("recm_")}
            for k, v in state.items()}
    inner = state_dict[_INNER] if _INNER in state_dict else \
        {"state": {k: v for k, v in state.items() if v}, "param_groups": groups}
    return inner, groups, {k: v for k, v in recm.items() if v}


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
        raise ValueError(f"the checkpoint has RECM state (recm_layer) for layers {unknown}, which this optimizer does "
                         f"not modulate (its layers: {sorted(names)})")
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
        newest = _newest(e)
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
        if rng is not None:
            try:  # a scratch generator: the check changes nothing
                torch.Generator().set_state(rng)
            except (TypeError, RuntimeError) as err:
                raise ValueError(f"{where}, recm_rng: expected a CPU generator state, got {_describe(rng)} "
                                 f"({err})") from err


# Inner-optimizer state that has its parameter's shape (torch.optim and pytorch_optimizer's names).
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
                 "grad_avg", "exp_inf", "prev", "step_size", "ax", "slow_params", "slow_param")


def check_inner(state: dict[Any, dict[str, Any]], saved_ids: list[Any], params: list[Tensor],
                names: dict[int, str]) -> None:
    """Check that the inner state's parameter-shaped entries fit the parameters they will load into.

    ``Optimizer.load_state_dict`` matches parameters by position and count only, so a
    checkpoint of a model with other sizes (another ``state_dim``) would load and fail at
    the next step.

    Raises:
        ValueError: naming the state entry and the parameter.
    """
    for saved, p in zip(saved_ids, params):
        for key, v in state.get(saved, {}).items():
            if key == "step" and not (isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex()
                                      or isinstance(v, (int, float)) and not isinstance(v, bool)):
                raise ValueError(f"state[{saved!r}]['step']: expected one number, got {_describe(v)}")
            if key in _PARAM_SHAPED and not isinstance(v, Tensor):
                raise ValueError(f"state[{saved!r}][{key!r}]: expected a tensor, got {_describe(v)}")
            if key in _PARAM_SHAPED and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"state[{saved!r}][{key!r}] has shape {tuple(v.shape)}, but the parameter it loads "
                                 f"into ({names.get(id(p), 'a parameter of this optimizer')}) has "
                                 f"{tuple(p.shape)}: the checkpoint is from a model of other sizes")


def _newest(e: dict[str, Any]) -> Any:
    """The entry's newest sample: the tuple's tensor, or (before the tuple) the tensor itself; None if absent."""
    newest = e.get("recm_newest")
    if isinstance(newest, tuple):
        if len(newest) > 1:
            raise ValueError(f"layer {e.get('recm_layer')!r}, recm_newest: expected () or (tensor,), got a tuple of "
                             f"{len(newest)}")
        return newest[0] if newest else None
    return newest


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
    newest = _newest(e)
    has = newest is not None and newest.numel() > 0
    mod.newest = newest.to(device=mod.h.device, dtype=mod.h.dtype) if has else None
    layer.skipped = int(e.get("recm_skipped", 0))
    layer.dropped = int(e.get("recm_dropped", 0))
    if "recm_rng" in e:
        rng.set_state(e["recm_rng"])
    return int(e["recm_skipped_steps"]) if "recm_skipped_steps" in e else None


def fresh_recm_group(groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A plain inner-optimizer checkpoint's groups, with this optimizer's RECM group inserted (fresh state).

    Only for an optimizer that has a RECM group: one whose modulation parameters joined
    the inner optimizer's single group (LBFGS) saves no RECM group either, and loads as it is.
    """
    if not any(g.get("recm") for g in param_groups):
        return groups
    warn("state dict has no RECM param group (a plain optimizer checkpoint?): loading the inner state; "
                  "RECM's state is what the model holds")
    pos = next(i for i, g in enumerate(param_groups) if g.get("recm"))
    start = 1 + max(chain.from_iterable(g["params"] for g in groups), default=-1)
    ours = {k: v for k, v in param_groups[pos].items() if k != "params"}
    ours["params"] = list(range(start, start + len(param_groups[pos]["params"])))
    return groups[:pos] + [ours] + groups[pos:]


def load_inner(inner: Optimizer, param_groups: list[dict[str, Any]], state: Any, state_dict: dict[str, Any],
               inner_view: Callable[[], ContextManager[None]] = contextlib.nullcontext) -> None:
    """Load the inner optimizer, keeping the shared ``param_groups`` and ``state`` objects.

    ``Optimizer.load_state_dict`` replaces them with new objects; copying back keeps the
    sharing (schedulers and wrappers hold them) across a resume. A ``recm_inner`` state
    (see :func:`save`) loads inside ``inner_view``, as it was saved.
    """
    if not _standard(state_dict):
        with inner_view():
            _load_shared(inner, param_groups, state, state_dict)
    else:
        _load_shared(inner, param_groups, state, state_dict)


def _load_shared(inner: Optimizer, param_groups: list[dict[str, Any]], state: Any, state_dict: dict[str, Any]
                 ) -> None:
    try:
        inner.load_state_dict(state_dict)
    except Exception as err:
        # torch installs the new groups and state before its subclass checks them: put the shared ones back
        _share_groups(inner, param_groups)
        inner.state = state
        raise ValueError(f"the inner optimizer ({type(inner).__name__}) refused the checkpoint's state "
                         f"({type(err).__name__}: {err}); nothing was loaded") from err
    for old, new in zip(param_groups, inner.param_groups):
        old.clear()
        old.update(new)
    state.clear()
    state.update(inner.state)
    _share_groups(inner, param_groups)
    inner.state = state


def _share_groups(opt: Any, param_groups: list[dict[str, Any]]) -> None:
    """Make ``opt`` hold ``param_groups`` again; a wrapper whose groups are its base's (Lookahead) through the base."""
    if opt.param_groups is param_groups:
        return
    if isinstance(getattr(type(opt), "param_groups", None), property):
        _share_groups(opt.optimizer, param_groups)
    else:
        opt.param_groups = param_groups


def check_model(model: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Check every modulation's entries of a model checkpoint before anything of it loads.

    Registered on the model by the optimizer: the saved configuration (as the constructor
    checks its arguments), names, shapes and dtypes of the tensors, and the state's values
    (:meth:`~recm_opt.modulation.Modulation.check_fits`). Loading is all or nothing for the RECM state.

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
