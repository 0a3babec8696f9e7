"""``RECMOptimizer``: wraps any torch optimizer and adds RECM's per-layer modulation.

One ``step()`` runs, in order: the closure (if any), the inner optimizer's step,
the projections (``||w_alpha_i|| <= 1``, ``||w_beta|| <= 1``, unconstrained
weights within ``weight_radius``), then the ``h`` update of every tagged layer
from the inputs captured since the last step and their targets.

Captured statistics: every training-mode forward of a tagged layer (with autograd
on) records a random subsample of at most ``max_units`` units of its inputs. Eval
forwards, ``torch.no_grad()`` forwards (``update_bn``), forwards of deep copies
(``AveragedModel``) and activation-checkpoint recomputation are not captured; with
reentrant checkpointing, whose first forward runs without autograd, the single
recomputation in backward is captured instead. ``observe(y)`` pairs the pending
captures with the model's target. At ``step()`` the layer's ``l_theta`` is the
unit-weighted mean over all captures since the last step, so k micro-batches of
gradient accumulation give the ``l_theta`` of their union (exactly, when each has
at most ``max_units`` units). Captures follow their gradients: ``zero_grad()``
discards the captures whose backward has already run, so a step that GradScaler
skips leaves no statistics behind. Under DDP, ``l_theta`` is averaged over ranks
and the modulation parameters' gradients are all-reduced, so every rank holds the
same h.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from . import modulation
from .groups import Group, SO3Generators
from .modulation import (
    Modulation,
    _foreach_commit,
    _foreach_project_norm_,
    _in_reentrant_recompute,
    _stacked_alpha,
    _stacked_coefficients,
    _stacked_r_theta,
    is_standard,
    one_plus_tanh,
)
from .reps import Invariant, Irreps, Representation, Vector
from .tagging import _MODULATION, Relaxation, get_relaxation

__all__ = ["RECMOptimizer", "layer_name"]

_PREFIXES = ("_orig_mod", "module")


def layer_name(name: str) -> str:
    """Strip the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) path segments from a name.

    Example:
        >>> layer_name("_orig_mod.module.enc.0")
        'enc.0'
    """
    return ".".join(p for p in name.split(".") if p not in _PREFIXES)


def _in_backward() -> bool:
    # Activation-checkpoint recomputation runs inside the autograd engine; its
    # forwards repeat units already captured, so they must not be counted again.
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _param_count(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if not isinstance(p, nn.parameter.UninitializedParameter))


class _Layer:
    """Book-keeping for one tagged layer: its modulation, pending captures and counters."""

    def __init__(self, name: str, module: nn.Module, mod: Modulation) -> None:
        self.name, self.module, self.mod = name, module, mod
        tag = get_relaxation(module)
        assert tag is not None
        self.tag = tag
        params = [p for p in __import__("inspect").signature(module.equivariant).parameters]
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


class RECMOptimizer(Optimizer):
    """Recurrent Equivariant Constraint Modulation around any ``torch.optim.Optimizer``.

    Args:
        optimizer: the inner optimizer over the model's parameters (AdamW, SGD, ...).
        model: the model holding the ``@relaxed`` layers (plain, compiled or DDP-wrapped).
        group: the symmetry group's generating set ``C_G``.
        target: representation of the model's target; ``None`` for input-only
            ``l_theta(z)``. Default: an invariant, batch-first target.
        a: the one task knob of ``gamma_t = a / (b + a t)`` (grid 1e-1 .. 1e-5).
        b: the offset of ``gamma_t``.
        state_dim: m, the size of each layer's state ``h``.
        hidden: width of ``r_theta``'s hidden layer.
        max_units: units of each captured batch kept for ``l_theta``.
        prune_eps: terms with ``|alpha| < prune_eps`` are pruned in eval and export.
        weight_radius: Frobenius-norm radius of every unconstrained term's parameters.
        lr: learning rate of the modulation param group (default: the inner default).
        weight_decay: weight decay of the modulation param group.
        beta_fn: the map ``k`` with ``k(0) = 1`` (default ``1 + tanh``).
        skip_pruned: skip pruned terms also in training forwards (faster; changes dynamics).
        skip_nonfinite: skip the whole step when any gradient is NaN/Inf.
        seed: seed of the private generator for initialisation and subsampling.

    Example:
        >>> import torch
        >>> from recm_opt.reps import Vector
        >>> from recm_opt.tagging import relaxed
        >>> @relaxed(inputs=Vector("b xyz"), terms={"weight": "un"})
        ... class Layer(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.un = torch.nn.Linear(3, 3)
        ...     def equivariant(self, z):
        ...         return z
        ...     def unconstrained(self, term, z):
        ...         return self.un(z)
        >>> model = Layer()
        >>> opt = RECMOptimizer(torch.optim.AdamW(model.parameters()), model, target=Vector("b xyz"))
        >>> x = torch.randn(8, 3)
        >>> model(x).pow(2).sum().backward()
        >>> _ = opt.step(target=x)
        >>> int(model.recm_modulation.t)
        1
    """

    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        group: Group | None = None,
        target: Representation | None = Invariant("b ..."),
        a: float = 1e-3,
        b: float = 1.0,
        state_dim: int = 16,
        *,
        hidden: int = 16,
        max_units: int = 256,
        prune_eps: float = 0.01,
        weight_radius: float = 1.0,
        lr: float | None = None,
        weight_decay: float = 0.0,
        beta_fn: Callable[[Tensor], Tensor] = one_plus_tanh,
        skip_pruned: bool = False,
        skip_nonfinite: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _validate(a=a, b=b, state_dim=state_dim, hidden=hidden, max_units=max_units,
                  prune_eps=prune_eps, weight_radius=weight_radius, beta_fn=beta_fn)
        self.inner = optimizer
        self.group = group if group is not None else SO3Generators()
        self.target = target
        self.a, self.b, self.prune_eps, self.weight_radius = float(a), float(b), prune_eps, weight_radius
        self.max_units, self.skip_nonfinite = max_units, skip_nonfinite
        self.skipped_steps = 0
        self._generators = self.group.generators()
        self._rng = torch.Generator().manual_seed(seed)
        self._group_checked: set[tuple[int, int]] = set()
        self._layers = self._attach(model, state_dim, hidden, seed, beta_fn, skip_pruned)
        if self._layers:
            mod_params = [p for layer in self._layers for p in layer.mod.parameters()]
            extra = {"lr": lr} if lr is not None else {}
            optimizer.add_param_group({"params": mod_params, "weight_decay": weight_decay, "recm": True, **extra})
        else:
            warnings.warn("RECMOptimizer found no @relaxed layers in the model; it acts as the inner optimizer",
                          stacklevel=2)
        super().__init__(optimizer.param_groups, optimizer.defaults)
        # Share, don't copy: schedulers and add_param_group must see the inner groups.
        self.param_groups = optimizer.param_groups
        self._shared = True
        self.state = optimizer.state  # read-only view for users; RECM state lives in the modulations
        self._pending_rebuild: list[_Layer] = []
        self._hooks = [handle for layer in self._layers for handle in self._register_hooks(layer)]
        self._project()  # feasible from t = 0, so a step that moves nothing projects nothing

    # ------------------------------------------------------------------ set-up
    def _attach(self, model: nn.Module, state_dim: int, hidden: int, seed: int,
                beta_fn: Callable[[Tensor], Tensor], skip_pruned: bool) -> list[_Layer]:
        layers = []
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

    def _register_hooks(self, layer: _Layer) -> list[Any]:
        opt_ref, layer_ref = weakref.ref(self), weakref.ref(layer.module)

        @torch._dynamo.disable
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            opt = opt_ref()
            # Deep copies (AveragedModel) keep this hook: only the original layer counts.
            if opt is None or module is not layer_ref() or not module.training:
                return
            if _in_backward():  # checkpoint recomputation: captured in forward unless reentrant
                # (reentrant checkpointing runs its forward under no_grad: the recomputation
                # in its backward is then the one capture)
                if not _in_reentrant_recompute():
                    return
            elif not torch.is_grad_enabled():  # update_bn, inference under no_grad
                return
            if opt._pending_rebuild:  # first training forward after a load
                opt._rebuild_precomputed(opt._pending_rebuild)
                opt._pending_rebuild = []
            opt._capture(layer, args, kwargs)

        def backed(_: Tensor) -> None:
            # w_beta is used by every training forward, so its gradient marks a backward
            # through the layer: captures made before it belong to that gradient.
            layer.backwards += 1

        return [layer.module.register_forward_pre_hook(capture, with_kwargs=True),
                layer.mod.w_beta.register_post_accumulate_grad_hook(backed)]

    # --------------------------------------------------------------- capturing
    def _capture(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        found = []
        for name, rep in layer.tag.inputs.items():
            pos = layer.positions[name]
            x = args[pos] if pos < len(args) else kwargs.get(name)
            if isinstance(x, Tensor):
                # Validate now, so a bad shape fails in the user's forward; _sample reuses the unit view.
                where = f"layer {layer.name!r}, input {name!r}"
                v, units = rep.unit_view(x.detach(), where)
                if rep.axis is not None:
                    self._check_group(rep, v.shape[rep._axis_dim()], where)
                found.append((name, rep, v, units))
        if found:
            layer.inputs.append(found)
            layer.input_epochs.append(layer.backwards)
        if self.target is None:
            self._pair(layer, None)

    @torch.no_grad()
    def observe(self, target: Tensor) -> None:
        """Pair the inputs captured since the last ``observe`` with the model's ``target``.

        Call it once per forward pass, before ``step()`` (e.g. in Lightning's
        ``training_step``). ``step(target=y)`` calls it for you.

        Raises:
            ValueError: if ``target`` does not match a layer's units or its representation.
        """
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
        self._pair_all(self._layers, target)  # one host sync for every layer's samples

    def _pair(self, layer: _Layer, target: Tensor | None) -> None:
        self._pair_all([layer], target)

    def _pair_all(self, layers: list[_Layer], target: Tensor | None) -> None:
        new: list[tuple[_Layer, Tensor, int, int]] = []
        self._target_cache: tuple[Tensor, Tensor, dict[str, int]] | None = None
        try:
            for layer in layers:
                for found, epoch in zip(layer.inputs, layer.input_epochs):
                    sample, units = self._sample(layer, found, target)
                    new.append((layer, sample, units, epoch))
                layer.inputs, layer.input_epochs = [], []
        finally:
            self._target_cache = None
            # One host sync for every new sample, not one per layer: a NaN/Inf batch never reaches h.
            finite = _host_flags([_isfinite_each(_nonfinite_probes([s for _, s, _, _ in new]))]) if new else []
            for (layer, sample, units, epoch), ok in zip(new, finite):
                if not ok:
                    layer.skipped += 1
                    continue
                layer.samples.append((sample, units))
                layer.sample_epochs.append(epoch)

    def _target_view(self, target: Tensor, where: str) -> tuple[Tensor, dict[str, int]]:
        # One target is paired with every layer: rearrange it once per observe().
        cached = self._target_cache
        if cached is None or cached[0] is not target:
            assert self.target is not None
            v, units = self.target.unit_view(target.detach(), where)
            self._target_cache = cached = (target, v, units)
        return cached[1], cached[2]

    def _sample(self, layer: _Layer, found: list, target: Tensor | None) -> tuple[Tensor, int]:
        views: list[tuple[Representation, Tensor, dict[str, int]]] = []
        grid: dict[str, int] = {}
        for name, rep, v, units in found:
            _merge_units(grid, units, f"layer {layer.name!r}, input {name!r}")
            views.append((rep, v, units))
        if target is not None:
            assert self.target is not None
            where = f"layer {layer.name!r}, target"
            v, units = self._target_view(target, where)
            if self.target.axis is not None:
                self._check_group(self.target, v.shape[self.target._axis_dim()], where)
            if not set(units) <= set(grid) or any(grid[u] != n for u, n in units.items()):
                raise ValueError(f"{where}: target units {units} (shape {tuple(target.shape)}) do not match "
                                 f"the layer's input units {grid}")
            views.append((self.target, v, units))
        total = math.prod(grid.values())
        multi = None  # every unit kept: rows in row-major order, no gather index
        if total > self.max_units:
            idx = torch.randperm(total, generator=self._rng)[: self.max_units]
            index = _unravel(idx, tuple(grid.values()))
            multi = dict(zip(grid, _to_device(index, views[0][1].device).unbind()))  # one copy, no sync
        parts = [self._stack(rep, v, units, grid, multi) for rep, v, units in views]
        if len(parts) == 1:
            return torch.cat([parts[0][0][None], parts[0][1]]), total
        # (1 + k, S, d): the identity copy, then each generator's; features in input order, target last
        ids, moved = torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)
        return torch.cat([ids[None], moved]), total

    def _stack(self, rep: Representation, v: Tensor, units: dict[str, int], grid: dict[str, int],
               multi: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The rows ``(S, f)`` of one input (or the target) and their generator copies ``(k, S, f)``."""
        # (S, *features): the kept units, or every unit of the grid in row-major order
        rows = _all_units(v, units, grid) if multi is None else v[tuple(multi[u] for u in units)]
        if not rows.is_floating_point():
            rows = rows.to(torch.get_default_dtype())
        rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 1 else rows[:, None]
        feat = rows.reshape(rows.shape[0], *v.shape[len(units):]) if v.dim() > len(units) else rows
        moved = self._act(rep, feat)  # (k, S, *features)
        return rows, moved.reshape(moved.shape[0], rows.shape[0], -1)

    def _act(self, rep: Representation, x: Tensor) -> Tensor:
        """``rep.act`` over the generators; the default action's matrices are built and moved once."""
        if type(rep).act is not Representation.act:  # Invariant, Custom, ...: their own action
            return rep.act(self.group, self._generators, x)
        d = rep._axis_dim()
        key = (id(rep), x.shape[d], x.dtype, x.device)
        cache = self.__dict__.setdefault("_matrices", {})
        if key not in cache:  # keep rep alive with its matrices, so that id(rep) stays unique
            cache[key] = (rep, rep.matrices(self.group, self._generators, x.shape[d]).to(dtype=x.dtype,
                                                                                         device=x.device))
        D, xm = cache[key][1], x.movedim(d, -1)
        # x' = x @ D(g).T for every g: one (k f, f) x (f, rows) matmul, cheaper than einsum's dispatch
        out = torch.matmul(D, xm.reshape(-1, xm.shape[-1]).mT).mT
        return out.reshape(len(D), *xm.shape).movedim(-1, d)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, target: Tensor | None = None) -> Any:  # type: ignore[override]
        """Inner step, projections, then the h update of every tagged layer.

        Args:
            closure: re-evaluates the model and returns the loss (run once, with grad).
            target: the model's target for this step's captured inputs (same as ``observe``).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if target is not None:
            self.observe(target)
        self._check_targets()
        if self.skip_nonfinite and not self._grad_flags()[0]:
            self.skipped_steps += 1
            for layer in self._layers:
                layer.samples, layer.sample_epochs = [], []
            return loss
        self._sync_grads()
        self.inner.step()
        self._project()
        self._update_states()
        for layer in self._layers:  # whatever the update consumed is no longer pending
            layer.sample_epochs = layer.sample_epochs[len(layer.sample_epochs) - len(layer.samples):]
        return loss

    def _check_targets(self) -> None:
        waiting = [layer.name for layer in self._layers if layer.inputs]
        if waiting:
            raise ValueError(
                f"layers {waiting} captured inputs but got no target: call opt.step(target=y) or "
                "opt.observe(y) after each forward, or build RECMOptimizer(target=None) for input-only l_theta"
            )

    def _grad_flags(self) -> tuple[bool, bool]:
        """Return (every gradient is finite, some gradient is non-zero) with one host sync."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True, False
        norms = torch._foreach_norm(grads)
        if all(n.device == norms[0].device for n in norms):  # one stack, not two ops per gradient
            s = torch.stack([n if n.dtype == torch.float32 else n.float() for n in norms])
        else:
            s = torch.stack([n.float().to(norms[0].device) for n in norms])
        finite, nonzero = torch.stack([torch.isfinite(s).all(), (s != 0).any()]).tolist()
        return bool(finite), bool(nonzero)

    def _project(self) -> None:
        if not self._layers:
            return
        # Batched over layers, the same maths as project_norm_ per tensor. A parameter that
        # several terms or layers share is projected once, as sequential projections leave it.
        terms = {id(p): p for layer in self._layers for ps in layer.term_params.values() for p in ps}
        _foreach_project_norm_([layer.mod.w_alpha for layer in self._layers], 1.0, rows=True)
        _foreach_project_norm_([layer.mod.w_beta for layer in self._layers], 1.0)
        _foreach_project_norm_(list(terms.values()), self.weight_radius)

    def _update_states(self) -> None:
        active = any(layer.samples for layer in self._layers)
        for layer in self._layers:
            if not layer.samples and not layer.warned and (active or self._any_grad()):
                warnings.warn(f"layer {layer.name!r} did not run in training mode since the last step; "
                              "its h is unchanged", stacklevel=3)
                layer.warned = True
        ls, stacked = self._l_means()
        ls = _all_reduce_mean(ls)
        pending = [(layer, l) for layer, l in zip(self._layers, ls) if l is not None]
        committed = self._commit(pending)  # decided on the device: a non-finite l leaves h unchanged
        flags = _host_flags(committed + self._live_flags())  # one host sync for the whole update
        ok = {id(layer): f for (layer, _), f in zip(pending, flags)}
        for layers, x, r in stacked:  # newest = this step's sample, already stacked and passed through r_theta
            if r.requires_grad and all(ok.get(id(layer)) for layer in layers) \
                    and all(layer.mod.beta_fn is layers[0].mod.beta_fn for layer in layers):
                for layer, sample in zip(layers, x.unbind()):
                    layer.mod.newest, layer.samples = sample, []
                _stacked_coefficients([layer.mod for layer in layers], r)
        for (layer, _), f in zip(pending, flags):
            if not f:
                layer.skipped += 1
            elif layer.samples:
                layer.mod.newest = self._newest(layer)
        for layer in self._layers:
            layer.samples = []
        self._apply_live(flags[len(pending):])

    def _any_grad(self) -> bool:
        # Non-zero, not merely present: DCP's initialisation step passes zero gradients.
        return self._grad_flags()[1]

    def _l_means(self) -> tuple[list[Tensor | None], list[tuple[list[_Layer], Tensor, Tensor]]]:
        """Each layer's ``l_theta`` over its captures (``None`` without any), and the stacked groups.

        Standard modulations whose samples have equal shapes share one batched
        ``r_theta`` call (:func:`_stacked_l_mean`); the others take :meth:`_l_mean`,
        the per-layer reference that the batched path is tested against. A group of
        single captures keeps its stacked sample and ``r_theta`` output (with grad):
        they become ``newest`` and the next forward's coefficients.
        """
        out: list[Tensor | None] = [None] * len(self._layers)
        stacked = []
        groups: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self._layers):
            if not layer.samples:
                continue
            if not is_standard(layer.mod):
                out[i] = self._l_mean(layer)
                continue
            first, mod = layer.samples[0][0], layer.mod
            key = (tuple(s.shape[1] for s, _ in layer.samples), first.shape[0], first.shape[2], first.device,
                   mod.w_beta.dtype, mod.r_theta[0].weight.shape, mod.r_theta[2].weight.shape)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            layers = [self._layers[i] for i in idx]
            ls, x, r = _stacked_l_mean(layers, with_grad=modulation.PRECOMPUTE and len(key[0]) == 1)
            for i, l in zip(idx, ls):
                out[i] = l
            if len(key[0]) == 1:
                stacked.append((layers, x, r))
        return out, stacked

    def _commit(self, pending: list[tuple[_Layer, Tensor]]) -> list[Tensor]:
        """Commit each layer's l; return a bool tensor per layer, True where h was updated."""
        ok: list[Tensor | None] = [None] * len(pending)
        groups: dict[tuple, list[int]] = {}
        for i, (layer, l) in enumerate(pending):
            mod = layer.mod
            if is_standard(mod) and l.shape == mod.h.shape and l.device == mod.h.device:
                groups.setdefault((mod.h.dtype, mod.h.device, l.dtype), []).append(i)
                continue
            finite = bool(torch.isfinite(l).all())  # the per-layer reference: one host sync each
            if finite:
                mod.commit(l, self.a, self.b)
            ok[i] = torch.tensor([finite], device=mod.h.device)
        for idx in groups.values():
            ls = torch.stack([pending[i][1] for i in idx])
            flags = _foreach_commit([pending[i][0].mod for i in idx], ls, self.a, self.b)
            for i, f in zip(idx, flags.split(1)):
                ok[i] = f
        return [f for f in ok if f is not None]

    def _l_mean(self, layer: _Layer) -> Tensor:
        samples = [s.to(layer.mod.w_beta.dtype) for s, _ in layer.samples]
        # float64 weights: a float32 1/S would cap a float64 l_theta at float32 precision.
        weights = torch.cat([torch.full((s.shape[1],), u / s.shape[1], dtype=torch.float64)
                             for s, (_, u) in zip(samples, layer.samples)])
        weights = (weights / weights.sum()).to(samples[0])
        r = layer.mod.r_theta(torch.cat(samples, 1))  # one batched call over copies and captures
        return (weights[:, None] * (r[0] - r[1:].mean(0))).sum(0)

    def _newest(self, layer: _Layer) -> Tensor:
        if len(layer.samples) == 1:  # one capture: the sample itself, no copy
            return layer.samples[0][0].to(layer.mod.w_beta.dtype)
        sample = torch.cat([s for s, _ in layer.samples], 1).to(layer.mod.w_beta.dtype)
        if sample.shape[1] > self.max_units:
            keep = torch.randperm(sample.shape[1], generator=self._rng)[: self.max_units]
            sample = sample[:, keep.to(sample.device)]
        return sample

    def _refresh_live(self) -> None:
        if self._layers:
            self._apply_live(_host_flags(self._live_flags()))  # one sync for every layer

    def _live_flags(self) -> list[Tensor]:
        """``|alpha_i| >= prune_eps`` for every layer's terms, in layer order, still on the device."""
        slots: list[Tensor | None] = [None] * len(self._layers)
        groups: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self._layers):
            mod = layer.mod
            if is_standard(mod):
                groups.setdefault((mod.h.dtype, mod.h.device, mod.h.shape), []).append(i)
            else:
                slots[i] = mod.coefficients()[0].abs() >= self.prune_eps
        for idx in groups.values():
            mods = [self._layers[i].mod for i in idx]
            flags = _stacked_alpha(mods).abs() >= self.prune_eps
            for i, f in zip(idx, flags.split([len(m.terms) for m in mods])):
                slots[i] = f
        return [f for f in slots if f is not None]

    def _apply_live(self, flags: list[bool]) -> None:
        for layer in self._layers:
            k = len(layer.mod.terms)
            layer.mod.live, flags = tuple(flags[:k]), flags[k:]

    def _sync_grads(self) -> None:
        if not _distributed():
            return
        params = [p for layer in self._layers for p in layer.mod.parameters()]  # same list on every rank
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(has)
        grads: list[Tensor] = []
        for p, h in zip(params, has.tolist()):
            if h > 0:  # a rank without this gradient contributes zeros to the average
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    # ------------------------------------------------------ optimizer plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the inner optimizer (which shares this optimizer's param groups).

        Captures whose backward has already run are dropped with their gradients, so
        the inputs of a step that never happened (GradScaler found an inf) do not
        leak into the next one. Captures still waiting for their backward are kept
        (Lightning calls ``zero_grad`` between ``training_step`` and ``backward``).
        """
        self.inner.zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            _drop_backed(layer)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (visible here: the groups are shared)."""
        if not getattr(self, "_shared", False):  # Optimizer.__init__ registering the shared groups
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Return the inner state dict with each layer's RECM state under its ``w_beta`` entry.

        Keys are ``recm_*`` inside ``state[i]``, so the dict keeps the standard
        ``{state, param_groups}`` shape that distributed checkpointing expects, and
        holds only tensors and plain Python values.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner.state_dict()
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        for layer in self._layers:
            i = index[id(layer.mod.w_beta)]
            sd["state"][i] = {**sd["state"].get(i, {}), **self._layer_state(layer)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = result if result is not None else sd
        return sd

    def _layer_state(self, layer: _Layer) -> dict[str, Tensor]:
        mod = layer.mod
        newest = mod.newest if mod.newest is not None else torch.zeros(0)
        return {"recm_h": mod.h.clone(), "recm_t": mod.t.clone(), "recm_gamma": mod.gamma_t.clone(),
                "recm_newest": newest.clone(), "recm_skipped": torch.tensor(layer.skipped),
                "recm_skipped_steps": torch.tensor(self.skipped_steps), "recm_rng": self._rng.get_state(),
                "recm_batched": torch.tensor(_has_precomputed(mod))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or a plain inner-optimizer one (fresh RECM state).

        The param groups and the state stay the same objects (updated in place), so
        schedulers and wrappers that hold them keep seeing the inner optimizer's.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = result if result is not None else state_dict
        groups = [dict(g) for g in state_dict["param_groups"]]
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        recm = {k: {n: v.pop(n) for n in list(v) if n.startswith("recm_")} for k, v in state.items()}
        state = {k: v for k, v in state.items() if v}
        if self._layers and not any(g.get("recm") for g in groups):
            warnings.warn("state dict has no RECM param group (a plain optimizer checkpoint?): "
                          "loading the inner state and starting fresh RECM state", stacklevel=2)
            groups = self._with_fresh_recm_group(groups)
        self._load_inner({"state": state, "param_groups": groups})
        saved = list(chain.from_iterable(g["params"] for g in groups))
        current = [id(p) for p in chain.from_iterable(g["params"] for g in self.param_groups)]
        batched = []
        for layer in self._layers:
            entry = recm.get(saved[current.index(id(layer.mod.w_beta))], {})
            if entry:
                self._restore(layer, entry)
                batched += [layer] if bool(entry.get("recm_batched", False)) else []
            else:
                self._reset(layer)
        self._refresh_live()
        # Rebuilt at the next training forward: DCP's set_state_dict loads the model after
        # the optimizer, and loading parameters invalidates what a rebuild now would make.
        self._pending_rebuild = batched
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_inner(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict replaces param_groups and state with new objects;
        # copy them back into the shared ones so that the sharing survives a resume.
        groups, state = self.param_groups, self.state
        self.inner.load_state_dict(state_dict)
        for old, new in zip(groups, self.inner.param_groups):
            old.clear()
            old.update(new)
        state.clear()
        state.update(self.inner.state)
        self.inner.param_groups, self.inner.state = groups, state

    def _with_fresh_recm_group(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        pos = next(i for i, g in enumerate(self.param_groups) if g.get("recm"))
        start = 1 + max(chain.from_iterable(g["params"] for g in groups), default=-1)
        ours = {k: v for k, v in self.param_groups[pos].items() if k != "params"}
        ours["params"] = list(range(start, start + len(self.param_groups[pos]["params"])))
        return groups[:pos] + [ours] + groups[pos:]

    def _restore(self, layer: _Layer, entry: dict[str, Tensor]) -> None:
        mod = layer.mod
        mod.h.copy_(entry["recm_h"])
        mod.t.copy_(entry["recm_t"])
        mod.gamma_t.copy_(entry["recm_gamma"])
        newest = entry["recm_newest"]
        mod.newest = newest.to(device=mod.h.device, dtype=mod.h.dtype) if newest.numel() else None
        layer.skipped = int(entry["recm_skipped"])
        self.skipped_steps = int(entry.get("recm_skipped_steps", self.skipped_steps))
        self._rng.set_state(entry["recm_rng"])
        layer.inputs, layer.input_epochs, layer.samples, layer.sample_epochs = [], [], [], []

    def _rebuild_precomputed(self, layers: list[_Layer]) -> None:
        """Rebuild the batched training coefficients the saved run held for its next forward.

        ``step()`` leaves each layer's next-forward ``(alpha, beta)`` computed in one batched
        graph (:func:`~recm_opt.modulation._stacked_coefficients`); a freshly loaded optimizer
        would compute them per layer, which rounds differently. They are a function of the
        restored state, so the same code path as in ``step()`` (``_l_means`` on the newest
        sample, grouped alike) rebuilds them bit for bit, and a resumed run continues exactly.
        """
        if not layers or not modulation.PRECOMPUTE:
            return
        pending = [(layer, layer.samples) for layer in self._layers]
        for layer in self._layers:
            newest = layer.mod.newest
            layer.samples = [(newest, newest.shape[1])] if layer in layers and newest is not None else []
        try:
            _, stacked = self._l_means()
            for group, x, r in stacked:
                if r.requires_grad:
                    for layer, sample in zip(group, x.unbind()):
                        layer.mod.newest = sample
                    _stacked_coefficients([layer.mod for layer in group], r)
        finally:
            for layer, samples in pending:
                layer.samples = samples

    def _reset(self, layer: _Layer) -> None:
        """Fresh RECM state (t = 0, h = 0), for a checkpoint that has none for this layer."""
        mod = layer.mod
        mod.h.zero_()
        mod.t.zero_()
        mod.gamma_t.zero_()
        mod.newest = None
        layer.skipped = 0
        layer.inputs, layer.input_epochs, layer.samples, layer.sample_epochs = [], [], [], []

    # ------------------------------------------------------------------ report
    @property
    def layers(self) -> dict[str, nn.Module]:
        """The tagged layers this optimizer modulates, by stable name."""
        return {layer.name: layer.module for layer in self._layers}

    def report(self) -> list[dict[str, Any]]:
        """Return one row per tagged layer: alpha per term, beta, ``|h|``, t, kept/pruned, counters.

        The same rows that :func:`recm_opt.export.report` prints, ready for any logger.
        """
        from .export import layer_row

        return [layer_row(layer.name, layer.module, skipped=layer.skipped) for layer in self._layers]

    def __repr__(self) -> str:
        return f"RECMOptimizer({type(self.inner).__name__}, layers={len(self._layers)}, group={self.group!r})"


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned and non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _all_units(v: Tensor, units: dict[str, int], grid: dict[str, int]) -> Tensor:
    """Rows of ``v`` (``(*units, *features)``) for every unit of ``grid``, in row-major grid order.

    What indexing with ``unravel_index(arange(total))`` gives, without an index; grid
    axes that ``v`` lacks are broadcast (a per-sample target over the sample's points).
    """
    names, feat = list(units), v.shape[len(units):]
    v = v.permute(*[names.index(u) for u in grid if u in units], *range(len(units), v.dim()))
    shape = [grid[u] if u in units else 1 for u in grid]
    return v.reshape(*shape, *feat).expand(*grid.values(), *feat).reshape(-1, *feat)


def _unravel(idx: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """``torch.stack(torch.unravel_index(idx, sizes))`` without its per-call Python checks."""
    if len(sizes) == 1:
        return idx[None]
    out = []
    for n in reversed(sizes):
        out.append(idx % n)
        idx = idx // n
    return torch.stack(out[::-1])


def _nonfinite_probes(samples: list[Tensor]) -> list[Tensor]:
    """One 0-d tensor per sample that is NaN/Inf exactly when the sample has a NaN/Inf entry.

    On CUDA, one multi-tensor kernel (the largest ``|value|``). On CPU that kernel is slow,
    and ``sum(0 * x)`` is exact and fast: ``0 * finite = 0``, ``0 * inf = NaN``.
    """
    if samples[0].device.type == "cuda":
        return list(torch._foreach_norm(samples, ord=math.inf))
    return [s.mul(0).sum() for s in samples]


def _isfinite_each(xs: list[Tensor]) -> Tensor:
    """``isfinite`` of 0-d tensors as one bool vector (stacked per dtype, so nothing is rounded)."""
    if all(x.dtype == xs[0].dtype and x.device == xs[0].device for x in xs):
        return torch.isfinite(torch.stack(xs))
    return torch.stack([torch.isfinite(x).to(xs[0].device) for x in xs])


def _host_flags(pieces: list[Tensor]) -> list[bool]:
    """Bring bool tensors to the host as one list: a single sync when they share a device."""
    if not pieces:
        return []
    if all(p.device == pieces[0].device for p in pieces):
        return torch.cat([p.reshape(-1) for p in pieces]).tolist()
    return [bool(b) for p in pieces for b in p.reshape(-1).tolist()]


def _weights(samples: list[tuple[Tensor, int]]) -> Tensor:
    """Per-row weights of :meth:`RECMOptimizer._l_mean` (float64, on the host)."""
    weights = torch.cat([torch.full((s.shape[1],), u / s.shape[1], dtype=torch.float64) for s, u in samples])
    return weights / weights.sum()


def _stacked_l_mean(layers: list[_Layer], with_grad: bool = False) -> tuple[list[Tensor], Tensor, Tensor]:
    """:meth:`RECMOptimizer._l_mean` of layers whose samples have equal shapes, in one ``r_theta`` call.

    Returns:
        Each layer's l (no grad), the stacked samples ``(G, 1 + k, R, d)`` and their
        ``r_theta`` output ``(G, 1 + k, R, m)``, with grad if ``with_grad``.
    """
    mods = [layer.mod for layer in layers]
    dtype = mods[0].w_beta.dtype
    rows = [s[0][0] if len(s) == 1 else torch.cat([t for t, _ in s], 1) for s in (layer.samples for layer in layers)]
    x = (rows[0][None] if len(rows) == 1 else torch.stack(rows)).to(dtype)  # (G, 1 + k, R, d)
    g, c, r, d = x.shape
    with torch.set_grad_enabled(with_grad):
        flat = x.reshape(g, c * r, d)
        out = (mods[0].r_theta(flat) if g == 1 else _stacked_r_theta(mods, flat)).reshape(g, c, r, -1)
    diff = out.detach()[:, 0] - out.detach()[:, 1:].mean(1)
    if all(len(layer.samples) == 1 for layer in layers):  # one capture each: equal weights 1/S, a scalar
        return list((diff * (1.0 / r)).sum(1).unbind()), x, out
    weights = _to_device(torch.stack([_weights(layer.samples) for layer in layers]).to(dtype), x.device)
    return list((weights[..., None] * diff).sum(1).unbind()), x, out


def _merge_units(grid: dict[str, int], units: dict[str, int], where: str) -> None:
    for u, n in units.items():
        if grid.setdefault(u, n) != n:
            raise ValueError(f"{where}: unit axis {u!r} has size {n}, but another input has {grid[u]}")


def _has_precomputed(mod: Modulation) -> bool:
    """Whether ``mod``'s next training forward would use coefficients precomputed by ``step()``."""
    pre = getattr(mod, "_precomputed", None)
    if pre is None:
        return False
    with torch.enable_grad():
        return pre.get(mod) is not None


def _drop_backed(layer: _Layer) -> None:
    """Drop the captures made before the layer's latest backward (their gradient is gone)."""
    keep = [e >= layer.backwards for e in layer.input_epochs]
    layer.inputs = [x for x, k in zip(layer.inputs, keep) if k]
    layer.input_epochs = [e for e, k in zip(layer.input_epochs, keep) if k]
    keep = [e >= layer.backwards for e in layer.sample_epochs]
    layer.samples = [x for x, k in zip(layer.samples, keep) if k]
    layer.sample_epochs = [e for e, k in zip(layer.sample_epochs, keep) if k]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(ls: list[Tensor | None]) -> list[Tensor | None]:
    """Average each layer's l over the ranks that captured it (one collective for all layers)."""
    if not _distributed():
        return ls
    ref = next((l for l in ls if l is not None), None)
    m = max((l.numel() for l in ls if l is not None), default=0)
    device = _comm_device(ref)
    m = int(_all_reduce_max(m, device))
    buf = torch.zeros(len(ls), m + 1, dtype=torch.float64, device=device)
    for i, l in enumerate(ls):
        if l is not None:
            buf[i, : l.numel()], buf[i, m] = l.double(), 1.0
    dist.all_reduce(buf)
    dtype = ref.dtype if ref is not None else torch.float32
    return [None if buf[i, m] == 0 else (buf[i, :m] / buf[i, m]).to(dtype) for i in range(len(ls))]


def _comm_device(ref: Tensor | None) -> torch.device:
    """Device for collectives: NCCL needs CUDA tensors even on a rank that captured nothing."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return ref.device if ref is not None else torch.device("cpu")


def _all_reduce_max(x: int, device: torch.device | None = None) -> int:
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _validate(**kw: Any) -> None:
    if not kw["a"] > 0:
        raise ValueError(f"a must be > 0, got {kw['a']}")
    if not kw["b"] > 0:
        raise ValueError(f"b must be > 0, got {kw['b']}")
    for key in ("state_dim", "hidden", "max_units"):
        if isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {kw[key]!r}")
    if not 0 <= kw["prune_eps"] < 1:
        raise ValueError(f"prune_eps must be in [0, 1), got {kw['prune_eps']}")
    if not kw["weight_radius"] > 0:
        raise ValueError(f"weight_radius must be > 0, got {kw['weight_radius']}")
    k0 = kw["beta_fn"](torch.zeros(()))
    if not torch.allclose(k0, torch.ones(())):
        raise ValueError(f"beta_fn must satisfy k(0) = 1, got k(0) = {float(k0)}")
