"""The training forward's ``(alpha, beta)`` of every tagged layer at once, and the newest term's gradient.

A training forward needs, per layer, ``alpha = GELU(w_alpha h_t)`` and
``beta = k(w_beta . h_t)`` with the gradient of h's newest term,
``h_t + gamma_t (l_theta(newest) - stop_grad(l_theta(newest)))``, whose value is ``h_t``.

Layers whose modulations have the same shapes form a group. The first training
forward of a pass that reaches a layer of a group computes the coefficients of the
whole group in one batched autograd function (:class:`_Coefficients`); each layer
takes its row. The function's backward runs once, after every layer of the group has
sent its gradient, and carries it through ``r_theta`` for all layers in one batched
recomputation. So the number of kernels does not grow with the number of layers,
and nothing is kept between steps: the rows belong to one pass (a layer that runs
again starts a new one) and are dropped by ``step()``.

Forwards that run inside a backward (activation checkpointing's recomputation) reuse
the values their layer had in its forward, with the per-layer gradient path
(:meth:`~recm_opt.modulation.Modulation.coefficients`): the recomputation sees the
very same activations, and reentrant checkpointing still gets its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .modulation import (
    Modulation,
    _in_backward,
    _r_theta_tensors,
    alpha_map,
    alpha_map_backward,
    is_standard,
    ranks_mean,
)


def _keep(t: Tensor) -> Tensor:
    return t


def _plain_saves() -> Any:
    """Save tensors for backward as they are, whatever saved-tensor hooks are active.

    Non-reentrant activation checkpointing counts the tensors saved in its region and
    requires its recomputation to save as many: the coefficients of a whole group (built
    by whichever layer runs first) and a replay's gradient path are not part of the region.
    """
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _in_functorch() -> bool:
    """Inside a ``torch.func`` transform (per-sample gradients): layers compute their own coefficients."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class _Plan:
    """One group's size and ``beta_fn``, and whether its backward has run."""

    __slots__ = ("alpha_fn", "beta_fn", "dead", "size")

    def __init__(self, mods: Sequence[Modulation]) -> None:
        self.size = len(mods)
        self.alpha_fn: str = mods[0].alpha_fn
        self.beta_fn: Callable[[Tensor], Tensor] = mods[0].beta_fn
        self.dead = False  # set once the backward ran: the graph is freed, a new pass needs a new group


def _unit_weights(copies: int, units: int, like: Tensor) -> Tensor:
    """``l_theta``'s weight of each row of a flattened sample ``(copies * units,)``: ``1/S``, then ``-1/(k S)``."""
    k = copies - 1
    return torch.cat([torch.full((units,), 1.0 / units, dtype=like.dtype, device=like.device),
                      torch.full((k * units,), -1.0 / (k * units), dtype=like.dtype, device=like.device)])


class _Coefficients(torch.autograd.Function):
    """``(alpha, beta)`` of G layers, ``(G, K)`` and ``(G,)``, with the newest term's gradient.

    Inputs after the plan: ``h``, ``gamma_t`` and the newest samples ``(G, 1 + k, S, d)``
    stacked (or ``None``), then the parameters: every ``w_alpha``, every ``w_beta``,
    and, with newest samples, every ``W1``, ``b1``, ``W2``, ``b2`` of ``r_theta``.

    The backward is written out: with ``l = sum_r c_r r_theta(x_r)`` (``c_r = 1/S`` on
    the identity copy, ``-1/(k S)`` on the others) the gradient ``g_l`` of ``l`` gives
    ``dW2 = g_l (sum_r c_r a_r)^T`` (``a_r`` the hidden activations), ``db2 = 0``
    (the weights sum to zero), and ``dW1``, ``db1`` through ``GELU'`` of the hidden
    pre-activations. Tests compare it with autograd through the per-layer path in float64.
    """

    @staticmethod
    def forward(ctx: Any, plan: _Plan, h: Tensor, gamma_t: Tensor, newest: Tensor | None,  # type: ignore[override]
                *params: Tensor) -> tuple[Tensor, Tensor]:
        g = plan.size
        with torch.autocast(h.device.type, enabled=False):  # in the modulation's dtype, as its backward
            w_alpha, w_beta = torch.stack(params[:g]), torch.stack(params[g:2 * g])
            s = torch.bmm(w_alpha, h[..., None])[..., 0]
            u = (w_beta * h).sum(-1)
            # r_theta's W1, b1, W2 as the forward saw them (b2 has no gradient path: see the class docstring)
            r_theta = [torch.stack(params[i * g:(i + 1) * g]) for i in range(2, 5)] if newest is not None else []
            ctx.plan = plan
            ctx.save_for_backward(h, gamma_t, newest, s, u, w_alpha, w_beta, *r_theta)
            return alpha_map(s, plan.alpha_fn), plan.beta_fn(u)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_alpha: Tensor, grad_beta: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan = ctx.plan
        plan.dead = True
        h, gamma_t, newest, s, u, w_alpha, w_beta, *r_theta = ctx.saved_tensors
        ds = alpha_map_backward(grad_alpha.to(s.dtype), s, plan.alpha_fn)  # (G, K)
        with torch.enable_grad():
            leaf = u.detach().requires_grad_()
            (du,) = torch.autograd.grad(plan.beta_fn(leaf), leaf, grad_beta.to(u.dtype))  # (G,)
        out: list[Tensor | None] = [None, None, None, None]
        out += (ds[:, :, None] * h[:, None, :]).unbind(0)  # w_alpha
        out += (du[:, None] * h).unbind(0)  # w_beta
        if newest is None:
            return tuple(out)
        w1, b1, w2 = r_theta
        # the gradient reaching h's newest term, gamma_t (l - stop_grad(l))
        g_l = gamma_t[:, None] * (torch.bmm(ds[:, None, :], w_alpha)[:, 0] + du[:, None] * w_beta)  # (G, m)
        g_l = ranks_mean(g_l)  # DDP: dL/dl of the whole batch (see modulation._GlobalGrad)
        n, c, units, d = newest.shape
        x = newest.reshape(n, c * units, d)
        pre = torch.baddbmm(b1[:, :, None], w1, x.transpose(1, 2))  # (G, hidden, R)
        weights = _unit_weights(c, units, pre)
        grad_w2 = g_l[:, :, None] * torch.matmul(nn.functional.gelu(pre), weights)[:, None, :]
        grad_pre = torch.ops.aten.gelu_backward(torch.bmm(w2.transpose(1, 2), g_l[:, :, None]) * weights, pre)
        out += torch.bmm(grad_pre, x).unbind(0)  # W1
        out += grad_pre.sum(-1).unbind(0)  # b1
        out += grad_w2.unbind(0)  # W2
        out += torch.zeros_like(g_l).unbind(0)  # b2: the weights of l sum to zero
        return tuple(out)


def _key(mod: Modulation) -> tuple | None:
    """Modulations with equal keys are batched together; ``None``: the per-layer path.

    Each layer's result does not depend on which others share its group (every batched op
    treats the layers independently), so the grouping only decides the number of kernels.
    """
    if not is_standard(mod):
        return None
    x = mod.newest
    # layers whose newest samples are rows of one stacked tensor (one batch of the step) form one group,
    # which reuses that tensor instead of stacking the rows again
    sample = None if x is None else (tuple(x.shape), x.dtype, x.device, id(x._base) if x._base is not None else None)
    return (sample, mod.h.dtype, mod.h.device, tuple(mod.w_alpha.shape), tuple(mod.r_theta[0].weight.shape),
            tuple(mod.r_theta[2].weight.shape), mod.alpha_fn, mod.beta_fn)


class _Pass:
    """One group's coefficients for one pass: per-term alphas and betas, and which layers took theirs."""

    __slots__ = ("alpha", "beta", "betas", "plan", "rows", "taken", "terms")

    def __init__(self, mods: Sequence[Modulation], stacked: Tensor | None) -> None:
        self.plan = _Plan(mods)
        h = torch.stack([m.h for m in mods])
        gamma_t = torch.stack([m.gamma_t for m in mods]).to(h.dtype)
        newest = stacked if stacked is not None or mods[0].newest is None else torch.stack([m.newest for m in mods])
        newest = newest.to(h.dtype) if newest is not None else None
        params: list[Tensor] = [m.w_alpha for m in mods] + [m.w_beta for m in mods]
        if newest is not None:
            for i in range(4):
                params += [_r_theta_tensors(m)[i] for m in mods]
        self.alpha, self.beta = _Coefficients.apply(self.plan, h, gamma_t, newest, *params)
        k = self.alpha.shape[1]
        scalars = self.alpha.reshape(-1).unbind(0)  # one backward node for every term of every layer
        self.terms = [scalars[i * k:(i + 1) * k] for i in range(len(mods))]
        self.betas = self.beta.unbind(0)
        self.rows = {id(m): i for i, m in enumerate(mods)}
        self.taken: set[int] = set()


class CoefficientBook:
    """The batched coefficients of an optimizer's layers (see the module docstring)."""

    def __init__(self) -> None:
        self._groups: dict[tuple, list[Modulation]] = {}
        self._member: dict[int, tuple] = {}
        self._passes: dict[tuple, _Pass] = {}
        self._last: dict[int, tuple[Any, Tensor]] = {}
        self._stacked: dict[int, Tensor] = {}
        self.mods: list[Modulation] = []

    def reset(self, mods: list[Modulation] | None = None, stacked: Sequence[Tensor] = ()) -> None:
        """Forget every pass and group (after a step, a load, or a change of layers).

        Args:
            mods: the optimizer's modulations, in layer order.
            stacked: the step's stacked samples whose rows are some layers' ``newest``
                (reused instead of stacking them again).
        """
        if mods is not None:
            self.mods = mods
        self._groups, self._member, self._passes, self._last = {}, {}, {}, {}
        self._stacked = {id(x): x for x in stacked}

    def term_coefficients(self, mod: Modulation) -> tuple[Sequence[Tensor], Tensor]:
        """``mod``'s training coefficients, one 0-d alpha per term, and beta (with the newest term's gradient)."""
        if _in_backward():
            return self._replay(mod)
        key = _key(mod)
        if key is None or not torch.is_grad_enabled() or _in_functorch() or self._group_of(mod, key) is None:
            alpha, beta = mod.reference_coefficients(with_grad=True)
            out: tuple[Sequence[Tensor], Tensor] = (alpha.unbind(0), beta)
        else:
            p = self._passes.get(key)
            if p is None or p.plan.dead or id(mod) in p.taken:
                group = self._groups[key]
                with _plain_saves():
                    p = self._passes[key] = _Pass(group, self._stacked_newest(group))
            i = p.rows[id(mod)]
            p.taken.add(id(mod))
            out = p.terms[i], p.betas[i]
        self._last[id(mod)] = out
        return out

    def _replay(self, mod: Modulation) -> tuple[Sequence[Tensor], Tensor]:
        """A forward inside a backward (checkpoint recomputation): the forward's values, the per-layer gradient."""
        with _plain_saves():
            alpha, beta = mod.reference_coefficients(with_grad=True)
        last = self._last.get(id(mod))
        if last is None:
            return alpha.unbind(0), beta
        terms = [v.detach() + (a - a.detach()) for v, a in zip(last[0], alpha.unbind(0))]
        return terms, last[1].detach() + (beta - beta.detach())

    def _stacked_newest(self, group: list[Modulation]) -> Tensor | None:
        """The step's stacked samples when their rows are exactly the group's ``newest``, in order."""
        first = group[0].newest
        x = self._stacked.get(id(first._base)) if first is not None and first._base is not None else None
        if x is None or x.shape[0] != len(group):
            return None
        ok = all(m.newest is not None and m.newest._base is x and m.newest.storage_offset() == i * x.stride(0)
                 and m.newest.shape == x.shape[1:] for i, m in enumerate(group))
        return x if ok else None

    def _group_of(self, mod: Modulation, key: tuple) -> list[Modulation] | None:
        if self._member.get(id(mod)) != key:  # first use, or the layer changed (moved, new sample shape)
            self._groups, self._member, self._passes = {}, {}, {}
            for m in self.mods:
                k = _key(m)
                if k is not None:
                    self._groups.setdefault(k, []).append(m)
                    self._member[id(m)] = k
        return self._groups.get(key) if self._member.get(id(mod)) == key else None
