"""Alternative relaxation policies over the same ``@relaxed`` layers, for A/B tests against RECM.

Each policy is a :class:`~recm_opt.optimizer.RECMOptimizer` subclass: it shares the
wrapper's plumbing (shared ``param_groups``, ``state_dict``, report, export, weight
projection) and replaces only how a layer's ``alpha`` and ``beta`` are produced.
Swapping policies is a one-line change::

    opt = recm.RECMOptimizer(inner, model, a=1e-3)                    # learned from the data
    opt = recm.EquivarianceSchedule(inner, model, total_steps=5000)   # fixed triangle schedule
    opt = recm.ResidualPathwayPrior(inner, model, prior=1e-3)         # always on, L2 prior

- ``EquivarianceSchedule`` ("es", after the constraint-relaxation schedules of
  Pertigkiozoglou et al., 2024): every term's ``alpha`` follows a triangle from 0 up
  to ``peak`` at mid-training and back to 0 at ``total_steps``, ``beta = 1``. The
  deployed model is the equivariant one: in eval mode and in :func:`recm_opt.export`
  every term is pruned.
- ``ResidualPathwayPrior`` ("rpp", after Finzi et al., 2021): the unconstrained
  branch is always on, each term with a trainable scale ``alpha_i`` (initially
  ``init_scale``), ``beta = 1``, and an L2 prior on the branch. A term is pruned only
  when its ``|alpha_i|`` falls below ``prune_eps``.

Neither policy reads the data's symmetry, so neither captures layer inputs: the
forward hooks return at once and ``step(target=y)`` accepts (and ignores) a target,
so training loops need no change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._layers import _Layer
from .modulation import Modulation, one_plus_tanh, project_norm_
from .optimizer import RECMOptimizer

__all__ = ["EquivarianceSchedule", "ResidualPathwayPrior", "triangle_schedule"]


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


class _PolicyModulation(Modulation):
    """A modulation without ``r_theta``/``w_alpha``: ``h`` stays 0, ``t`` counts steps.

    ``w_beta`` is kept (unused, never receives a gradient) because the optimizer's
    ``state_dict`` stores each layer's state under that parameter's entry.
    """

    h: Tensor
    t: Tensor
    gamma_t: Tensor

    def __init__(self, terms: Sequence[str], state_dim: int) -> None:
        # Skip Modulation.__init__: its r_theta (a lazy layer) and w_alpha have no role here.
        nn.Module.__init__(self)
        self.terms = tuple(terms)
        self._init_state(state_dim, one_plus_tanh)  # beta = k(0) = 1: h stays 0

    def l_theta(self, sample: Tensor) -> Tensor:  # noqa: D102
        raise RuntimeError(f"{type(self).__name__} has no update function l_theta")

    def lipschitz_bound(self) -> float:  # noqa: D102
        raise RuntimeError(f"{type(self).__name__} has no r_theta")

    @torch.no_grad()
    def advance(self) -> None:
        """Count one optimizer step (``h`` is not used by the policy)."""
        self.t += 1


class _ScheduleModulation(_PolicyModulation):
    """``alpha_i = triangle(t)`` for every term while training; ``alpha = 0`` when deployed."""

    def __init__(self, terms: Sequence[str], state_dim: int, total_steps: int, peak: float) -> None:
        super().__init__(terms, state_dim)
        self.total_steps, self.peak = total_steps, peak

    @property
    def train_all_live(self) -> bool:  # type: ignore[override]
        """Always True: the scheduled branch is live in every training forward (``skip_pruned`` is moot)."""
        return True

    @train_all_live.setter
    def train_all_live(self, value: bool) -> None:
        pass

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


class _ScaleModulation(_PolicyModulation):
    """``alpha_i`` is a trainable scalar per term, ``beta = 1``."""

    def __init__(self, terms: Sequence[str], state_dim: int, init_scale: float) -> None:
        super().__init__(terms, state_dim)
        self.alpha = nn.Parameter(torch.full((len(self.terms),), float(init_scale)))

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Return ``(alpha, 1)``; ``alpha`` carries its gradient only when ``with_grad``."""
        alpha = self.alpha if with_grad else self.alpha.detach()
        return alpha, torch.ones((), dtype=alpha.dtype, device=alpha.device)


class _Policy(RECMOptimizer):
    """Shared behaviour of the policies: no input capture, no ``h`` recurrence, term-only projection."""

    def _capture(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        # The policy never looks at the data's symmetry: nothing to record.
        return

    @torch.no_grad()
    def _project(self) -> None:
        for layer in self._layers:
            project_norm_([p for ps in layer.term_params.values() for p in ps], self.weight_radius)

    def _update_states(self) -> None:
        # The h-update of RECM becomes a step counter (the schedule's clock).
        for layer in self._layers:
            layer.mod.advance()  # type: ignore[operator]
        self._refresh_live()


class EquivarianceSchedule(_Policy):
    """Relax every tagged layer on a fixed triangle schedule and deploy the equivariant model.

    ``alpha_i(t) = peak * (1 - |2 t / total_steps - 1|)`` for ``0 <= t <= total_steps``
    and 0 afterwards, for every term; ``beta = 1``. The relaxation only shapes the
    optimisation path: in eval mode and in :func:`recm_opt.export` every term is pruned
    (the report's ``alpha`` is this deployed value; ``scheduled_alpha(layer)`` is the
    training one).

    Args:
        optimizer: the inner optimizer over the model's parameters.
        model: the model holding the ``@relaxed`` layers.
        group: accepted for a one-line swap with ``RECMOptimizer``; unused.
        target: accepted for a one-line swap; unused (``step(target=y)`` still works).
        total_steps: length of the triangle, usually the number of training steps.
        peak: the alpha at ``total_steps / 2``.
        **kwargs: ``RECMOptimizer`` options; ``prune_eps``, ``weight_radius`` (the
            projection of the term parameters), ``lr``, ``weight_decay`` and ``seed`` apply,
            RECM's own (``a``, ``b``, ``hidden``, ``max_units``, ``beta_fn``) are ignored.

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
        ...     model(torch.randn(8, 3)).pow(2).sum().backward(); _ = opt.step(); opt.zero_grad()
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
        **kwargs: Any,
    ) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not peak > 0:
            raise ValueError(f"peak must be > 0, got {peak}")
        self.total_steps, self.peak = total_steps, float(peak)
        super().__init__(optimizer, model, group, target, **kwargs)

    def _make_modulation(self, terms: tuple[str, ...], state_dim: int, hidden: int, seed: int,
                         beta_fn: Callable[[Tensor], Tensor]) -> Modulation:
        return _ScheduleModulation(terms, state_dim, self.total_steps, self.peak)

    def scheduled_alpha(self, name: str) -> float:
        """The training-time alpha of layer ``name`` (every term shares it) at the current step."""
        mod = self.layers[name].recm_modulation
        assert isinstance(mod, _ScheduleModulation)
        return mod.scheduled_alpha()

    def __repr__(self) -> str:
        return (f"EquivarianceSchedule({type(self.inner).__name__}, layers={len(self._layers)}, "
                f"total_steps={self.total_steps}, peak={self.peak})")


class ResidualPathwayPrior(_Policy):
    """Keep the unconstrained branch on with a trainable scale per term and an L2 prior on it.

    Each tagged layer computes ``f_eq(z) + sum_i alpha_i f_un_i(z)`` with ``alpha_i`` a
    trainable scalar (in the layer's ``recm_modulation.alpha``, trained by the inner
    optimizer in the modulation param group). The prior is the negative log of a
    Gaussian on the branch,

        R = prior / 2 * (sum_i alpha_i^2 + sum_i ||theta_un_i||^2),

    applied in ``step()`` as the gradient term ``prior * p`` added to every such
    parameter ``p`` right before the inner step (after the closure and the finite
    check, so it never enters the loss or AMP scaling). The scale is in the prior
    together with the term parameters because ``alpha_i f_un_i`` is invariant to
    ``alpha -> c alpha, theta -> theta / c``: a prior on ``theta`` alone could be
    undone by a growing ``alpha``. Term parameters are also projected to
    ``weight_radius`` as under RECM. A term is pruned (in eval and export) only when
    ``|alpha_i| < prune_eps``.

    Args:
        optimizer: the inner optimizer over the model's parameters.
        model: the model holding the ``@relaxed`` layers.
        group: accepted for a one-line swap with ``RECMOptimizer``; unused.
        target: accepted for a one-line swap; unused (``step(target=y)`` still works).
        prior: strength of the L2 prior (a weight decay on the branch), ``>= 0``.
        init_scale: initial value of every ``alpha_i``.
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
        >>> opt = ResidualPathwayPrior(torch.optim.SGD(model.parameters(), lr=0.1), model, prior=0.5)
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
        prior: float = 1e-3,
        init_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not prior >= 0:
            raise ValueError(f"prior must be >= 0, got {prior}")
        self.prior, self.init_scale = float(prior), float(init_scale)
        super().__init__(optimizer, model, group, target, **kwargs)
        self._refresh_live()
        # The inner optimizer's step pre-hook runs exactly between our checks and its update.
        ref = weakref.ref(self)
        self._prior_hook = optimizer.register_step_pre_hook(
            lambda *_: ref()._add_prior_grad() if ref() is not None else None  # type: ignore[union-attr]
        )

    def _make_modulation(self, terms: tuple[str, ...], state_dim: int, hidden: int, seed: int,
                         beta_fn: Callable[[Tensor], Tensor]) -> Modulation:
        return _ScaleModulation(terms, state_dim, self.init_scale)

    def prior_parameters(self) -> list[nn.Parameter]:
        """The parameters under the L2 prior: every ``alpha_i`` and every term's parameters."""
        out: list[nn.Parameter] = []
        for layer in self._layers:
            out.append(layer.mod.alpha)  # type: ignore[arg-type]
            out += [p for ps in layer.term_params.values() for p in ps]
        return out

    @torch.no_grad()
    def _add_prior_grad(self) -> None:
        if self.prior == 0:
            return
        for p in self.prior_parameters():
            if p.grad is None:
                p.grad = self.prior * p.detach().clone()
            else:
                p.grad.add_(p, alpha=self.prior)

    def __repr__(self) -> str:
        return (f"ResidualPathwayPrior({type(self.inner).__name__}, layers={len(self._layers)}, "
                f"prior={self.prior}, init_scale={self.init_scale})")
