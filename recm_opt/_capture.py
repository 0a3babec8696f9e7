"""What the optimizer records between steps: one :class:`Capture` per training forward of a tagged layer.

A forward pre-hook on every tagged layer records a random subsample of at most
``max_units`` units of its inputs (training-mode forwards with autograd on; see
:mod:`recm_opt.optimizer` for which forwards count). A forward hook then marks the
layer's output, so that the capture learns when a backward runs through this very
forward, and in which backward pass. A capture is paired with the target of its own
forward: the target bound by ``with opt.pair(y):`` around the forward, or the next
``observe(y)`` (``step(target=y)`` calls it). Pairing turns it into one stacked sample
``(1 + |C_G|, S, d)``: the kept units, then their copies under every generator.

At ``step()`` only captures that are both paired and backed count. Captures whose
backward never ran (a forward that raised, an evaluation forward in training mode,
another model's forward through a shared layer) are dropped and counted. A capture
waits for its backward as long as its forward's autograd graph exists, however many
times the layer runs per forward (weight tying); once the graph is freed without a
backward, or the forward raised, it is dropped. ``_MAX_UNBACKED`` live captures per
layer bound the memory, with a warning when reached. A backed capture without a target, or one
target paired with forwards of several backward passes, is an error that names the
layers. Hooks hold the optimizer weakly and die in copies and pickles of the model.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._coefficients import _in_functorch
from ._device import _to_device
from ._layers import _Layer
from ._warn import warn
from .groups import Group
from .modulation import _in_backward, _in_reentrant_recompute
from .reps import Invariant, Representation
from .tagging import is_trainable

# Captures per layer waiting for their backward while their graphs still exist (a layer
# called many times per forward, several forwards before one backward); beyond it the
# oldest are dropped, with a warning. Captures whose graph is gone never count.
_MAX_UNBACKED = 1024


class Undeclared:
    """The default target: one number per unit (a class label or a scalar), invariant.

    Any other target shape is rejected at the first step, with the declaration to add.
    """

    def __repr__(self) -> str:
        return "Undeclared()"


@dataclass(eq=False)
class Capture:
    """One training forward of one tagged layer, from its inputs to its place in ``h``.

    Attributes:
        layer: the tagged layer.
        parts: per declared input: representation, kept rows ``(S, f)`` and feature shape.
        grid: the unit axes and sizes of the forward's batch.
        index: multi-index of the kept units per unit axis (``None``: every unit, row-major).
        units: the number of units the forward had (its weight in the step's mean).
        pairing: id of the ``observe``/``pair`` that gave the target; ``None`` while unpaired.
        target: the target's representation, kept rows ``(S, *features)`` and feature shape,
            once paired (``None`` without a target).
        backed: whether a backward has run through this forward.
        task: the autograd graph task of that backward.
        nested: captured by reentrant checkpointing's recomputation, whose backward is a
            graph task nested in the real one (its task says nothing about the forward).
        seq: the capture's number, in the order the forwards ran.
        dead: its forward raised, or its graph was freed without a backward.
    """

    layer: _Layer
    parts: list[tuple[Representation, Tensor, tuple[int, ...]]]
    grid: dict[str, int]
    index: dict[str, Tensor] | None
    units: int
    pairing: int | None = None
    target: tuple[Representation, Tensor, tuple[int, ...]] | None = None
    backed: bool = False
    task: int = -1
    nested: bool = False
    seq: int = 0
    dead: bool = False  # no backward can run through this forward any more (graph freed, forward raised)


class _Hook:
    """A forward (pre-)hook that forwards to the capture book; dead in copies and pickles of the model."""

    book: Any = None
    layer: Any = None

    def __init__(self, book: CaptureBook, layer: _Layer, post: bool) -> None:
        self.book, self.layer, self.post = weakref.ref(book), weakref.ref(layer), post

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        book = self.book() if self.book is not None else None
        layer = self.layer() if self.layer is not None else None
        if book is None or layer is None or module is not layer.module:
            return  # a deep copy (AveragedModel) or a detached optimizer
        _dispatch(book, layer, module, args, rest, self.post)

    def __getstate__(self) -> dict[str, Any]:
        return {"post": self.post}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.post = state.get("post", False)


@torch._dynamo.disable
def _dispatch(book: CaptureBook, layer: _Layer, module: nn.Module, args: tuple, rest: tuple, post: bool) -> None:
    if post:
        book.on_output(layer, rest[0])
    else:
        book.on_forward(layer, module, args, rest[0])


class _Backed:
    """The tensor hook on a forward's output: marks the capture backed; freed with the graph.

    The output's autograd graph holds this hook; when the graph is freed before any
    backward ran through it, the capture can never be backed, and is marked dead.
    """

    __slots__ = ("capture",)

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def __call__(self, _: Tensor) -> None:
        self.capture.backed = True
        fn = getattr(torch._C, "_current_graph_task_id", None)
        self.capture.task = int(fn()) if fn is not None else 0

    def __del__(self) -> None:
        if not self.capture.backed:
            self.capture.dead = True


def _first_grad_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out if out.requires_grad else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        found = _first_grad_tensor(item)
        if found is not None:
            return found
    return None


class CaptureBook:
    """The captures since the last step, their pairing with targets, and their samples.

    Args:
        group: the generating set ``C_G``.
        target: the target's representation; ``None`` for input-only ``l_theta``;
            an :class:`Undeclared` for the default.
        max_units: units kept per capture.
        seed: seed of the private generator that draws the kept units.
    """

    def __init__(self, group: Group, target: Representation | Undeclared | None, max_units: int, seed: int) -> None:
        self.group, self.target, self.max_units = group, target, max_units
        self.generators = group.generators()
        self.rng = torch.Generator().manual_seed(seed)
        self.records: list[Capture] = []
        self._open: dict[int, Capture | None] = {}
        self._bound: list[tuple[int, Tensor]] = []  # targets bound by pair(), innermost last
        self._last_target: Tensor | None = None  # the latest target given by observe() or pair()
        self._pairings = 0
        self._early = False  # an observe() found no forward waiting: it may have come before its forward
        self._seq = 0
        self._paused = False
        self._matrices: dict[tuple, tuple[Representation, Tensor]] = {}
        self._index: dict[tuple, dict[str, Tensor]] = {}  # unit subsample per grid, shared until the next pairing
        self._checked: set[tuple] = set()
        self._keep: list[Representation] = []  # representations whose id() keys a cache stay alive
        if target is None or isinstance(target, Undeclared):
            self._target_width = 0 if target is None else 1
        else:
            width = target.feature_width()
            if width is None:
                raise ValueError(f"target {target!r} does not declare every feature size, and r_theta's input "
                                 "width must be known when the optimizer is built: declare them, e.g. "
                                 "recm.Invariant(\"b f\", f=4)")
            self._target_width = width

    def hooks(self, layer: _Layer) -> list[Any]:
        """Register the capture hooks on the layer; return their handles."""
        return [layer.module.register_forward_pre_hook(_Hook(self, layer, post=False), with_kwargs=True),
                layer.module.register_forward_hook(_Hook(self, layer, post=True))]

    # ------------------------------------------------------------ recording
    def on_forward(self, layer: _Layer, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Record a training forward (see the module docstring for which forwards count)."""
        raised = self._open.pop(id(layer), None)
        if raised is not None:  # the layer's previous forward never returned
            raised.dead = True
        if not module.training or self._paused or _in_functorch():
            # torch.func transforms (per-sample gradients) run the layer on wrapped tensors
            # that do not outlive the transform: such forwards are not training forwards.
            return
        if not is_trainable(module):  # a frozen layer keeps its h, so its output stays
            layer.warned = True  # its unchanged h is no surprise: no "did not run" warning
            return
        if _in_backward():  # checkpoint recomputation: captured in forward unless reentrant
            # (reentrant checkpointing runs its forward under no_grad: the recomputation
            # in its backward is then the one capture)
            if not _in_reentrant_recompute():
                return
            nested = True
        elif not torch.is_grad_enabled():  # update_bn, inference under no_grad
            return
        else:
            nested = False
        capture = self._capture(layer, args, kwargs)
        if capture is None:  # a batch without units: nothing to learn from
            return
        capture.nested = nested
        self._open[id(layer)] = capture
        if self.target is None:
            self._pair([capture], None, 0)
        elif self._bound:
            self._pair([capture], self._bound[-1][1], self._bound[-1][0])
        self.records.append(capture)
        self._bound_unbacked(layer)

    def on_output(self, layer: _Layer, output: Any) -> None:
        """Mark the forward's output, so that its backward marks the capture."""
        capture = self._open.pop(id(layer), None)
        if capture is None:
            return
        out = _first_grad_tensor(output)
        if out is not None:
            out.register_hook(_Backed(capture))
        else:  # nothing to backpropagate through this forward
            capture.dead = True

    def _bound_unbacked(self, layer: _Layer) -> None:
        """Drop the layer's captures that can never be backed, and the oldest beyond ``_MAX_UNBACKED``."""
        waiting = [c for c in self.records if c.layer is layer and not c.backed]
        dead = [c for c in waiting if c.dead]
        live = [c for c in waiting if not c.dead]
        over = live[: max(0, len(live) - _MAX_UNBACKED)]
        if over and not layer.warned_unbacked:
            layer.warned_unbacked = True
            warn(f"layer {layer.name!r} ran {len(live)} training forwards whose graphs still wait for a "
                          f"backward; the oldest are dropped (at most {_MAX_UNBACKED} wait per layer). Call "
                          "backward() and step() more often, or run forwards that need no backward under "
                          "torch.no_grad()")
        if dead or over:
            drop = {id(c) for c in dead + over}
            self.records = [c for c in self.records if id(c) not in drop]
            layer.dropped += len(drop)

    def _capture(self, layer: _Layer, args: tuple, kwargs: dict) -> Capture | None:
        with torch.no_grad():  # views and the gather, without autograd's bookkeeping
            return self._record(layer, args, kwargs)

    def _record(self, layer: _Layer, args: tuple, kwargs: dict) -> Capture | None:
        views = []
        for name, rep in layer.tag.inputs.items():
            pos = layer.positions[name]
            x = args[pos] if pos < len(args) else kwargs.get(name)
            where = f"layer {layer.name!r}, input {name!r}"
            if not isinstance(x, Tensor):
                raise ValueError(f"{where}: a declared input must be a tensor in every training forward, got "
                                 f"{type(x).__name__} (r_theta's input width is fixed; leave optional inputs "
                                 "out of the declaration)")
            v, units = rep.unit_view(x, where)
            if rep.axis is not None:
                self.check_group(rep, v.shape[rep._axis_dim()], where)
            views.append((rep, v, units, where))
        grid: dict[str, int] = {}
        for _, _, units, where in views:
            for u, n in units.items():
                if grid.setdefault(u, n) != n:
                    raise ValueError(f"{where}: unit axis {u!r} has size {n}, but another input has {grid[u]}")
        total = math.prod(grid.values())
        if total == 0:
            return None
        index = None if total <= self.max_units else self._shared_index(grid, total, views[0][1].device)
        parts = []
        width = self.target_width(layer)
        for rep, v, units, where in views:
            rows = _rows(v, units, grid, index)
            if not rows.is_floating_point():
                rows = rows.to(torch.get_default_dtype())
            feat = tuple(v.shape[len(units):])
            self._check_action(rep, rows, feat, where)
            parts.append((rep, rows, feat))
            width += math.prod(feat)
        if width != layer.mod.in_features:
            raise ValueError(f"layer {layer.name!r}: this forward gives r_theta {width} features per unit "
                             f"(inputs {[tuple(p[2]) for p in parts]} and the target), but it was built for "
                             f"{layer.mod.in_features}; every training forward must have the same feature sizes")
        self._seq += 1
        return Capture(layer, parts, grid, index, total, seq=self._seq)

    def _shared_index(self, grid: dict[str, int], total: int, device: torch.device) -> dict[str, Tensor]:
        """The kept units for ``grid``: drawn once, shared by every layer until the next pairing."""
        key = (tuple(grid.items()), device)
        index = self._index.get(key)
        if index is None:
            idx = torch.randperm(total, generator=self.rng)[: self.max_units]
            index = self._index[key] = dict(zip(grid, _to_device(_unravel(idx, tuple(grid.values())), device).unbind()))
        return index

    def target_width(self, layer: _Layer | None = None) -> int:
        """The features per unit that the target adds to ``r_theta``'s input."""
        return self._target_width

    def _check_action(self, rep: Representation, rows: Tensor, feat: tuple[int, ...], where: str) -> None:
        key = (id(rep), feat)
        if key in self._checked:
            return
        x = rows[:2]
        rep.check_action(self.group, self.generators, x.to(torch.get_default_dtype()) if not x.is_floating_point()
                         else x, where)
        self._checked.add(key)
        self._keep.append(rep)

    def check_group(self, rep: Representation, size: int, where: str) -> None:
        """Fail, naming ``where``, when the group cannot act on ``size`` entries of ``rep``'s axis."""
        key = ("group", id(rep), size)
        if rep.axis is None or key in self._checked:
            return
        try:
            rep.matrices(self.group, self.generators[:1], size)
        except ValueError as err:
            raise ValueError(f"{where}: {rep!r} does not match the group {self.group!r} ({err})") from err
        self._checked.add(key)
        self._keep.append(rep)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (the re-evaluations of a line-search closure)."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    # -------------------------------------------------------------- pairing
    def observe(self, target: Tensor) -> None:
        """Pair the unpaired captures with ``target``.

        Called after the backward (``step(target=y)``), the forwards it belongs to are the
        backed ones; the others (no backward) stay unpaired and are dropped at the step.
        Called before it (Lightning's ``training_step``), every unpaired capture is paired.
        """
        waiting = [c for c in self.records if c.pairing is None]
        if not waiting and self.records and self.target is not None and not _same(target, self._last_target):
            names = sorted({c.layer.name for c in self.records})
            raise ValueError(f"every forward of layers {names} since the last step is already paired with a target "
                             "(by observe() or pair()), and this target differs: a forward has one target. Call "
                             "observe(y) once per forward, and step() without target= after observe() or pair()")
        self._pairings += 1
        self._index.clear()  # the next forward draws its own units
        backed = [c for c in waiting if c.backed]
        self._early = self._early or not waiting
        self._pair(backed or waiting, target, self._pairings)
        self._last_target = target

    @contextlib.contextmanager
    def bind(self, target: Tensor) -> Iterator[None]:
        """Pair the captures of the forwards inside the block with ``target``."""
        self._pairings += 1
        self._index.clear()
        self._bound.append((self._pairings, target))
        self._last_target = target
        try:
            yield
        finally:
            self._bound.pop()

    def _pair(self, captures: list[Capture], target: Tensor | None, pairing: int) -> None:
        """Pair captures with ``target``; every target is checked first, so an error changes nothing.

        The newest capture of each layer is the forward the target belongs to: a mismatch
        there is an error. An older capture that does not fit is another forward (one that
        raised, or another model's): without a backward it is dropped, with one it is an error.
        Only the target's kept rows are taken here; the samples are built, for all layers
        at once, by :meth:`batches` at the step.
        """
        cache: dict[Any, Any] = {}
        newest = {id(c.layer): c for c in captures}
        targets: list[Any] = []
        for c in captures:
            try:
                targets.append(self._paired_target(c, target, cache) if target is not None else None)
            except ValueError:
                if c.backed or newest[id(c.layer)] is c:
                    raise
                targets.append(False)
        for c, t in zip(captures, targets):
            if t is False:
                self.records.remove(c)
                c.layer.dropped += 1
            else:
                c.target, c.pairing = t, pairing

    def _target_view(self, c: Capture, target: Tensor, cache: dict) -> tuple[Representation, Tensor, dict[str, int]]:
        rep = self.target
        where = f"layer {c.layer.name!r}, target"
        if isinstance(rep, Undeclared):
            if target.dim() != 1:
                raise ValueError(undeclared_message(target))
            rep = _invariant_on(next(iter(c.grid)))
        assert isinstance(rep, Representation)
        key = id(rep)
        if key not in cache:
            cache[key] = rep.unit_view(target.detach(), where)
        v, units = cache[key]
        if rep.axis is not None:
            self.check_group(rep, v.shape[rep._axis_dim()], where)
        if not set(units) <= set(c.grid) or any(c.grid[u] != n for u, n in units.items()):
            raise ValueError(f"{where}: target units {units} (shape {tuple(target.shape)}) do not match "
                             f"the layer's input units {c.grid}")
        return rep, v, units

    def _paired_target(self, c: Capture, target: Tensor, cache: dict) -> tuple[Representation, Tensor, tuple]:
        """The target's rows for capture ``c`` (shared by captures with the same units and subsample)."""
        rep, v, units = self._target_view(c, target, cache)
        key = (id(rep), tuple(c.grid.items()), id(c.index))
        if key not in cache:
            rows = _rows(v.detach(), units, c.grid, c.index)
            if not rows.is_floating_point():
                rows = rows.to(torch.get_default_dtype())
            feat = tuple(v.shape[len(units):])
            if math.prod(feat) != self.target_width(c.layer):
                raise ValueError(f"layer {c.layer.name!r}, target: {math.prod(feat)} features per unit, but "
                                 f"{self.target!r} declares {self.target_width(c.layer)}")
            cache[key] = (rep, rows, feat)
        return cache[key]

    def batches(self, captures: list[Capture]) -> list[tuple[list[Capture], Tensor]]:
        """The captures' stacked samples, one batch per shape: ``(n, 1 + |C_G|, S, d)``.

        Per capture: the kept units, then their copies under every generator; features
        in input order, the target last. Captures whose inputs and target have the same
        representations and shapes are stacked, so each representation acts once per batch.
        With ``foreach`` False (:meth:`batches_per_capture`) each capture is its own batch.
        """
        groups: dict[tuple, list[Capture]] = {}
        for c in captures:
            key = (tuple((id(rep), tuple(rows.shape), rows.dtype, rows.device) for rep, rows, _ in c.parts),
                   None if c.target is None else (id(c.target[0]), tuple(c.target[1].shape), c.target[1].dtype))
            groups.setdefault(key, []).append(c)
        return [(cs, self._stack(cs)) for cs in groups.values()]

    def batches_per_capture(self, captures: list[Capture]) -> list[tuple[list[Capture], Tensor]]:
        """:meth:`batches` with one capture per batch (the per-layer reference)."""
        return [([c], self._stack([c])) for c in captures]

    def _stack(self, cs: list[Capture]) -> Tensor:
        """The stacked samples ``(n, 1 + k, S, d)`` of captures with equal shapes, written part by part.

        Each part's identity rows and generator copies are written into their feature slice
        of one preallocated tensor, so the step's transient memory is the output plus one
        part's copies (concatenating would hold every part twice).
        """
        n, first = len(cs), cs[0]
        parts = [(rep, rows[None] if n == 1 else torch.stack([c.parts[j][1] for c in cs]), feat)
                 for j, (rep, rows, feat) in enumerate(first.parts)]
        if first.target is not None:
            rep, rows, feat = first.target
            shared = all(c.target is not None and c.target[1] is rows for c in cs)  # one target: act once
            parts.append((rep, rows[None] if shared else torch.stack([c.target[1] for c in cs]), feat))  # type: ignore[index]
        x0 = parts[0][1]
        k = len(self.generators)
        width = sum(math.prod(feat) for _, _, feat in parts)
        out = torch.empty((n, 1 + k, x0.shape[1], width), dtype=x0.dtype, device=x0.device)
        copies = out.transpose(0, 1)  # (1 + k, n, S, d): the identity copy first, then each generator's
        offset = 0
        for rep, x, feat in parts:  # x: (n or 1, S, *feat); a shared target broadcasts over the n captures
            f = math.prod(feat)
            m, s = x.shape[0], x.shape[1]
            block = copies[..., offset:offset + f]
            block[0].copy_(x.reshape(m, s, f))
            block[1:].copy_(self._act(rep, x.reshape(m * s, *feat)).reshape(k, m, s, f))
            offset += f
        return out

    def _act(self, rep: Representation, x: Tensor) -> Tensor:
        """``rep.act`` over the generators; the default action's matrices are built and moved once."""
        if type(rep).act is not Representation.act:  # Invariant, Custom, ...: their own action
            return rep.act(self.group, self.generators, x)
        d = rep._axis_dim()
        key = (id(rep), x.shape[d], x.dtype, x.device)
        if key not in self._matrices:  # keep rep alive with its matrices, so that id(rep) stays unique
            D = rep.matrices(self.group, self.generators, x.shape[d]).to(dtype=x.dtype, device=x.device)
            self._matrices[key] = (rep, D.mT.contiguous())
        DT = self._matrices[key][1]
        xm = x if d == -1 else x.movedim(d, -1)
        # x' = x @ D(g).T for every g: one batched matmul over the generators, its output contiguous
        rows = xm.reshape(-1, xm.shape[-1])
        out = torch.bmm(rows.expand(len(DT), *rows.shape), DT).view(len(DT), *xm.shape)
        return out if d == -1 else out.movedim(-1, d)

    # ----------------------------------------------------------------- step
    def check(self) -> None:
        """Raise, before the step changes anything, if a backed capture has no target of its own.

        Raises:
            ValueError: naming the layers and the number of forwards concerned.
        """
        unpaired = [c for c in self.records if c.backed and c.pairing is None]
        if unpaired:
            names = sorted({c.layer.name for c in unpaired})
            forwards = max(1, len({c.task for c in unpaired if not c.nested}))
            how = ("opt.observe(y) ran when no forward was waiting for a target, that is before the forward it "
                   "belongs to: call it after the forward (in a Hugging Face Trainer's compute_loss, after "
                   "`outputs = model(...)`), or wrap the forward in `with opt.pair(y):`." if self._early else
                   "call opt.observe(y) after each forward, wrap it in `with opt.pair(y):`, or pass "
                   "opt.step(target=y) when the step follows a single forward.")
            raise ValueError(
                f"layers {names} ran {forwards} training forward(s) with a backward but no target: {how} "
                "For input-only l_theta build RECMOptimizer(target=None)")
        tasks: dict[int, set[int]] = {}
        for c in self.records:
            if c.backed and c.pairing is not None and not c.nested:
                tasks.setdefault(c.pairing, set()).add(c.task)
        shared = {p: t for p, t in tasks.items() if len(t) > 1}
        if shared:
            names = sorted({c.layer.name for c in self.records if c.pairing in shared})
            forwards = max(len(t) for t in shared.values())
            ran: dict[int, set[str]] = {}  # backward pass -> the layers it ran
            for c in self.records:
                if c.pairing in shared and not c.nested:
                    ran.setdefault(c.task, set()).add(c.layer.name)
            if len({frozenset(v) for v in ran.values()}) > 1:  # some backward passes ran only part of the model
                raise ValueError(self._partial_backward_message(ran))
            raise ValueError(
                f"one target was paired with {forwards} forwards of layers {names} whose backward ran separately "
                "(gradient accumulation?): each micro-batch needs its own target, opt.observe(y_i) after its "
                "forward or `with opt.pair(y_i):` around it; opt.step(target=y) pairs only a single forward")

    @staticmethod
    def _partial_backward_message(ran: dict[int, set[str]]) -> str:
        every = set().union(*ran.values())
        partial = sorted({name for names in ran.values() if names != every for name in names})
        missing = sorted(every - set().union(*(v for v in ran.values() if v != every)))
        return (f"layers {partial} ran a forward and backward of their own, without layers {missing} of this "
                "model, before this step's target was given: is a layer shared with another model that its own "
                "optimizer trains? Its forwards are captured like this model's. Call this optimizer's "
                "opt.zero_grad() after the other model's backward and before this model's forward: it drops the "
                "captures whose backward has run")

    def take(self) -> dict[_Layer, list[Capture]]:
        """Remove every capture; return the paired, backed ones by layer. The others are counted as dropped."""
        used: dict[_Layer, list[Capture]] = {}
        for c in self.records:
            if c.backed and c.pairing is not None:
                used.setdefault(c.layer, []).append(c)
            else:
                c.layer.dropped += 1
                c.layer.ran_unbacked = True
        self.clear()
        return used

    def drop_backed(self) -> None:
        """Drop the captures whose backward has run (``zero_grad`` drops their gradient)."""
        self.records = [c for c in self.records if not c.backed]

    def clear(self) -> None:
        """Forget every capture."""
        self.records = []
        self._early = False
        self._index.clear()
        self._open.clear()
        self._last_target = None


def _same(a: Tensor, b: Tensor | None) -> bool:
    """Whether ``a`` is the target ``b`` again (the same tensor, or equal values)."""
    if b is None or a is b:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def undeclared_message(target: Tensor) -> str:
    """The error for a target whose representation was never declared, with the declaration to add."""
    shape = tuple(target.shape)
    feat = shape[1:]
    pattern = "b " + " ".join(f"f{i}" for i in range(len(feat)))
    sizes = ", ".join(f"f{i}={n}" for i, n in enumerate(feat))
    vector = ' target=recm.Vector("b xyz") if it rotates with the inputs (a 3-vector per sample),' \
        if feat == (3,) else ""
    return (f"the target's representation was never declared, and a target of shape {shape} is not one number "
            f"per unit. Declare it when building the optimizer:{vector} target=recm.Invariant(\"{pattern}\", "
            f"{sizes}) if the group leaves it unchanged, or target=None for input-only l_theta (which cannot see "
            "a target that breaks the symmetry)")


def _invariant_on(unit: str) -> Invariant:
    cached = _INVARIANTS.get(unit)
    if cached is None:
        cached = _INVARIANTS[unit] = Invariant(unit)
    return cached


_INVARIANTS: dict[str, Invariant] = {}


def _rows(v: Tensor, units: dict[str, int], grid: dict[str, int], index: dict[str, Tensor] | None) -> Tensor:
    """The kept units' rows ``(S, *features)`` of a unit view ``(*units, *features)``."""
    return _all_units(v, units, grid) if index is None else v[tuple(index[u] for u in units)]


def _all_units(v: Tensor, units: dict[str, int], grid: dict[str, int]) -> Tensor:
    """Rows of ``v`` (``(*units, *features)``) for every unit of ``grid``, in row-major grid order.

    What indexing with ``unravel_index(arange(total))`` gives, without an index; grid
    axes that ``v`` lacks are broadcast (a per-sample target over the sample's points).
    """
    names, feat = list(units), v.shape[len(units):]
    if names == list(grid):  # the usual case: the grid's own axes, in order (no permute, no broadcast)
        # (called under no_grad: the rows do not require grad, and they alias the input)
        return v if len(names) == 1 else v.reshape(-1, *feat)
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
