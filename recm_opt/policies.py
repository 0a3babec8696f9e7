"""Alternative relaxation policies over the same ``@relaxed`` layers, for A/B tests against RECM.

Each policy is a :class:`~recm_opt.optimizer.RECMOptimizer` subclass: it shares the
wrapper's plumbing (shared ``param_groups``, ``state_dict``, report, export) and
replaces how a layer's ``alpha`` and ``beta`` are produced, with the loss terms and
initialisation of its own paper. Swapping policies is a one-line change::

    opt = recm.RECMOptimizer(inner, model, a=1e-3)                     # learned from the data
    opt = recm.EquivarianceSchedule(inner, model, total_steps=5000)    # schedule + Lie-derivative penalty
    opt = recm.ResidualPathwayPrior(inner, model, residual_prior=1e2)  # always on, asymmetric L2 priors

- ``EquivarianceSchedule`` ("es", Pertigkiozoglou et al., 2024, "Improving equivariant
  model training via constraint relaxation"): the unconstrained branch starts at zero,
  its coefficient follows a triangle from 0 up to ``peak`` at mid-training and back to
  0 at ``total_steps``, and the loss gets the penalty
  ``reg_weight * (||L f_un|| + ||f_un||)`` (:meth:`EquivarianceSchedule.regularizer`):
  the norm of the branch's Lie derivatives plus the norm of its output, over the
  batch. The deployed model is the equivariant one: every term is pruned in eval mode
  and in :func:`recm_opt.export`.
- ``ResidualPathwayPrior`` ("rpp", Finzi et al., 2021, "Residual pathway priors for soft
  equivariance constraints"): ``W = P(w_equiv) + w_basic`` with no scale parameter
  (``alpha = beta = 1``), and a Gaussian prior ``residual_prior * ||w_basic||^2 +
  equivariant_prior * ||w_equiv||^2`` (strong on the residual path, weak on the
  equivariant one). The prior's gradient is added before the inner step (as a loss
  term would be), or, with ``decoupled=True``, applied as its own proximal step after
  it. Nothing is pruned.

Neither policy reads the data's symmetry, so neither captures layer inputs for
``l_theta``; ``step(target=y)`` accepts (and ignores) a target, so training loops need
no change beyond ES's penalty.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.optim import Optimizer

from ._layers import _Layer
from .modulation import Modulation, one_plus_tanh
from .optimizer import RECMOptimizer
from .reps import Representation

__all__ = ["EquivarianceSchedule", "ResidualPathwayPrior", "so3_lie_algebra", "triangle_schedule"]


def triangle_schedule(t: int | Tensor, total_steps: int, peak: float) -> float:
    """Return the triangle ``peak * (1 - |2 t / T - 1|)`` on ``0 <= t <= T``, and 0 outside.

    ``t`` counts committed steps: the forward of step ``s`` (from 1) sees ``t = s - 1``.

    Example:
        >>> [triangle_schedule(t, 4, 1.0) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    s = float(t)
    if s <= 0 or s >= total_steps:
        return 0.0
    return peak * (1.0 - abs(2.0 * s / total_steps - 1.0))


def so3_lie_algebra(dtype: torch.dtype = torch.float64) -> Tensor:
    """The basis ``(L_x, L_y, L_z)`` of so(3): ``L_a v = e_a x v``, a ``(3, 3, 3)`` tensor.

    Example:
        >>> L = so3_lie_algebra()
        >>> torch.equal(L[0] @ L[1] - L[1] @ L[0], L[2])   # [L_x, L_y] = L_z
        True
    """
    eye = torch.eye(3, dtype=dtype)
    return torch.stack([torch.linalg.cross(eye[a].expand(3, 3), eye, dim=1).T for a in range(3)])


def _act_linear(rep: Representation, A: Tensor, x: Tensor) -> Tensor:
    """Apply the matrix ``A`` on ``rep``'s vector axis of ``x``, in ``x``'s own layout (linear in ``A``)."""
    if rep.axis is None or rep.kind != "vector":
        raise ValueError(f"the Lie derivative needs a Vector representation, got {rep!r}")
    v, _ = rep.unit_view(x)
    d = rep._axis_dim()
    moved = torch.einsum("ij,...j->...i", A.to(dtype=x.dtype, device=x.device), v.movedim(d, -1)).movedim(-1, d)
    return rearrange(moved, f"{rep._target} -> {rep.pattern}", **rep.sizes)


class _PolicyModulation(Modulation):
    """A modulation without ``r_theta``/``w_alpha``: ``h`` stays 0, ``t`` counts steps.

    ``w_beta`` is kept (unused, never receives a gradient) because the optimizer's
    ``state_dict`` stores each layer's state under that parameter's entry.
    """

    h: Tensor
    t: Tensor
    gamma_t: Tensor

    def __init__(self, terms: Sequence[str], state_dim: int) -> None:
        # Skip Modulation.__init__: its r_theta and w_alpha have no role here.
        nn.Module.__init__(self)
        self.terms = tuple(terms)
        self._init_state(state_dim, one_plus_tanh)  # beta = k(0) = 1: h stays 0

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"kind": self.kind, "terms": list(self.terms), "state_dim": self.h.numel(), **self._eval_config()}

    def l_theta(self, sample: Tensor) -> Tensor:  # noqa: D102
        raise RuntimeError(f"{type(self).__name__} has no update function l_theta")

    def lipschitz_bound(self) -> float:  # noqa: D102
        raise RuntimeError(f"{type(self).__name__} has no r_theta")

    @torch.no_grad()
    def advance(self) -> None:
        """Count one optimizer step (``h`` is not used by the policy)."""
        self.t += 1

    @property
    def train_all_live(self) -> bool:  # type: ignore[override]
        """Always True: every term is live in every training forward (``skip_pruned`` is moot)."""
        return True

    @train_all_live.setter
    def train_all_live(self, value: bool) -> None:
        pass


class _ScheduleModulation(_PolicyModulation):
    """``alpha_i = triangle(t)`` for every term while training; ``alpha = 0`` when deployed."""

    kind = "es"

    def __init__(self, terms: Sequence[str], state_dim: int, total_steps: int, peak: float) -> None:
        super().__init__(terms, state_dim)
        self.total_steps, self.peak = total_steps, peak

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {**super().config(), "total_steps": self.total_steps, "peak": self.peak}

    @classmethod
    def from_config(cls, terms: Sequence[str], config: dict[str, Any]) -> Modulation:  # noqa: D102
        return cls(terms, int(config["state_dim"]), int(config["total_steps"]), float(config["peak"]))

    def scheduled_alpha(self) -> float:
        """The training-time alpha of every term at the current step."""
        return triangle_schedule(self.t, self.total_steps, self.peak)

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Training forwards (``with_grad``) get the schedule; eval, export and reports get alpha = 0."""
        value = self.scheduled_alpha() if with_grad else 0.0
        alpha = torch.full((len(self.terms),), value, dtype=self.w_beta.dtype, device=self.w_beta.device)
        return alpha, torch.ones((), dtype=self.w_beta.dtype, device=self.w_beta.device)

    def extra_repr(self) -> str:
        return f"terms={self.terms}, total_steps={self.total_steps}, peak={self.peak}"


class _ConstantModulation(_PolicyModulation):
    """``alpha_i = 1`` and ``beta = 1`` always: the residual path is a plain sum."""

    kind = "rpp"

    @classmethod
    def from_config(cls, terms: Sequence[str], config: dict[str, Any]) -> Modulation:  # noqa: D102
        return cls(terms, int(config["state_dim"]))

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:  # noqa: D102
        one = torch.ones((), dtype=self.w_beta.dtype, device=self.w_beta.device)
        return one.expand(len(self.terms)), one


class _Policy(RECMOptimizer):
    """Shared behaviour of the policies: no input capture, no ``h`` recurrence, no projection."""

    captures_inputs = False  # the policy never looks at the data's symmetry: nothing to record

    def _project(self) -> None:
        # Neither paper bounds the branch by projection: its size is governed by the penalty or the prior.
        return

    def _update_states(self, items: list[tuple[_Layer, Any]]) -> None:
        # The h-update of RECM becomes a step counter (the schedule's clock).
        for layer in self._layers:
            layer.mod.advance()  # type: ignore[operator]
        self._refresh_live()

    def _equivariant_params(self, layer: _Layer) -> list[nn.Parameter]:
        """The layer's own parameters outside every term and outside its modulation."""
        skip = {id(p) for ps in layer.term_params.values() for p in ps} | {id(p) for p in layer.mod.parameters()}
        return [p for p in layer.module.parameters() if id(p) not in skip]


class EquivarianceSchedule(_Policy):
    """Relax on a triangle schedule with a Lie-derivative penalty, and deploy the equivariant model.

    Pertigkiozoglou et al. (2024). Every tagged layer computes
    ``f_eq(z) + theta_t * f_un(z)`` with ``f_un = sum_i f_un_i`` and
    ``theta_t = peak * (1 - |2 t / total_steps - 1|)`` for ``0 <= t <= total_steps``,
    0 afterwards; ``beta = 1``. At construction every term parameter is set to zero
    (``zero_init``), so training starts from the equivariant model. The training loss
    gets :meth:`regularizer`,

        reg_weight * ( sqrt(sum_layers sum_k ||L_k f_un(z)||^2) + sqrt(sum_layers ||f_un(z)||^2) ),

    summed over the batch's units, with ``z`` the layer's (detached) input and
    ``L_k f(z) = d/ds [rho(e^{-s A_k}) f(rho(e^{s A_k}) z)]_{s=0}`` the Lie derivative
    along each basis element ``A_k`` of the Lie algebra. For terms affine in ``z``
    (dense maps and biases) it is exactly ``f(z + A z) - f(z) - A f(z)``, which is what
    is computed; terms that are not affine (noise) should not be in an ES layer. The
    output is taken to carry the representation of the layer's first declared input
    (as in Vector-Neuron layers). In eval mode and in :func:`recm_opt.export` every
    term is pruned (the report's ``alpha`` is this deployed value;
    ``scheduled_alpha(layer)`` is the training one).

    Args:
        optimizer: the inner optimizer over the model's parameters.
        model: the model holding the ``@relaxed`` layers.
        group: accepted for a one-line swap with ``RECMOptimizer``; unused.
        target: accepted for a one-line swap; unused (``step(target=y)`` still works).
        total_steps: length of the triangle, usually the number of training steps.
        peak: the coefficient at ``total_steps / 2``.
        reg_weight: weight of the penalty (0.01 in the paper; 0 gives the schedule alone).
        lie_algebra: ``(k, d, d)`` basis of the Lie algebra acting on the vector axis;
            default so(3)'s (:func:`so3_lie_algebra`).
        zero_init: set every term parameter to zero at construction.
        **kwargs: ``RECMOptimizer`` options; ``prune_eps``, ``lr``, ``weight_decay`` and
            ``seed`` apply, RECM's own (``a``, ``b``, ``hidden``, ``max_units``, ``beta_fn``,
            ``weight_radius``) are ignored.

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
        >>> opt = EquivarianceSchedule(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=4)
        >>> for _ in range(2):
        ...     loss = model(torch.randn(8, 3)).pow(2).sum()
        ...     (loss + opt.regularizer()).backward(); _ = opt.step(); opt.zero_grad()
        >>> opt.scheduled_alpha("Layer"), opt.report()[0]["pruned"]
        (1.0, ['weight'])
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        group: Any = None,
        target: Any = None,
        *,
        total_steps: int,
        peak: float = 1.0,
        reg_weight: float = 0.01,
        lie_algebra: Tensor | None = None,
        zero_init: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not peak > 0:
            raise ValueError(f"peak must be > 0, got {peak}")
        if not reg_weight >= 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        algebra = so3_lie_algebra() if lie_algebra is None else torch.as_tensor(lie_algebra)
        if algebra.dim() != 3 or algebra.shape[1] != algebra.shape[2]:
            raise ValueError(f"lie_algebra must have shape (k, d, d), got {tuple(algebra.shape)}")
        self.total_steps, self.peak, self.reg_weight = total_steps, float(peak), float(reg_weight)
        self.lie_algebra = algebra
        super().__init__(optimizer, model, group, target, total_steps=total_steps, **kwargs)
        if zero_init:
            with torch.no_grad():
                for layer in self._layers:
                    for ps in layer.term_params.values():
                        for p in ps:
                            p.zero_()
        self._sums: list[Tensor] = []  # per training forward: [sum ||L f_un||^2, sum ||f_un||^2]
        ref = weakref.ref(self)
        self._penalty_hooks = [
            layer.module.register_forward_pre_hook(
                lambda m, args, kwargs, layer=layer: ref()._record(layer, args, kwargs) if ref() else None,  # type: ignore[union-attr]
                with_kwargs=True,
            )
            for layer in self._layers
        ]

    modulation_kind = "es"

    def _make_modulation(self, terms: tuple[str, ...], *, state_dim: int, **_: Any) -> Modulation:
        return _ScheduleModulation(terms, state_dim, int(self.total_steps or 0), self.peak)

    def _inputs(self, layer: _Layer, args: tuple, kwargs: dict) -> tuple[list[Any], list[Representation | None]]:
        params = sorted(layer.positions.items(), key=lambda kv: kv[1])
        n = max(len(args), (params[-1][1] + 1) if params else 0)
        values: list[Any] = list(args) + [None] * (n - len(args))
        reps: list[Representation | None] = [None] * n
        for name, pos in params:
            if pos >= len(args):
                values[pos] = kwargs.get(name)
            reps[pos] = layer.tag.inputs[name]
        return values, reps

    def _branch(self, layer: _Layer, values: list[Any], kwargs: dict) -> Tensor:
        module = layer.module
        extra = {k: v for k, v in kwargs.items() if k not in layer.positions}
        out = None
        for name in layer.mod.terms:
            f = module.unconstrained(name, *values, **extra)  # type: ignore[operator]
            out = f if out is None else out + f
        assert out is not None
        return out

    def _record(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        """Penalty terms of one training forward (inputs detached, as in the paper's code)."""
        module = layer.module
        if self.reg_weight == 0 or not module.training or not torch.is_grad_enabled():
            return
        values, reps = self._inputs(layer, args, kwargs)
        values = [v.detach() if isinstance(v, Tensor) else v for v in values]
        declared = [r for r in reps if r is not None]
        out_rep = declared[0]
        fz = self._branch(layer, values, kwargs)
        ld = fz.new_zeros(())
        for A in self.lie_algebra:
            moved = [v + _act_linear(r, A, v) if r is not None and isinstance(v, Tensor) else v
                     for v, r in zip(values, reps)]
            lie = self._branch(layer, moved, kwargs) - fz - _act_linear(out_rep, A, fz)
            ld = ld + lie.pow(2).sum()
        self._sums.append(torch.stack([ld, fz.pow(2).sum()]))

    def regularizer(self) -> Tensor:
        """Return the penalty of the training forwards since the last call, and forget them.

        Add it to the loss before ``backward()``; 0 when nothing was recorded (eval
        forwards, ``reg_weight = 0``). Gradients reach only the term parameters.
        """
        if not self._sums:
            return torch.zeros(())
        total = torch.stack(self._sums).sum(0)
        self._sums = []
        # sqrt has an infinite slope at 0 (the zero-initialised branch): clamp, whose gradient there is 0.
        return self.reg_weight * total.clamp_min(torch.finfo(total.dtype).tiny).sqrt().sum()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the inner optimizer; also drops penalty terms never added to a loss."""
        super().zero_grad(set_to_none=set_to_none)
        if getattr(self, "_sums", None):
            self._sums = []

    def scheduled_alpha(self, name: str) -> float:
        """The training-time alpha of layer ``name`` (every term shares it) at the current step."""
        mod = self.layers[name].recm_modulation
        assert isinstance(mod, _ScheduleModulation)
        return mod.scheduled_alpha()

    def __repr__(self) -> str:
        return (f"EquivarianceSchedule({type(self.inner).__name__}, layers={len(self._layers)}, "
                f"total_steps={self.total_steps}, peak={self.peak}, reg_weight={self.reg_weight})")


class ResidualPathwayPrior(_Policy):
    """Residual pathway prior: ``f_eq + sum_i f_un_i`` with a strong prior on the residual path.

    Finzi et al. (2021). Each tagged layer computes ``f_eq(z) + sum_i f_un_i(z)``, i.e.
    ``W = P(w_equiv) + w_basic`` for a linear layer: ``alpha_i = beta = 1``, with no
    scale parameter. The negative log prior

        R = residual_prior * sum ||theta_un||^2 + equivariant_prior * sum ||theta_eq||^2

    is over every term parameter (the residual path) and every other parameter of the
    tagged layers (the equivariant path, e.g. a Vector-Neuron weight), not over untagged
    layers. By default its gradient ``2 * prior * p`` is added to each such gradient
    right before the inner step, exactly as a loss term would be (the authors' code adds
    R to the loss and trains with Adam). With ``decoupled=True`` the inner step sees the
    loss gradient alone and the prior is applied afterwards as its proximal step,
    ``p <- p / (1 + 2 lr prior)``, stable for any strength. Terms are never pruned.

    Initialisation is the layer's: the paper starts ``w_basic`` at ``1e-3 * w_equiv``'s
    initial value.

    Args:
        optimizer: the inner optimizer over the model's parameters.
        model: the model holding the ``@relaxed`` layers.
        group: accepted for a one-line swap with ``RECMOptimizer``; unused.
        target: accepted for a one-line swap; unused (``step(target=y)`` still works).
        residual_prior: strength on the residual path (1e2 in the paper's experiments; swept there).
        equivariant_prior: strength on the equivariant path (1e-3 in the paper).
        decoupled: apply the prior as a proximal step after the inner step.
        **kwargs: ``RECMOptimizer`` options, as for :class:`EquivarianceSchedule`.

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
        >>> opt = ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> opt.report()[0]["kept"]
        ['weight']
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        group: Any = None,
        target: Any = None,
        *,
        residual_prior: float = 1e2,
        equivariant_prior: float = 1e-3,
        decoupled: bool = False,
        **kwargs: Any,
    ) -> None:
        for key, value in (("residual_prior", residual_prior), ("equivariant_prior", equivariant_prior)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        self.residual_prior, self.equivariant_prior = float(residual_prior), float(equivariant_prior)
        self.decoupled = bool(decoupled)
        super().__init__(optimizer, model, group, target, **kwargs)
        self._refresh_live()
        # The inner optimizer's hooks run exactly around its update, after our checks.
        ref = weakref.ref(self)
        hook = optimizer.register_step_post_hook if self.decoupled else optimizer.register_step_pre_hook
        self._prior_hook = hook(lambda *_: ref()._apply_prior() if ref() is not None else None)  # type: ignore[union-attr]

    modulation_kind = "rpp"

    def _make_modulation(self, terms: tuple[str, ...], *, state_dim: int, **_: Any) -> Modulation:
        return _ConstantModulation(terms, state_dim)

    def prior_parameters(self) -> list[tuple[nn.Parameter, float]]:
        """Every parameter under the prior, with its strength (each parameter once)."""
        out: dict[int, tuple[nn.Parameter, float]] = {}
        for layer in self._layers:
            for p in self._equivariant_params(layer):
                out.setdefault(id(p), (p, self.equivariant_prior))
            for ps in layer.term_params.values():
                for p in ps:
                    out[id(p)] = (p, self.residual_prior)
        return list(out.values())

    def prior(self) -> Tensor:
        """The value of the negative log prior ``R`` at the current parameters."""
        terms = [s * p.detach().double().pow(2).sum() for p, s in self.prior_parameters()]
        return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def _apply_prior(self) -> None:
        lrs = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        for p, strength in self.prior_parameters():
            if strength == 0:
                continue
            if self.decoupled:
                p.div_(1.0 + 2.0 * lrs.get(id(p), 0.0) * strength)
            elif p.grad is None:
                p.grad = 2.0 * strength * p.detach().clone()
            else:
                p.grad.add_(p, alpha=2.0 * strength)

    def __repr__(self) -> str:
        return (f"ResidualPathwayPrior({type(self.inner).__name__}, layers={len(self._layers)}, "
                f"residual_prior={self.residual_prior}, equivariant_prior={self.equivariant_prior}, "
                f"decoupled={self.decoupled})")
