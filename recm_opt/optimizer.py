"""``RECMOptimizer``: wraps any torch optimizer and adds RECM's per-layer modulation.

One ``step()`` runs, in order: the closure (if any), the inner optimizer's step,
the projections (``||w_alpha_i|| <= 1``, ``||w_beta|| <= 1``, unconstrained
weights within ``weight_radius``), then the ``h`` update of every tagged layer
from the forwards captured since the last step, each paired with its own target.

Which forwards count: training-mode forwards of a tagged layer with autograd on,
whose backward has run by the time of the step. Eval forwards, ``torch.no_grad()``
forwards (``update_bn``), forwards of deep copies (``AveragedModel``) and
activation-checkpoint recomputation are not captured; with reentrant checkpointing,
whose first forward runs without autograd, the single recomputation in backward is
captured instead. A capture whose backward never ran is dropped and counted. At
``step()`` a layer's ``l_theta`` is the unit-weighted mean over its captures, so k
micro-batches of gradient accumulation give the ``l_theta`` of their union (exactly,
when each has at most ``max_units`` units). ``zero_grad()`` discards the captures
whose backward has already run, so a step that GradScaler skips leaves nothing
behind. Under DDP, ``l_theta`` is averaged over ranks and the modulation
parameters' gradients are all-reduced, so every rank holds the same ``h``.

The state belongs to the model: ``h``, ``t``, ``gamma_t`` and the modulation's
parameters are in ``model.state_dict()``. The optimizer holds its parts by
composition: a :class:`~recm_opt._capture.CaptureBook` (captures and pairing), a
list of :class:`~recm_opt._layers._Layer` records, and functions over them for the
update (``_update``), checkpoints (``_checkpoint``) and DDP (``_distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _checkpoint, _update
from ._capture import Capture, CaptureBook, Undeclared, _all_units, _unravel  # noqa: F401  (_all_units, _unravel: tests)
from ._coefficients import CoefficientBook
from ._device import _finite_rows, _host_flags
from ._distributed import _distributed, sync_grads
from ._layers import (
    _Found,
    _Layer,
    attach,
    clear_dead_hooks,
    find_layers,
    input_widths,
    layer_name,
    make_layer,
    move_out,
    recm_group,
    to_layer_device,
)
from ._validation import check_int, check_number, check_settings
from ._warn import warn
from .groups import Group, SO3Generators
from .modulation import Modulation, _foreach_project_norm_, _is_dtensor, one_plus_tanh
from .reps import Representation, Vector
from .schedule import ModulationStep, attached_schedulers, modulation_lr, run_defaults, run_length
from .tagging import _MODULATION, get_relaxation

__all__ = ["RECMConfig", "RECMOptimizer", "layer_name"]

# The default target: one number per unit (labels, scalars); other shapes ask for a declaration.
_UNDECLARED = Undeclared()
_SKIP_WARN = 10  # consecutive skipped steps before a warning
_EPOCH_CHECK = 20  # optimizer steps after which a scheduler that gave the run length must have kept pace


@dataclass(frozen=True)
class RECMConfig:
    """Expert settings of :class:`RECMOptimizer`; the defaults need no tuning.

    Pass one as ``config=``, or any field as a keyword of the optimizer (``a=1e-3``), which wins.

    Args:
        a: the constant of ``gamma_t = a / (b + a t)``. ``None``: ``min(1, 50 / total_steps)``
            (see :mod:`recm_opt.schedule`).
        b: the offset of ``gamma_t``.
        lr: peak step size of RECM's own update of the modulation parameters. ``None``:
            ``min(0.05, 0.5 / sqrt(total_steps))``. It decays to 0 at the end of the run.
        weight_decay: decoupled weight decay of the modulation parameters.
        state_dim: m, the size of each layer's state ``h``.
        hidden: width of ``r_theta``'s hidden layer.
        max_units: units of each captured batch kept for ``l_theta``.
        prune_eps: terms with ``|alpha| < prune_eps`` are pruned in eval and export.
        prune_z: a layer's terms are also pruned while ``||h||^2 < prune_z^2 * noise_var``:
            ``h`` does not stand out of its own sampling noise (``noise_var``, the realised
            variance of ``h`` when the data are symmetric). ``0``: the ``prune_eps`` test alone.
        alpha_fn: the map ``s`` of ``alpha = s(w_alpha . h)``: ``"odd_gelu"`` (default,
            ``sign(x) GELU(|x|)``: odd, no flat minimum) or ``"gelu"``.
        beta_fn: the map ``k`` of ``beta = k(w_beta . h)``, with ``k(0) = 1`` (default ``1 + tanh``).
        weight_radius: Frobenius-norm radius of every unconstrained term's parameters.
        skip_pruned: skip pruned terms also in training forwards (faster; changes dynamics).
        skip_nonfinite: skip the whole step when any gradient is NaN/Inf.
        seed: seed of the private generator for initialisation and subsampling.
        foreach: batch RECM's work across layers so that its number of kernels per step does
            not grow with the number of layers. ``None`` (default) and ``True``: batched
            wherever the modulations allow; ``False``: the per-layer reference loop (the same
            maths, equal to rounding).

    Example:
        >>> RECMConfig(a=1e-3).alpha_fn
        'odd_gelu'
    """

    a: float | None = None
    b: float = 1.0
    lr: float | None = None
    weight_decay: float = 0.0
    state_dim: int = 16
    hidden: int = 16
    max_units: int = 256
    prune_eps: float = 0.01
    prune_z: float = 3.0
    alpha_fn: str = "odd_gelu"
    beta_fn: Callable[[Tensor], Tensor] = one_plus_tanh
    weight_radius: float = 1.0
    skip_pruned: bool = False
    skip_nonfinite: bool = True
    seed: int = 0
    foreach: bool | None = None


class RECMOptimizer(Optimizer):
    """Recurrent Equivariant Constraint Modulation around any ``torch.optim.Optimizer``.

    The inner optimizer trains the model's weights; RECM trains its own modulation
    parameters (``r_theta``, ``w_alpha``, ``w_beta``) with an update of its own, an Adam
    step whose size derives from the run length (:mod:`recm_opt.schedule`), so that the
    relaxation learned is the same under AdamW, SGD, LBFGS or any other optimizer.

    Args:
        optimizer: the inner optimizer over the model's parameters (AdamW, SGD, LBFGS, ...).
        model: the model holding the ``@relaxed`` layers (plain, compiled or DDP-wrapped).
        group: the symmetry group's generating set ``C_G`` (default SO(3)).
        target: representation of the model's target; ``None`` for input-only
            ``l_theta(z)``. Default: undeclared, which accepts one number per unit
            (class labels, scalar regression) and rejects other targets at the first
            step with the declaration to add.
        example: model inputs for one forward (no grad, eval mode) that reads each
            layer's input width, needed when the representations do not declare every
            feature size (a tensor, a tuple of positional inputs or a dict of keywords).
        total_steps: the run length in optimizer steps, from which ``a`` and RECM's step size
            derive. ``None``: read at the first step from an attached LR scheduler that knows
            it (``OneCycleLR``, ``CosineAnnealingLR``, ...); failing that, RECM warns once and
            assumes an open-ended run.
        config: expert settings (:class:`RECMConfig`).
        **settings: any :class:`RECMConfig` field by name (``a=1e-3``, ``lr=...``); wins over ``config``.

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
        >>> opt = RECMOptimizer(torch.optim.AdamW(model.parameters()), model, target=Vector("b xyz"),
        ...                     total_steps=100)
        >>> x = torch.randn(8, 3)
        >>> model(x).pow(2).sum().backward()
        >>> _ = opt.step(target=x)
        >>> int(model.recm_modulation.t), "recm_modulation.h" in model.state_dict()
        (1, True)
    """

    _step_supports_amp_scaling = False
    #: Whether the optimizer reads the data (RECM does; fixed relaxation policies do not).
    captures_inputs = True
    #: The ``kind`` of modulation this optimizer attaches and adopts.
    modulation_kind = "recm"

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        group: Group | None = None,
        target: Representation | Undeclared | None = _UNDECLARED,
        *,
        example: Any = None,
        total_steps: int | None = None,
        config: RECMConfig | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if group is not None and not isinstance(group, Group):
            raise TypeError(f"group must be a recm_opt Group (e.g. SO3Generators()), got {group!r}")
        if target is not None and not isinstance(target, (Representation, Undeclared)):
            raise TypeError(f"target must be a Representation or None, got {target!r}")
        if config is not None and not isinstance(config, RECMConfig):
            raise TypeError(f"config must be a RECMConfig, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(RECMConfig)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise TypeError(f"RECMOptimizer got unexpected keyword arguments {unknown}; its settings are "
                            f"{sorted(fields)} (see RECMConfig)")
        cfg = dataclasses.replace(config or RECMConfig(), **settings)
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        _validate(**{f: getattr(cfg, f) for f in fields if f not in ("skip_pruned", "skip_nonfinite", "foreach")})
        b, state_dim, hidden, max_units = cfg.b, cfg.state_dim, cfg.hidden, cfg.max_units
        prune_eps, prune_z, alpha_fn, weight_radius = cfg.prune_eps, cfg.prune_z, cfg.alpha_fn, cfg.weight_radius
        beta_fn, skip_pruned, skip_nonfinite, seed, foreach = (cfg.beta_fn, cfg.skip_pruned, cfg.skip_nonfinite,
                                                               cfg.seed, cfg.foreach)
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be True, False or None, got {foreach!r}")
        self.config = cfg
        self.foreach = foreach is not False
        self.inner = optimizer
        self.group = group if group is not None else SO3Generators()
        self.target = target
        self.b, self.prune_eps, self.weight_radius = float(b), float(prune_eps), float(weight_radius)
        self.total_steps: int | None = total_steps
        self._length_known = total_steps is not None
        self._set_defaults()
        self._modstep = ModulationStep()
        self._clock = 0  # RECM's own steps taken: the clock of its step size
        self.prune_z, self.alpha_fn = float(prune_z), alpha_fn
        self.max_units, self.skip_nonfinite = max_units, skip_nonfinite
        self.skipped_steps, self._skip_run = 0, 0
        self._detached = False
        self._model, self._model_unchecked = weakref.ref(model), True
        # Everything is checked and built before the model or the inner optimizer changes.
        self._book = CaptureBook(self.group, target if self.captures_inputs else None, max_units, seed)
        found = find_layers(model, optimizer, self._book.check_group)
        if found and self.captures_inputs and isinstance(target, Vector):
            self._book.check_group(target, target.size, "target")
        mods = self._plan(found, model, example, state_dim=state_dim, hidden=hidden, seed=seed, beta_fn=beta_fn)
        adopted = [f.existing for f in found if f.existing is not None]
        owners = self._owners(found)
        new_group = recm_group(optimizer, mods, {"lr": self.lr, "weight_decay": cfg.weight_decay, "recm": True})
        super().__init__(optimizer.param_groups, optimizer.defaults)
        # Share, don't copy: schedulers and add_param_group must see the inner groups.
        self.param_groups = optimizer.param_groups
        self._shared = True
        self.state = optimizer.state  # read-only view for users; RECM state lives in the model
        # ---- the mutations. The inner optimizer's takes RECM's group first: if it refuses, it is
        # restored and nothing else has changed.
        if new_group is not None:
            before = [list(g["params"]) for g in optimizer.param_groups]
            move_out(optimizer, new_group)
            try:
                optimizer.add_param_group(new_group)
            except BaseException:
                for g, params in zip(optimizer.param_groups, before):
                    g["params"][:] = params
                raise
        for owner in owners:
            warn(f"{owner!r} (id {id(owner):#x}) was driving layers {sorted(owner.layers)} of this model; "
                          "this RECMOptimizer takes over and detaches it")
            owner.detach()
        self._layers = [make_layer(f, mod) for f, mod in zip(found, mods)]
        # the batched training coefficients, read by each modulation through its owner
        self._coefficients = CoefficientBook() if self.foreach else None
        self._reset_coefficients()
        for layer in self._layers:
            clear_dead_hooks(layer.module)
            attach(layer)
            layer.mod.__dict__["_owner"] = weakref.ref(self)
            # one rule in either order of loading and building: the optimizer's settings win
            layer.mod.adopt_settings(prune_eps=self.prune_eps, prune_z=self.prune_z, alpha_fn=alpha_fn,
                                     train_all_live=not skip_pruned, beta_fn=beta_fn,
                                     warn=layer.mod in adopted)
            if self.captures_inputs:
                layer.handles = self._book.hooks(layer)
        if self._layers and not any(getattr(h, "__wrapped__", None) is _checkpoint.check_model
                                    for h in model._load_state_dict_pre_hooks.values()):
            model.register_load_state_dict_pre_hook(_checkpoint.check_model)
        if new_group is None and not self._layers:
            warn("RECMOptimizer found no @relaxed layers in the model; it acts as the inner optimizer")
        self._adopt_inner_state()
        if self._layers:  # a model that carries trained modulations: RECM's clock goes on from their t
            self._clock = max(int(layer.mod.t) for layer in self._layers)
        self._project()  # feasible from t = 0, so a step that moves nothing projects nothing
        self._refresh_live()

    # --------------------------------------------------------------- set-up
    def _plan(self, found: list[_Found], model: nn.Module, example: Any, **kw: Any) -> list[Modulation]:
        """One modulation per layer: the one it carries (checked), or a new one. Changes nothing."""
        widths = input_widths(found, model, example, self._book.target_width()) if self.captures_inputs else {}
        mods = []
        for i, f in enumerate(found):
            mod = f.existing
            if mod is not None:
                self._check_existing(f, mod, kw["state_dim"], kw["hidden"])
            else:
                mod = to_layer_device(self._make_modulation(
                    f.tag.term_names, state_dim=kw["state_dim"], hidden=kw["hidden"], seed=kw["seed"] + 7919 * i,
                    beta_fn=kw["beta_fn"], in_features=widths.get(f.name, 1)), f.module)
            mods.append(mod)
        return mods

    def _check_existing(self, f: _Found, mod: Modulation, state_dim: int, hidden: int) -> None:
        config = mod.config()
        wanted: dict[str, Any] = {"kind": self.modulation_kind, "terms": list(f.tag.term_names)}
        if self.modulation_kind == Modulation.kind:
            wanted.update(state_dim=state_dim, hidden=hidden)
            declared = [rep.feature_width() for rep in f.tag.inputs.values()]
            if self.captures_inputs and all(w is not None for w in declared):
                wanted["in_features"] = sum(w for w in declared if w is not None) + self._book.target_width()
        diff = {k: (config.get(k), v) for k, v in wanted.items() if config.get(k) != v}
        if diff:
            raise ValueError(
                f"layer {f.name!r} already carries RECM state (loaded with the model or left by an earlier "
                f"optimizer) that does not fit this optimizer: " +
                ", ".join(f"{k}={have!r} where this optimizer needs {want!r}" for k, (have, want) in diff.items()) +
                ". Build the optimizer with the same settings, or drop the old state first with "
                f"old_opt.detach(keep_state=False) or delattr(layer, {_MODULATION!r})")

    def _owners(self, found: list[_Found]) -> list[RECMOptimizer]:
        owners: list[RECMOptimizer] = []
        for f in found:
            ref = f.existing.__dict__.get("_owner") if f.existing is not None else None
            owner = ref() if ref is not None else None
            if owner is not None and owner is not self and not owner._detached and owner not in owners:
                owners.append(owner)
        return owners

    def _make_modulation(self, terms: tuple[str, ...], *, state_dim: int, hidden: int, seed: int,
                         beta_fn: Callable[[Tensor], Tensor], in_features: int) -> Modulation:
        """Create one layer's modulation. The extension point of relaxation policies.

        A subclass returns its own :class:`~recm_opt.modulation.Modulation` subclass (with
        its own ``kind``) and sets ``modulation_kind`` to match; everything else (sharing
        the param groups, checkpoints, projections, report, export) is inherited.
        """
        return Modulation(terms, state_dim, hidden, seed, beta_fn, in_features=in_features)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, target: Tensor | None = None) -> Any:  # type: ignore[override]
        """Inner step, projections, then the h update of every tagged layer.

        Args:
            closure: re-evaluates the model and returns the loss (run once, with grad).
            target: the model's target of the forward this step follows (as ``observe``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: before anything changes, when a forward that had a backward has no
                target, or one target stands for forwards of several backward passes.
        """
        self._check_attached()
        if not self._length_known:
            self._resolve_length()
        if closure is not None and _needs_closure(self.inner):
            return self._closure_step(closure, target)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if target is not None:
            self.observe(target)
        self._book.check()
        captured = self._book.take()
        own = self._own_params()  # once per step: the forward hooks and the h update do not need it
        finite, nonzero = self._grad_flags() if self.skip_nonfinite or own else (True, True)
        if self.skip_nonfinite and not finite:
            self._samples(captured, check=True)  # counts the NaN/Inf samples behind the NaN gradient
            self._skip()
            return loss
        self._skip_run = 0
        sync_grads(self._layers)
        with self._without_own_groups():
            self._inner_step()
        if nonzero:  # a step whose every gradient is zero (distributed checkpointing's probe) moves nothing
            self._own_step(own)
        self._project()
        self._update_states(self._samples(captured))  # a NaN/Inf sample is counted and left out
        return loss

    def _closure_step(self, closure: Callable[[], Any], target: Tensor | None) -> Any:
        """The step of an inner optimizer that evaluates the closure itself (LBFGS).

        The first evaluation is the forward at the current parameters: its captures count
        (paired with ``target`` when given); the line search's re-evaluations are not captured.
        """
        calls = 0
        own = self._own_params()
        first: list[Tensor | None] = []

        def evaluate() -> Any:
            nonlocal calls
            calls += 1
            bind = self._book.bind(target) if target is not None else contextlib.nullcontext()
            pause = self._book.paused() if calls > 1 else contextlib.nullcontext()
            with torch.enable_grad(), bind, pause:
                loss = closure()
            if calls == 1:  # RECM steps on the gradient of the evaluation whose inputs it captured
                first.extend(p.grad.clone() if p.grad is not None else None for p in own)
            return loss

        self._book.check()
        self._in_closure = True  # the closure's zero_grad() must not drop its first evaluation
        try:
            with self._without_own_groups():
                loss = self._inner_step(evaluate)
        finally:
            self._in_closure = False
        self._book.check()
        captured = self._book.take()
        for p, g in zip(own, first):
            p.grad = g
        sync_grads(self._layers)
        self._own_step(own)
        self._project()
        self._update_states(self._samples(captured))
        return loss

    def _skip(self) -> None:
        self.skipped_steps += 1
        self._skip_run += 1
        self._book.clear()
        if self._skip_run >= _SKIP_WARN and math.log10(self._skip_run).is_integer():
            warn(f"{self._skip_run} consecutive steps were skipped because a gradient was NaN/Inf; "
                          "nothing is training (check the loss, the learning rate or the AMP loss scale)")

    def _inner_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The inner optimizer's step with its own step hooks, without the process-wide ones.

        The global hooks already ran for this optimizer's step; they fire once per step.
        torch wraps every optimizer class's ``step`` to run both kinds of hooks: this calls
        the unwrapped ``step`` between the inner optimizer's own hooks, so that nothing
        process-wide changes (another thread's optimizer keeps its global hooks).
        """
        inner = self.inner
        args: tuple[Any, ...] = (inner,) if closure is None else (inner, closure)
        kwargs: dict[str, Any] = {}
        wrapped = type(inner).step
        raw = getattr(wrapped, "__wrapped__", None) if getattr(wrapped, "hooked", False) else None
        patched = inner.__dict__.get("step")
        if raw is None or (patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False)):
            return inner.step(*args[1:])  # a step torch did not wrap, or one patched on the instance: as it is
        if patched is not None:
            inner._opt_called = True  # type: ignore[attr-defined]  # what the LR scheduler's wrapper records
        for pre_hook in list(inner._optimizer_step_pre_hooks.values()):
            result = pre_hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
            out = raw(*args, **kwargs)
        inner._optimizer_step_code()
        for post_hook in list(inner._optimizer_step_post_hooks.values()):
            post_hook(inner, args, kwargs)
        return out

    @contextlib.contextmanager
    def _without_own_groups(self) -> Iterator[None]:
        """Take RECM's param group out of the shared ``param_groups`` while the inner optimizer steps.

        The inner optimizer (and any wrapper around it, e.g. Lookahead, which reads the same
        list) then neither sees nor steps the modulation parameters; RECM steps them itself.
        """
        groups = self.param_groups
        own = [(i, g) for i, g in enumerate(groups) if g.get("recm")]
        for i, _ in reversed(own):
            del groups[i]
        self._taken_out = [g for _, g in own]  # zero_grad() still reaches them (a closure calls it)
        try:
            yield
        finally:
            self._taken_out = []
            for i, g in own:
                groups.insert(i, g)

    def _own_set(self) -> set[Tensor]:
        return {p for g in self.param_groups if g.get("recm") for p in g["params"]}

    def _own_params(self) -> list[Tensor]:
        """The parameters RECM steps: its group's, less each modulation's ``cancelling_parameters``."""
        cancel = {id(p) for layer in self._layers for p in layer.mod.cancelling_parameters()}
        return [p for g in self.param_groups if g.get("recm") for p in g["params"] if id(p) not in cancel]

    def _set_defaults(self) -> None:
        """``a`` and RECM's peak step size: explicit settings, else derived from the run length."""
        derived = run_defaults(self.total_steps)
        self.a = float(self.config.a) if self.config.a is not None else derived.a
        self.lr = float(self.config.lr) if self.config.lr is not None else derived.lr
        for g in self.param_groups if getattr(self, "_shared", False) else []:
            if g.get("recm"):
                g["lr"] = self.lr

    def _resolve_length(self) -> None:
        """At the first step: read the run length from an attached scheduler, or say what is assumed."""
        self._length_known = True
        if not self.captures_inputs or not self._own_params():
            return
        found = [(s, n) for s in attached_schedulers(self, self.inner) if (n := run_length(s)) is not None]
        if len({n for _, n in found}) == 1:
            self.total_steps = found[0][1]
            self._length_from = weakref.ref(found[0][0])
            self._set_defaults()
            return
        warn(
            "RECMOptimizer does not know the run length (pass total_steps=, or attach an LR scheduler that knows "
            f"it, such as OneCycleLR or CosineAnnealingLR); it assumes an open-ended run: a = {self.a:g}, RECM's "
            f"step size min({self.lr:g}, 0.5 / sqrt(k + 1)) at its k-th step")

    def _own_step(self, params: list[Tensor]) -> None:
        """RECM's own Adam step on ``params``, the modulation parameters (:mod:`recm_opt.schedule`)."""
        if not params:
            return
        lr = modulation_lr(self._clock, self.lr, self.total_steps)
        for g in self.param_groups:
            if g.get("recm"):
                g["lr"] = lr  # what RECM used, for loggers; a scheduler's value here is not used
        self._modstep.step(params, lr, float(self.config.weight_decay))
        self._clock += 1
        if self._clock == _EPOCH_CHECK and getattr(self, "_length_from", None) is not None:
            sched = self._length_from()
            if sched is not None and sched.last_epoch < _EPOCH_CHECK // 2:
                warn(
                    f"the run length {self.total_steps} came from {type(sched).__name__}, which has stepped "
                    f"{sched.last_epoch} times in {_EPOCH_CHECK} optimizer steps (once per epoch?), so it counts "
                    "epochs; pass RECMOptimizer(total_steps=<optimizer steps of the whole run>)")

    def _adopt_inner_state(self) -> None:
        """Move any inner-optimizer state of the modulation parameters into RECM's own (older checkpoints)."""
        for p in [p for g in self.param_groups if g.get("recm") for p in g["params"]]:
            state = self.state.pop(p, None)
            if state:
                self._modstep.adopt(p, state)

    def _grad_flags(self) -> tuple[bool, bool]:
        """Return (every gradient is finite, some gradient is non-zero) with one host sync.

        Both follow from the sum of the gradients' norms, accumulated in float64: NaN or
        infinite exactly when a gradient has a NaN/Inf entry (norms of finite float32
        gradients cannot overflow it), and zero exactly when every gradient is zero.
        """
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True, False
        norms = _norms(grads)
        if all(n.device == norms[0].device and n.dtype == norms[0].dtype for n in norms):
            s = torch.stack(norms)  # one stack, not an op per gradient
        else:
            s = torch.stack([n.to(norms[0].device, torch.float64) for n in norms])
        total = float(s.to(torch.float64).sum())
        return math.isfinite(total), total > 0

    def _project(self) -> None:
        if not self._layers:
            return
        # Batched over layers, the same maths as project_norm_ per tensor. A parameter that
        # several terms or layers share is projected once, as sequential projections leave it.
        terms = {id(p): p for layer in self._layers for ps in layer.term_params.values() for p in ps}
        _foreach_project_norm_([layer.mod.w_alpha for layer in self._layers], 1.0, rows=True)
        _foreach_project_norm_([layer.mod.w_beta for layer in self._layers], 1.0)
        _foreach_project_norm_(list(terms.values()), self.weight_radius)

    def _samples(self, captured: dict[_Layer, list[Capture]], check: bool = False) -> _update.Split:
        """The step's samples, stacked (:meth:`CaptureBook.batches`), as batched groups and per-layer samples.

        A sample with NaN/Inf is counted and left out: one host sync for all, or none when
        each layer has one capture (the commit then refuses a NaN/Inf ``l``, on the device);
        ``check`` forces the sync.
        """
        flat = [c for layer in self._layers for c in captured.get(layer, [])]  # in layer order
        batches = self._book.batches(flat) if self.foreach else self._book.batches_per_capture(flat)
        counts: dict[_Layer, int] = {}
        for c in flat:
            counts[c.layer] = counts.get(c.layer, 0) + 1
        if not check and self.foreach and not _distributed() and all(n == 1 for n in counts.values()):
            # one capture per layer: a NaN/Inf sample gives a NaN/Inf l, which the commit refuses
            # and counts, on the device; no host sync needed here
            finite = [True] * len(flat)
        else:
            finite = _host_flags([_finite_rows(x) for _, x in batches]) if batches else []
        return _update.split(batches, finite, self.foreach)

    def _update_states(self, samples: _update.Split) -> None:
        """Update each layer's ``h`` and newest term (see :func:`recm_opt._update.update_states`)."""
        groups, items = samples
        stacked = _update.update_states(self._layers, groups, items, a=self.a, b=self.b, max_units=self.max_units,
                                        rng=self._book.rng, foreach=self.foreach,
                                        any_grad=lambda: self._grad_flags()[1])
        self._reset_coefficients(stacked)

    def _reset_coefficients(self, stacked: list[Tensor] | None = None) -> None:
        if self._coefficients is not None:
            self._coefficients.reset([layer.mod for layer in self._layers], stacked or [])

    def _refresh_live(self) -> None:
        if self._layers:
            _update.apply_live(self._layers, _host_flags(_update.live_flags(self._layers, self.foreach)))

    # -------------------------------------------------------------- pairing
    @torch.no_grad()
    def observe(self, target: Tensor) -> None:
        """Pair the forwards captured since the last ``observe`` with the model's ``target``.

        Call it once per forward pass, after the forward and before ``step()``: before or
        after the backward (Lightning's ``training_step``, a Hugging Face Trainer's
        ``compute_loss`` after ``model(...)``). Called before its forward, it finds nothing
        to pair, and the step then raises and says so. ``step(target=y)`` calls it for you.

        Raises:
            ValueError: if ``target`` does not match a layer's units or its representation.
        """
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
        self._book.observe(target)

    @contextlib.contextmanager
    def pair(self, target: Tensor) -> Iterator[None]:
        """Pair the forwards run inside the block with ``target``.

        Example:
            >>> # with opt.pair(y):
            >>> #     loss = loss_fn(model(x), y)
            >>> # loss.backward()
        """
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
        with self._book.bind(target):
            yield

    # ---------------------------------------------------- optimizer plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the inner optimizer (which shares this optimizer's param groups).

        Captures whose backward has already run are dropped with their gradients, so
        the inputs of a step that never happened (GradScaler found an inf) do not
        leak into the next one. Captures still waiting for their backward are kept
        (Lightning calls ``zero_grad`` between ``training_step`` and ``backward``).
        """
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in [p for g in getattr(self, "_taken_out", []) for p in g["params"] if p.grad is not None]:
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()
        if not getattr(self, "_in_closure", False):
            self._book.drop_backed()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (visible here: the groups are shared)."""
        if not getattr(self, "_shared", False):  # Optimizer.__init__ registering the shared groups
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def train(self) -> None:
        """Forwarded to the inner optimizer's ``train()`` if it has one (schedule-free optimizers)."""
        fn = getattr(self.inner, "train", None)
        if callable(fn):
            fn()

    def eval(self) -> None:
        """Forwarded to the inner optimizer's ``eval()`` if it has one (schedule-free optimizers)."""
        fn = getattr(self.inner, "eval", None)
        if callable(fn):
            fn()

    def state_dict(self) -> dict[str, Any]:
        """Return the inner state dict with each layer's RECM entry (``recm_*`` keys) under its ``w_beta``.

        The dict keeps the standard ``{state, param_groups}`` shape that distributed
        checkpointing expects and holds only tensors and plain values. ``h``, ``t`` and
        ``gamma_t`` are in the model's ``state_dict``; this one adds what a resumed run
        needs (the newest sample, counters, the generator), each entry naming its layer.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = _checkpoint.save(self.inner, self.param_groups, self._layers, self.skipped_steps, self._book.rng,
                              self._without_own_groups)
        # RECM's own moments sit in each modulation parameter's state entry (every one has an entry,
        # of fixed shape, so that distributed checkpointing finds state for every trained parameter)
        for i, p in enumerate(p for g in self.param_groups for p in g["params"]):
            if p in self._own_set():
                sd["state"][i] = {**sd["state"].get(i, {}), **self._modstep.entry(p)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = result if result is not None else sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, an older recm_opt one, or a plain inner one.

        The whole checkpoint is checked first; a failed check changes nothing. The param
        groups and the state stay the same objects (updated in place), so schedulers
        and wrappers that hold them keep seeing the inner optimizer's.

        Raises:
            ValueError: naming the layer and the key of the first bad entry.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = result if result is not None else state_dict
        inner_sd, groups, entries = _checkpoint.split(state_dict)
        if self._layers and not any(g.get("recm") for g in groups):
            groups = _checkpoint.fresh_recm_group(groups, self.param_groups)
            if inner_sd.get("param_groups") is not groups and "state" in inner_sd:
                inner_sd["param_groups"] = groups
        saved = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        current = [id(p) for p in params]
        matched = _checkpoint.match(self._layers, entries, saved, current)
        _checkpoint.check(matched)
        names = {id(p): n for layer in self._layers for n, p in layer.mod.named_parameters(prefix=layer.name)}
        own = {pos: p for pos, p in enumerate(p for g in self.param_groups for p in g["params"])
               if p in self._own_set()}
        moments = {p: entries.get(saved[pos], {}) for pos, p in own.items() if pos < len(saved)}
        for p, entry in moments.items():
            ModulationStep.check_entry(names.get(id(p), "a RECM parameter"), p, entry)
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(c["params"]) for g, c in zip(groups, self.param_groups)):
            raise ValueError("the checkpoint's param groups "
                             f"{[len(g['params']) for g in groups]} do not match this optimizer's "
                             f"{[len(g['params']) for g in self.param_groups]}")
        if "state" in inner_sd:
            _checkpoint.check_inner(inner_sd["state"], saved, params, names)
        _checkpoint.load_inner(self.inner, self.param_groups, self.state, inner_sd, self._without_own_groups)
        self._book.clear()
        for layer in self._layers:
            entry = matched.get(layer)
            if entry is None:
                layer.mod.newest, layer.skipped, layer.dropped = None, 0, 0
                continue
            steps = _checkpoint.restore(layer, entry, self._book.rng)
            self.skipped_steps = steps if steps is not None else self.skipped_steps
        for p, entry in moments.items():
            if not self._modstep.load_entry(p, entry):
                self._modstep.state.pop(p, None)
                self._modstep.steps.pop(p, None)
        self._adopt_inner_state()  # a checkpoint from before RECM's own update: the inner Adam's moments
        if self._layers:
            self._clock = max(int(layer.mod.t) for layer in self._layers)
        self._refresh_live()
        self._reset_coefficients()
        self._model_unchecked = True
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --------------------------------------------------------- attach/detach
    def detach(self, keep_state: bool = True) -> None:
        """Stop modulating: remove every hook this optimizer put on the model.

        Args:
            keep_state: keep each layer's modulation (and its state) on the model, as a
                trained model keeps its BatchNorm statistics, frozen: alpha and beta are
                constants, the modulation's parameters stop requiring grad (no optimizer
                moves them), and pruned terms are skipped in training forwards too, so
                the model computes what :func:`recm_opt.export` bakes, in training and in
                evaluation, however it is trained afterwards. A new ``RECMOptimizer`` for the
                model takes the modulations over again and unfreezes them. With ``False`` the
                layers become their equivariant parts again, and the modulation's param
                group leaves the inner optimizer.
        """
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles = []
            owner = layer.mod.__dict__.get("_owner")
            if owner is not None and owner() is self:
                del layer.mod.__dict__["_owner"]
            if not keep_state and layer.module._modules.get(_MODULATION) is layer.mod:
                del layer.module._modules[_MODULATION]
            elif keep_state and owner is not None and owner() is self:
                _freeze(layer.mod)
        if not keep_state:
            ids = {id(p) for layer in self._layers for p in layer.mod.parameters()}
            for p in [p for g in self.param_groups if g.get("recm") for p in g["params"]]:
                self.state.pop(p, None)
            self.param_groups[:] = [g for g in self.param_groups if not (g.get("recm") and
                                                                         {id(p) for p in g["params"]} <= ids)]
        self._book.clear()
        self._detached = True

    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError(f"{self!r} was detached (by detach() or by a newer RECMOptimizer for the same "
                               "model); step the optimizer that drives the model now")
        if self._model_unchecked:  # the first step after building or loading
            self._model_unchecked = False
            self._warn_new_layers()

    def _warn_new_layers(self) -> None:
        """Warn about ``@relaxed`` layers of the model that this optimizer does not modulate (added later)."""
        model = self._model() if self._model is not None else None
        if model is None:
            return
        known = {id(layer.module) for layer in self._layers}
        new = sorted({layer_name(n) or type(m).__name__ for n, m in model.named_modules()
                      if get_relaxation(m) is not None and id(m) not in known})
        if new:
            warn(f"layers {new} are @relaxed but were added to the model after this RECMOptimizer was "
                          "built: they are not modulated (they compute their equivariant part). Build the optimizer "
                          "once the model is complete")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled: it holds hooks on its model's layers. "
                        "To copy a run, save model.state_dict() and opt.state_dict(), then build a new model and "
                        "RECMOptimizer and load both (opt.load_state_dict)")

    # --------------------------------------------------------------- report
    @property
    def layers(self) -> dict[str, nn.Module]:
        """The tagged layers this optimizer modulates, by stable name."""
        return {layer.name: layer.module for layer in self._layers}

    def report(self, gaps: bool = False) -> list[dict[str, Any]]:
        """Return one row per tagged layer: alpha per term, beta, ``|h|``, t, kept/pruned, counters.

        Args:
            gaps: also measure each layer's symmetry gap (W1 of its newest sample to the
                sample's C_G-average) and the alpha bound it implies. This solves an
                assignment problem per layer, so it is off by default.

        The same rows that :func:`recm_opt.export.format_report` prints, ready for any logger.
        """
        from .export import layer_row

        return [layer_row(layer.name, layer.module, skipped=layer.skipped, dropped=layer.dropped, gaps=gaps,
                          capped=layer.capped)
                for layer in self._layers]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.inner).__name__}, layers={len(self._layers)}, group={self.group!r}, "
                f"total_steps={self.total_steps}, a={self.a:.3g}, lr={self.lr:.3g})")


@torch.no_grad()
def _freeze(mod: Modulation) -> None:
    """A detached modulation: constant alpha and beta, its parameters out of every optimizer's reach."""
    mod.newest = None  # no gradient path into r_theta
    for p in mod.parameters():
        p.requires_grad_(False)
        p.grad = None
    mod.train_all_live = False  # the pruned terms stay off in training forwards, as in export
    mod.refresh_live()


def _norms(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient's norm; a sharded gradient's (FSDP2's DTensor) over all its shards, so every rank agrees."""
    sharded = [_is_dtensor(g) for g in grads]
    local = [g for g, d in zip(grads, sharded) if not d]
    norms = list(torch._foreach_norm(local)) if local else []
    if any(sharded):
        norms += [n.full_tensor() for n in torch._foreach_norm([g for g, d in zip(grads, sharded) if d])]
    return norms


def _needs_closure(inner: Optimizer) -> bool:
    """Whether the inner optimizer's ``step`` requires a closure (LBFGS evaluates it itself)."""
    param = inspect.signature(type(inner).step).parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


def _validate(**kw: Any) -> None:
    """The settings: a wrong type is a TypeError, a value out of range a ValueError, each naming the setting."""
    if kw["a"] is not None:
        check_number("a", kw["a"], 0, True)
    check_number("b", kw["b"], 0, True)
    check_settings(kw["prune_eps"], kw["prune_z"], kw["alpha_fn"])  # as a loaded configuration is checked
    check_number("weight_radius", kw["weight_radius"], 0, True)
    check_number("weight_decay", kw["weight_decay"], 0, False)
    if kw["lr"] is not None:
        check_number("lr", kw["lr"], 0, False)
    for key in ("state_dim", "hidden", "max_units"):
        check_int(key, kw[key], 1)
    check_int("seed", kw["seed"], 0)
    if not callable(kw["beta_fn"]):
        raise TypeError(f"beta_fn must be callable, got {kw['beta_fn']!r}")
    k0 = kw["beta_fn"](torch.zeros(()))
    if not isinstance(k0, Tensor) or not torch.allclose(k0, torch.ones(())):
        raise ValueError(f"beta_fn must satisfy k(0) = 1, got k(0) = {k0}")
