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

The optimizer is split by concern; this module keeps the class, its validation and
``step()`` with the maths of the update (``l_theta`` means, ``h`` commits, liveness,
projections). Its other halves live in private modules: ``_layers`` (finding and
attaching tagged layers), ``_capture`` (hooks, pairing, subsampling, group actions),
``_checkpoint`` (``state_dict`` / ``load_state_dict``), ``_distributed`` (DDP) and
``_device`` (host-sync helpers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import modulation
from ._capture import _all_units, _CaptureMixin, _drop_backed, _unravel  # noqa: F401  (_all_units, _unravel: tests)
from ._checkpoint import _CheckpointMixin
from ._device import _host_flags, _to_device
from ._distributed import _all_reduce_mean, _DistributedMixin
from ._layers import _Layer, _LayersMixin, layer_name
from .groups import Group, SO3Generators
from .modulation import (
    _foreach_commit,
    _foreach_project_norm_,
    _stacked_alpha,
    _stacked_coefficients,
    _stacked_r_theta,
    is_standard,
    one_plus_tanh,
)
from .reps import Invariant, Representation

__all__ = ["RECMOptimizer", "layer_name"]


# Representations are immutable, so one shared default is safe: an invariant, batch-first target.
_DEFAULT_TARGET = Invariant("b ...")


class RECMOptimizer(_CaptureMixin, _CheckpointMixin, _DistributedMixin, _LayersMixin, Optimizer):
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
        target: Representation | None = _DEFAULT_TARGET,
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
