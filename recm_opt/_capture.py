"""Input capture for :class:`~recm_opt.optimizer.RECMOptimizer`: hooks, pairing, subsampling, group actions.

A forward pre-hook on every tagged layer records the unit views of its inputs
(training-mode forwards with autograd on only; see :mod:`recm_opt.optimizer` for
which forwards count). ``observe(y)`` pairs the pending captures with the model's
target and turns each into one stacked sample ``(1 + |C_G|, S, d)``: the kept
units (at most ``max_units``, drawn from the optimizer's private generator), then
their copies under every generator of the group. A sample with a NaN/Inf entry is
counted as skipped and never reaches ``h``. Each capture remembers the layer's
backward count, so ``zero_grad()`` can drop those whose gradient it drops.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._device import _host_flags, _isfinite_each, _nonfinite_probes, _to_device
from ._layers import _Layer
from .groups import Group
from .modulation import _in_reentrant_recompute
from .reps import Representation


def _in_backward() -> bool:
    # Activation-checkpoint recomputation runs inside the autograd engine; its
    # forwards repeat units already captured, so they must not be counted again.
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class _CaptureMixin:
    """Capture half of :class:`~recm_opt.optimizer.RECMOptimizer`: record inputs, pair them with targets."""

    group: Group
    target: Representation | None
    max_units: int
    _generators: Tensor
    _rng: torch.Generator
    _layers: list[_Layer]
    _pending_rebuild: list[_Layer]

    if TYPE_CHECKING:
        def _check_group(self, rep: Representation, size: int, where: str) -> None: ...

        def _rebuild_precomputed(self, layers: list[_Layer]) -> None: ...

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


def _merge_units(grid: dict[str, int], units: dict[str, int], where: str) -> None:
    for u, n in units.items():
        if grid.setdefault(u, n) != n:
            raise ValueError(f"{where}: unit axis {u!r} has size {n}, but another input has {grid[u]}")


def _drop_backed(layer: _Layer) -> None:
    """Drop the captures made before the layer's latest backward (their gradient is gone)."""
    keep = [e >= layer.backwards for e in layer.input_epochs]
    layer.inputs = [x for x, k in zip(layer.inputs, keep) if k]
    layer.input_epochs = [e for e, k in zip(layer.input_epochs, keep) if k]
    keep = [e >= layer.backwards for e in layer.sample_epochs]
    layer.samples = [x for x, k in zip(layer.samples, keep) if k]
    layer.sample_epochs = [e for e, k in zip(layer.sample_epochs, keep) if k]
