"""Tagged layers: find them, check them, size their ``r_theta`` and attach their modulation.

At construction the optimizer walks ``model.named_modules()`` for ``@relaxed`` layers
and checks each one (its parameters are in the inner optimizer, its terms name
parameters or submodules, its vector and irreps inputs match the group) before it
changes anything. ``r_theta``'s input width is the number of per-unit features of
the layer's inputs plus the target's; it comes from the representations' declared
sizes or from one forward of an explicit example batch. A layer that already
carries a modulation (loaded with the model, or left by an earlier optimizer) keeps
it, with its state. :class:`_Layer` is the optimizer's record of one tagged layer. The
modulation parameters join the shared param groups as one group of their own (:func:`recm_group`,
:func:`move_out`), which RECM steps itself and the inner optimizer never sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .modulation import Modulation
from .reps import Irreps, Representation, Vector, _axes
from .tagging import _MODULATION, Relaxation, equivariant_parameters, get_relaxation

_PREFIXES = ("_orig_mod", "module")


def layer_name(name: str) -> str:
    """Strip the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) path segments from a name.

    Example:
        >>> layer_name("_orig_mod.module.enc.0")
        'enc.0'
    """
    return ".".join(p for p in name.split(".") if p not in _PREFIXES)


@dataclass(eq=False)
class _Layer:
    """The optimizer's record of one tagged layer: its modulation and counters."""

    name: str
    module: nn.Module
    mod: Modulation
    tag: Relaxation
    positions: dict[str, int]  # argument position of each declared input of ``equivariant``
    term_params: dict[str, list[nn.Parameter]]
    skipped: int = 0  # captures with NaN/Inf values, never reaching h
    capped: int = 0  # captures whose l was capped as an outlier (modulation.outlier_scale)
    dropped: int = 0  # captures whose backward never ran (eval-like, failed or foreign forwards)
    warned: bool = False
    warned_unbacked: bool = False  # the warning that live captures were dropped was given
    ran_unbacked: bool = False  # since the last step: captured forwards, none with a backward
    handles: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class _Found:
    """A tagged layer found in the model, checked, not yet attached."""

    name: str
    module: nn.Module
    tag: Relaxation

    @property
    def existing(self) -> Modulation | None:
        mod = self.module._modules.get(_MODULATION)
        return mod if isinstance(mod, Modulation) else None


def find_layers(model: nn.Module, inner: Optimizer, check_group: Callable[[Representation, int, str], None]
                ) -> list[_Found]:
    """Return the tagged layers by stable name, after checking each one can be modulated."""
    inner_params = {id(p) for g in inner.param_groups for p in g["params"]}
    found, names = [], set()
    for name, module in model.named_modules():
        tag = get_relaxation(module)
        if tag is None:
            continue
        name = layer_name(name) or type(module).__name__
        if name in names:
            continue  # the same module reached twice (a shared layer)
        names.add(name)
        missing = [n for n, p in module.named_parameters() if id(p) not in inner_params and _MODULATION not in n]
        if missing:
            raise ValueError(f"layer {name!r}: parameters {missing} are not in the inner optimizer")
        for attrs in tag.terms.values():
            for attr in attrs:
                attr_params(module, attr, name)
        for arg, rep in tag.inputs.items():
            size = rep.size if isinstance(rep, Vector) else 3 if isinstance(rep, Irreps) else None
            if size is not None:
                check_group(rep, size, f"layer {name!r}, input {arg!r}")
        found.append(_Found(name, module, tag))
    return found


def attr_params(module: nn.Module, attr: str, name: str = "") -> list[nn.Parameter]:
    """The parameters a term attribute names (a parameter or a submodule)."""
    obj = getattr(module, attr, None)
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    where = f"layer {name!r}: " if name else ""
    raise ValueError(f"{where}term attribute {attr!r} of {type(module).__name__} is not a parameter or submodule")


def make_layer(found: _Found, mod: Modulation) -> _Layer:
    """The record of an attached layer."""
    params = [p.name for p in equivariant_parameters(found.module)]
    positions = {n: params.index(n) for n in found.tag.inputs}
    term_params = {t: [p for a in attrs for p in attr_params(found.module, a)] for t, attrs in found.tag.terms.items()}
    return _Layer(found.name, found.module, mod, found.tag, positions, term_params)


# ------------------------------------------------------------------ widths
def input_widths(found: list[_Found], model: nn.Module, example: Any, target_width: int) -> dict[str, int]:
    """``r_theta``'s input width for every layer without a modulation: declared, or from ``example``.

    Raises:
        ValueError: listing the layers and inputs whose sizes are unknown, and how to declare them.
    """
    need = [f for f in found if f.existing is None]
    widths: dict[str, int] = {}
    unknown: list[_Found] = []
    for f in need:
        ws = [rep.feature_width() for rep in f.tag.inputs.values()]
        if all(w is not None for w in ws):
            widths[f.name] = sum(w for w in ws if w is not None) + target_width
        else:
            unknown.append(f)
    if unknown and example is not None:
        probed = _probe(model, example, unknown)
        for f in unknown:
            if f.name in probed:
                widths[f.name] = probed[f.name] + target_width
        unknown = [f for f in unknown if f.name not in widths]
        if unknown:
            raise ValueError(f"layers {[f.name for f in unknown]} did not run in a forward of the example batch, "
                             "so their input widths are unknown. The example runs once in eval mode under "
                             "torch.no_grad(), so a layer that runs only in training mode (or only for some "
                             "inputs) is not reached: declare its input sizes in its representation, e.g. "
                             "recm.Vector(\"b c xyz\", c=4), or pass an example that reaches every tagged layer")
    if unknown:
        lines = [f"  layer {f.name!r}, input {arg!r}: {rep!r} has no size for axes {_unsized(rep)}"
                 for f in unknown for arg, rep in f.tag.inputs.items() if rep.feature_width() is None]
        raise ValueError(
            "r_theta's input width must be known when the optimizer is built, and these inputs do not declare "
            "every feature size:\n" + "\n".join(lines) + "\nEither pass an example batch of model inputs, "
            "RECMOptimizer(..., example=x) (one forward under no_grad in eval mode reads the widths), or "
            "declare the sizes, e.g. recm.Vector(\"b c xyz\", c=4)")
    return widths


def _unsized(rep: Representation) -> list[str]:
    return [n for n in _axes(rep.pattern) if n not in rep.units and rep._known_size(n) is None]


def _probe(model: nn.Module, example: Any, layers: list[_Found]) -> dict[str, int]:
    """Run one no-grad eval forward of ``example`` and read each layer's per-unit input width."""
    seen: dict[str, int] = {}

    def hook_for(f: _Found) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if f.name in seen:
                return
            params = [p.name for p in equivariant_parameters(module)]
            width = 0
            for arg, rep in f.tag.inputs.items():
                pos = params.index(arg)
                x = args[pos] if pos < len(args) else kwargs.get(arg)
                if not isinstance(x, Tensor):
                    raise ValueError(f"layer {f.name!r}: declared input {arg!r} is not a tensor in the example "
                                     f"forward (got {type(x).__name__})")
                v, units = rep.unit_view(x.detach(), f"layer {f.name!r}, input {arg!r}")
                width += math.prod(v.shape[len(units):])
            seen[f.name] = width
        return hook

    handles = [f.module.register_forward_pre_hook(hook_for(f), with_kwargs=True) for f in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            try:
                if isinstance(example, Mapping):
                    model(**example)
                elif isinstance(example, tuple):
                    model(*example)
                else:
                    model(example)
            except ValueError:
                raise
            except Exception as err:
                raise ValueError(f"the example batch failed in the model's forward ({type(err).__name__}: {err}); "
                                 "example= takes model inputs: a tensor, a tuple of positional inputs or a dict "
                                 "of keyword inputs") from err
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
        _reshard(model)
    return seen


def _reshard(model: nn.Module) -> None:
    """Reshard FSDP2 modules after the probe.

    A root keeps its gathered parameters after a forward, and the optimizer must hold the
    sharded ones (the gathered ones are freed at the next forward).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def attach(layer: _Layer) -> None:
    """Put the layer's modulation on the module, trainable (a detached optimizer left it frozen)."""
    if layer.module._modules.get(_MODULATION) is not layer.mod:
        layer.module.add_module(_MODULATION, layer.mod)
    for p in layer.mod.parameters():
        p.requires_grad_(True)


def to_layer_device(mod: Modulation, module: nn.Module) -> Modulation:
    """Move a new modulation to the layer's device and floating dtype."""
    ref = next((p for n, p in module.named_parameters() if _MODULATION not in n), None)
    if ref is not None:
        mod.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    return mod


def recm_group(inner: Optimizer, mods: list[Modulation], options: dict[str, Any]) -> dict[str, Any] | None:
    """The param group of the modulations, or ``None`` (no layers, or the inner optimizer has it already)."""
    params = list(dict.fromkeys(p for mod in mods for p in mod.parameters()))  # shared modulations once
    if not params:
        return None
    ids = {id(p) for p in params}
    recm = [g for g in inner.param_groups if g.get("recm")]
    if len(recm) == 1 and {id(p) for p in recm[0]["params"]} == ids:
        return None  # the same inner optimizer wrapped again: its RECM group already holds them
    return {"params": params, **options}


def move_out(inner: Optimizer, group: dict[str, Any]) -> None:
    """Take the modulation parameters out of the inner groups that hold them.

    A model that carries its modulations (loaded from a checkpoint, or left by an
    earlier optimizer) hands them to ``torch.optim.AdamW(model.parameters())`` like any
    other parameter; they belong in the RECM group, which RECM steps itself (any inner
    state they had is taken over by RECM's own update). Groups left empty stay, so that
    per-group schedules keep their order.
    """
    ids = {id(p) for p in group["params"]}
    for g in inner.param_groups:
        g["params"][:] = [p for p in g["params"] if id(p) not in ids]  # in place: LBFGS caches the list


def clear_dead_hooks(module: nn.Module) -> None:
    """Remove capture hooks of optimizers that no longer exist (re-created optimizers, loaded copies)."""
    from ._capture import _Hook

    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _Hook) and (h.book is None or h.book() is None)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
