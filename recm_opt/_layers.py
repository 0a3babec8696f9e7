"""Tagged-layer discovery and book-keeping for :class:`~recm_opt.optimizer.RECMOptimizer`.

At construction the optimizer walks ``model.modules()`` for ``@relaxed`` layers,
checks that each can be modulated (its parameters are in the inner optimizer, its
terms name parameters or submodules, its vector/irreps inputs match the group),
and only then attaches one :class:`~recm_opt.modulation.Modulation` per layer, so
that a failed check leaves the model as it was. :class:`_Layer` holds what the
optimizer tracks per layer between steps: pending captures, samples and counters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import Tensor, nn
from torch.optim import Optimizer

from .groups import Group
from .modulation import Modulation
from .reps import Irreps, Representation, Vector
from .tagging import _MODULATION, Relaxation, get_relaxation

_PREFIXES = ("_orig_mod", "module")

def layer_name(name: str) -> str:
    """Strip the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) path segments from a name.

    Example:
        >>> layer_name("_orig_mod.module.enc.0")
        'enc.0'
    """
    return ".".join(p for p in name.split(".") if p not in _PREFIXES)


class _Layer:
    """Book-keeping for one tagged layer: its modulation, pending captures and counters."""

    def __init__(self, name: str, module: nn.Module, mod: Modulation) -> None:
        self.name, self.module, self.mod = name, module, mod
        tag = get_relaxation(module)
        assert tag is not None
        self.tag = tag
        params = [p for p in inspect.signature(cast(Callable[..., Any], module.equivariant)).parameters]
        self.positions = {n: params.index(n) for n in tag.inputs}
        self.inputs: list[list[tuple[str, Representation, Tensor, dict[str, int]]]] = []  # unit views awaiting a target
        self.samples: list[tuple[Tensor, int]] = []  # (stacked sample, units it stands for)
        self.skipped = 0
        self.warned = False
        # Backward passes through this layer so far, and the count at each pending
        # capture: zero_grad() drops captures whose gradient it drops.
        self.backwards = 0
        self.input_epochs: list[int] = []
        self.sample_epochs: list[int] = []
        self.term_params = {
            t: [p for a in attrs for p in _attr_params(module, a)] for t, attrs in tag.terms.items()
        }


def _freeze_until_materialized(mod: nn.Module) -> None:
    """Keep lazy (shape-less) parameters out of gradient work until their first batch.

    ``r_theta``'s input width is known only at the first captured batch. Until then its
    uninitialised parameters have ``requires_grad=False``, so DCP's zero-gradient
    initialisation (``zeros_like`` on every trainable parameter) and optimizers skip
    them. They thaw once materialised: by the first forward (a pre-hook that runs
    right after the lazy module's own) or by loading a state dict.
    """
    for sub in mod.modules():
        lazy: list[nn.Parameter] = [
            p for p in sub.parameters(recurse=False) if isinstance(p, nn.parameter.UninitializedParameter)
        ]
        if not lazy:
            continue
        for p in lazy:
            p.requires_grad = False
        handles: list[Any] = []

        def thaw(*_: Any, lazy: list[nn.Parameter] = lazy, handles: list[Any] = handles) -> None:
            if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in lazy):
                for p in lazy:
                    p.requires_grad = True
                for handle in handles:
                    handle.remove()

        handles += [sub.register_forward_pre_hook(thaw), sub.register_load_state_dict_post_hook(thaw)]


def _attr_params(module: nn.Module, attr: str) -> list[nn.Parameter]:
    obj = getattr(module, attr, None)
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    raise ValueError(f"term attribute {attr!r} of {type(module).__name__} is not a parameter or submodule")


class _LayersMixin:
    """Set-up half of :class:`~recm_opt.optimizer.RECMOptimizer`: find, check and attach tagged layers."""

    inner: Optimizer
    group: Group
    target: Representation | None
    prune_eps: float
    _generators: Tensor
    _group_checked: set[tuple[int, int]]

    def _attach(self, model: nn.Module, state_dim: int, hidden: int, seed: int,
                beta_fn: Callable[[Tensor], Tensor], skip_pruned: bool) -> list[_Layer]:
        layers: list[_Layer] = []
        for name, module, tag in self._find_layers(model):  # all checks first: a failure leaves the model as it was
            mod = self._make_modulation(tag.term_names, state_dim, hidden, seed + 7919 * len(layers), beta_fn)
            ref = next(iter(module.parameters()), None)
            if ref is not None:
                mod.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            mod.train_all_live = not skip_pruned
            mod.prune_eps = self.prune_eps
            _freeze_until_materialized(mod)
            module.add_module(_MODULATION, mod)
            layers.append(_Layer(name, module, mod))
        return layers

    def _make_modulation(self, terms: tuple[str, ...], state_dim: int, hidden: int, seed: int,
                         beta_fn: Callable[[Tensor], Tensor]) -> Modulation:
        """Create one layer's modulation; relaxation policies (:mod:`recm_opt.policies`) override it."""
        return Modulation(terms, state_dim, hidden, seed, beta_fn)

    def _find_layers(self, model: nn.Module) -> list[tuple[str, nn.Module, Relaxation]]:
        """Return the tagged layers by stable name, after checking each one can be modulated."""
        inner_params = {id(p) for g in self.inner.param_groups for p in g["params"]}
        found = []
        for name, module in model.named_modules():
            tag = get_relaxation(module)
            if tag is None:
                continue
            name = layer_name(name) or type(module).__name__
            if _MODULATION in module._modules:
                raise ValueError(f"layer {name!r} is already registered with another RECMOptimizer")
            missing = [n for n, p in module.named_parameters() if id(p) not in inner_params]
            if missing:
                raise ValueError(f"layer {name!r}: parameters {missing} are not in the inner optimizer")
            for attrs in tag.terms.values():
                for attr in attrs:
                    _attr_params(module, attr)
            self._check_static_reps(name, tag.inputs)
            found.append((name, module, tag))
        if found and isinstance(self.target, Vector):
            self._check_group(self.target, self.target.size, "target")
        return found

    def _check_static_reps(self, name: str, inputs: Mapping[str, Representation]) -> None:
        """Fail at construction when a vector or irreps input cannot be acted on by the group."""
        for arg, rep in inputs.items():
            size = rep.size if isinstance(rep, Vector) else 3 if isinstance(rep, Irreps) else None
            if size is not None:
                self._check_group(rep, size, f"layer {name!r}, input {arg!r}")

    def _check_group(self, rep: Representation, size: int, where: str) -> None:
        if rep.axis is None or (id(rep), size) in self._group_checked:
            return
        try:
            rep.matrices(self.group, self._generators[:1], size)
        except ValueError as err:
            raise ValueError(f"{where}: {rep!r} does not match the group {self.group!r} ({err})") from err
        self._group_checked.add((id(rep), size))
