"""``RECMOptimizer``: wraps any torch optimizer and adds RECM's per-layer modulation.

One ``step()`` runs, in order: the closure (if any), the inner optimizer's step,
the projections (``||w_alpha_i|| <= 1``, ``||w_beta|| <= 1``, unconstrained
weights within ``weight_radius``), then the ``h`` update of every tagged layer
from the inputs captured since the last step and their targets.

Captured statistics: every training-mode forward of a tagged layer (with autograd
on, outside backward recomputation) records a random subsample of at most
``max_units`` units of its inputs. ``observe(y)`` pairs the pending captures with
the model's target. At ``step()`` the layer's ``l_theta`` is the unit-weighted
mean over all captures since the last step, so k micro-batches of gradient
accumulation give the ``l_theta`` of their union (exactly, when each has at most
``max_units`` units). Under DDP, ``l_theta`` is averaged over ranks and the
modulation parameters' gradients are all-reduced, so every rank holds the same h.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .groups import Group, SO3Generators
from .modulation import Modulation, one_plus_tanh, project_norm_
from .reps import Invariant, Representation
from .tagging import _MODULATION, get_relaxation

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
        self.inputs: list[list[tuple[str, Representation, Tensor]]] = []  # awaiting a target
        self.samples: list[tuple[Tensor, int]] = []  # (stacked sample, units it stands for)
        self.skipped = 0
        self.warned = False
        self.term_params = {
            t: [p for a in attrs for p in _attr_params(module, a)] for t, attrs in tag.terms.items()
        }


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
        self._hooks = [self._register_hook(layer) for layer in self._layers]

    # ------------------------------------------------------------------ set-up
    def _attach(self, model: nn.Module, state_dim: int, hidden: int, seed: int,
                beta_fn: Callable[[Tensor], Tensor], skip_pruned: bool) -> list[_Layer]:
        inner_params = {id(p) for g in self.inner.param_groups for p in g["params"]}
        layers = []
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
            mod = self._make_modulation(tag.term_names, state_dim, hidden, seed + 7919 * len(layers), beta_fn)
            ref = next(iter(module.parameters()), None)
            if ref is not None:
                mod.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            mod.train_all_live = not skip_pruned
            mod.prune_eps = self.prune_eps
            module.add_module(_MODULATION, mod)
            layers.append(_Layer(name, module, mod))
        return layers

    def _make_modulation(self, terms: tuple[str, ...], state_dim: int, hidden: int, seed: int,
                         beta_fn: Callable[[Tensor], Tensor]) -> Modulation:
        """Create one layer's modulation; relaxation policies (:mod:`recm_opt.policies`) override it."""
        return Modulation(terms, state_dim, hidden, seed, beta_fn)

    def _register_hook(self, layer: _Layer) -> Any:
        opt_ref, layer_ref = weakref.ref(self), weakref.ref(layer.module)

        @torch._dynamo.disable
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            opt = opt_ref()
            # Deep copies (AveragedModel) keep this hook: only the original layer counts.
            if opt is None or module is not layer_ref() or not module.training:
                return
            if not torch.is_grad_enabled() or _in_backward():
                return
            opt._capture(layer, args, kwargs)

        return layer.module.register_forward_pre_hook(capture, with_kwargs=True)

    # --------------------------------------------------------------- capturing
    def _capture(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        found = []
        for name, rep in layer.tag.inputs.items():
            pos = layer.positions[name]
            x = args[pos] if pos < len(args) else kwargs.get(name)
            if isinstance(x, Tensor):
                found.append((name, rep, x.detach()))
        for name, rep, x in found:  # validate now, so a bad shape fails in the user's forward
            rep.unit_view(x, f"layer {layer.name!r}, input {name!r}")
        if found:
            layer.inputs.append(found)
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
        for layer in self._layers:
            self._pair(layer, target)

    def _pair(self, layer: _Layer, target: Tensor | None) -> None:
        for found in layer.inputs:
            sample, units = self._sample(layer, found, target)
            if not bool(torch.isfinite(sample).all()):
                layer.skipped += 1  # a NaN/Inf batch never reaches h
                continue
            layer.samples.append((sample, units))
        layer.inputs = []

    def _sample(self, layer: _Layer, found: list, target: Tensor | None) -> tuple[Tensor, int]:
        views, grid = [], {}
        for name, rep, x in found:
            v, units = rep.unit_view(x, f"layer {layer.name!r}, input {name!r}")
            _merge_units(grid, units, f"layer {layer.name!r}, input {name!r}")
            views.append((rep, v, units))
        if target is not None:
            assert self.target is not None
            where = f"layer {layer.name!r}, target"
            v, units = self.target.unit_view(target.detach(), where)
            if not set(units) <= set(grid) or any(grid[u] != n for u, n in units.items()):
                raise ValueError(f"{where}: target units {units} (shape {tuple(target.shape)}) do not match "
                                 f"the layer's input units {grid}")
            views.append((self.target, v, units))
        total = math.prod(grid.values())
        idx = torch.randperm(total, generator=self._rng)[: self.max_units] if total > self.max_units \
            else torch.arange(total)
        multi = dict(zip(grid, torch.unravel_index(idx, tuple(grid.values()))))
        parts = [self._stack(rep, v, units, multi) for rep, v, units in views]
        return torch.cat(parts, -1), total

    def _stack(self, rep: Representation, v: Tensor, units: dict[str, int], multi: dict[str, Tensor]) -> Tensor:
        rows = v[tuple(multi[u].to(v.device) for u in units)]  # (S, *features)
        if not rows.is_floating_point():
            rows = rows.to(torch.get_default_dtype())
        rows = rows.reshape(len(rows), -1) if rows.dim() > 1 else rows[:, None]
        feat = rows.reshape(rows.shape[0], *v.shape[len(units):]) if v.dim() > len(units) else rows
        moved = rep.act(self.group, self._generators, feat)  # (k, S, *features)
        return torch.cat([rows[None], moved.reshape(moved.shape[0], rows.shape[0], -1)])

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
        if self.skip_nonfinite and not self._grads_finite():
            self.skipped_steps += 1
            for layer in self._layers:
                layer.samples = []
            return loss
        self._sync_grads()
        self.inner.step()
        self._project()
        self._update_states()
        return loss

    def _check_targets(self) -> None:
        waiting = [layer.name for layer in self._layers if layer.inputs]
        if waiting:
            raise ValueError(
                f"layers {waiting} captured inputs but got no target: call opt.step(target=y) or "
                "opt.observe(y) after each forward, or build RECMOptimizer(target=None) for input-only l_theta"
            )

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack([n.float().cpu() if n.device.type == "meta" else n.float()
                                                for n in norms])).all())

    def _project(self) -> None:
        for layer in self._layers:
            project_norm_([layer.mod.w_alpha], 1.0, dim=1)
            project_norm_([layer.mod.w_beta], 1.0)
            project_norm_([p for ps in layer.term_params.values() for p in ps], self.weight_radius)

    def _update_states(self) -> None:
        active = any(layer.samples for layer in self._layers)
        for layer in self._layers:
            if not layer.samples and not layer.warned and (active or self._any_grad()):
                warnings.warn(f"layer {layer.name!r} did not run in training mode since the last step; "
                              "its h is unchanged", stacklevel=3)
                layer.warned = True
        ls = _all_reduce_mean([self._l_mean(layer) if layer.samples else None for layer in self._layers])
        for layer, l in zip(self._layers, ls):
            if l is None:
                continue
            if not bool(torch.isfinite(l).all()):
                layer.skipped += 1
            else:
                layer.mod.commit(l, self.a, self.b)
                if layer.samples:
                    layer.mod.newest = self._newest(layer)
            layer.samples = []
        self._refresh_live()

    def _any_grad(self) -> bool:
        return any(p.grad is not None for g in self.param_groups for p in g["params"])

    def _l_mean(self, layer: _Layer) -> Tensor:
        samples = [s.to(layer.mod.w_beta.dtype) for s, _ in layer.samples]
        weights = torch.cat([torch.full((s.shape[1],), u / s.shape[1]) for s, (_, u) in zip(samples, layer.samples)])
        weights = (weights / weights.sum()).to(samples[0])
        r = layer.mod.r_theta(torch.cat(samples, 1))  # one batched call over copies and captures
        return (weights[:, None] * (r[0] - r[1:].mean(0))).sum(0)

    def _newest(self, layer: _Layer) -> Tensor:
        sample = torch.cat([s for s, _ in layer.samples], 1).to(layer.mod.w_beta.dtype)
        if sample.shape[1] > self.max_units:
            keep = torch.randperm(sample.shape[1], generator=self._rng)[: self.max_units]
            sample = sample[:, keep.to(sample.device)]
        return sample

    def _refresh_live(self) -> None:
        if not self._layers:
            return
        alphas = [layer.mod.coefficients()[0].abs() for layer in self._layers]
        flags = (torch.cat(alphas) >= self.prune_eps).tolist()  # one sync for every layer
        for layer in self._layers:
            k = len(layer.mod.terms)
            layer.mod.live, flags = tuple(flags[:k]), flags[k:]

    def _sync_grads(self) -> None:
        if not _distributed():
            return
        params = [p for layer in self._layers for p in layer.mod.parameters()]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(has)
        grads = []
        for p, h in zip(params, has.tolist()):
            if h > 0 and p.grad is None:
                p.grad = torch.zeros_like(p)
            if h > 0:
                grads.append(p.grad)
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            torch._foreach_copy_(grads, list(flat.split([g.numel() for g in grads])))  # type: ignore[attr-defined]

    # ------------------------------------------------------ optimizer plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the inner optimizer (which shares this optimizer's param groups)."""
        self.inner.zero_grad(set_to_none=set_to_none)

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
        sd = self.inner.state_dict()
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        for layer in self._layers:
            i = index[id(layer.mod.w_beta)]
            sd["state"][i] = {**sd["state"].get(i, {}), **self._layer_state(layer)}
        return sd

    def _layer_state(self, layer: _Layer) -> dict[str, Tensor]:
        mod = layer.mod
        newest = mod.newest if mod.newest is not None else torch.zeros(0)
        return {"recm_h": mod.h.clone(), "recm_t": mod.t.clone(), "recm_gamma": mod.gamma_t.clone(),
                "recm_newest": newest.clone(), "recm_skipped": torch.tensor(layer.skipped),
                "recm_rng": self._rng.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or a plain inner-optimizer one (fresh RECM state)."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        recm = {k: {n: v.pop(n) for n in list(v) if n.startswith("recm_")} for k, v in state.items()}
        state = {k: v for k, v in state.items() if v}
        if self._layers and not any(g.get("recm") for g in groups):
            warnings.warn("state dict has no RECM param group (a plain optimizer checkpoint?): "
                          "loading the inner state and starting fresh RECM state", stacklevel=2)
            groups = self._with_fresh_recm_group(groups)
        self.inner.load_state_dict({"state": state, "param_groups": groups})
        saved = list(chain.from_iterable(g["params"] for g in groups))
        current = [id(p) for p in chain.from_iterable(g["params"] for g in self.param_groups)]
        for layer in self._layers:
            entry = recm.get(saved[current.index(id(layer.mod.w_beta))], {})
            if entry:
                self._restore(layer, entry)
        self._refresh_live()

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
        self._rng.set_state(entry["recm_rng"])

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


def _merge_units(grid: dict[str, int], units: dict[str, int], where: str) -> None:
    for u, n in units.items():
        if grid.setdefault(u, n) != n:
            raise ValueError(f"{where}: unit axis {u!r} has size {n}, but another input has {grid[u]}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(ls: list[Tensor | None]) -> list[Tensor | None]:
    """Average each layer's l over the ranks that captured it (one collective for all layers)."""
    if not _distributed():
        return ls
    ref = next((l for l in ls if l is not None), None)
    m = max((l.numel() for l in ls if l is not None), default=0)
    m = int(_all_reduce_max(m))
    device = ref.device if ref is not None else None
    buf = torch.zeros(len(ls), m + 1, dtype=torch.float64, device=device)
    for i, l in enumerate(ls):
        if l is not None:
            buf[i, : l.numel()], buf[i, m] = l.double(), 1.0
    dist.all_reduce(buf)
    dtype = ref.dtype if ref is not None else torch.float32
    return [None if buf[i, m] == 0 else (buf[i, :m] / buf[i, m]).to(dtype) for i in range(len(ls))]


def _all_reduce_max(x: int) -> int:
    t = torch.tensor([x])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _validate(**kw: Any) -> None:
    if not kw["a"] > 0:
        raise ValueError(f"a must be > 0, got {kw['a']}")
    if not kw["b"] > 0:
        raise ValueError(f"b must be > 0, got {kw['b']}")
    for key in ("state_dim", "hidden", "max_units"):
        if not isinstance(kw[key], int) or kw[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {kw[key]!r}")
    if not 0 <= kw["prune_eps"] < 1:
        raise ValueError(f"prune_eps must be in [0, 1), got {kw['prune_eps']}")
    if not kw["weight_radius"] > 0:
        raise ValueError(f"weight_radius must be > 0, got {kw['weight_radius']}")
    k0 = kw["beta_fn"](torch.zeros(()))
    if not torch.allclose(k0, torch.ones(())):
        raise ValueError(f"beta_fn must satisfy k(0) = 1, got k(0) = {float(k0)}")
