"""The per-layer RECM state: ``h``, ``r_theta``, ``l_theta``, ``alpha``/``beta`` and ``gamma_t``.

Maths (DESIGN.md section 1), for one tagged layer with state ``h in R^m``::

    gamma_t = a / (b + a t)                                  t = 1, 2, ...
    h_t     = (1 - gamma_t) h_{t-1} + gamma_t l_theta(z_t, y_t)
    l_theta(z, y) = mean_units[ r_theta(z, y) - mean_{g in C_G} r_theta(rho(g) z, rho(g) y) ]
    alpha_i = GELU(w_alpha_i . h_t),   beta = k(w_beta . h_t),   k(x) = 1 + tanh(x)

The only gradient path into ``theta`` is the newest term ``gamma_t l_theta``; the
history ``h_{t-1}`` is a constant. The forward pass uses the *value* of the
committed ``h_t`` and adds the newest term's gradient with a straight-through
construction (``h_t + gamma_t (l - stop_grad(l))``), so training, evaluation and
export all see the same alpha and beta, also across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["GELU_LIPSCHITZ", "Modulation", "gamma", "one_plus_tanh", "project_norm_"]

# max_x |d/dx GELU(x)| = max_x Phi(x) + x phi(x), attained at x = sqrt(2) (1.12890...); rounded up.
GELU_LIPSCHITZ = 1.129


def gamma(t: int | Tensor, a: float, b: float = 1.0) -> float | Tensor:
    """Return the step size ``gamma_t = a / (b + a t)`` of the h recurrence (t counts from 1).

    Example:
        >>> gamma(1, a=1.0, b=1.0)
        0.5
    """
    return a / (b + a * t)


def one_plus_tanh(x: Tensor) -> Tensor:
    """The default beta map ``k(x) = 1 + tanh(x)``: ``k(0) = 1`` and beta stays in (0, 2)."""
    return 1 + torch.tanh(x)


@torch.no_grad()
def project_norm_(tensors: Sequence[Tensor], radius: float, dim: int | None = None) -> None:
    """Project each tensor in place onto the ball ``norm <= radius`` (Euclidean / Frobenius).

    With ``dim`` set, each slice along ``dim`` is projected separately (rows of
    ``w_alpha``). Projection is idempotent, and tensors inside the ball are untouched.

    Example:
        >>> w = torch.tensor([3.0, 4.0]); project_norm_([w], 1.0); w
        tensor([0.6000, 0.8000])
    """
    for x in tensors:
        n = x.norm() if dim is None else x.norm(dim=dim, keepdim=True)
        # where() rather than clamp on the scale so that an inf norm yields a finite 0-scale
        scale = torch.where(n > radius, radius / n, torch.ones_like(n))
        x.mul_(torch.nan_to_num(scale, nan=0.0))


class _SeededLazyLinear(nn.LazyLinear):
    """LazyLinear whose materialised weights come from a private seeded generator.

    The input width of ``r_theta`` is only known at the first captured batch; a
    private generator keeps that initialisation identical across DDP ranks and off
    the user's global RNG stream.
    """

    def __init__(self, out_features: int, seed: int) -> None:
        super().__init__(out_features)
        self._seed = seed

    def reset_parameters(self) -> None:  # noqa: D102
        if self.has_uninitialized_params() or not hasattr(self, "_seed") or self.in_features == 0:
            return
        g = torch.Generator().manual_seed(self._seed)
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.weight.shape, generator=g) * 2 * bound - bound)
            self.bias.copy_(torch.rand(self.bias.shape, generator=g) * 2 * bound - bound)


class Modulation(nn.Module):
    """RECM's learned modulation of one tagged layer (created by ``RECMOptimizer``).

    Parameters (trained by the wrapped optimizer): ``r_theta`` (2-layer GELU MLP),
    ``w_alpha`` (K x m) and ``w_beta`` (m). Buffers (not in ``state_dict``; the
    optimizer checkpoints them): ``h``, ``gamma_t`` and ``t``.

    Args:
        terms: the names of the K unconstrained terms.
        state_dim: m, the size of ``h``.
        hidden: width of ``r_theta``'s hidden layer.
        seed: seed of the private generator that initialises the parameters.
        beta_fn: the map ``k`` with ``k(0) = 1``.
    """

    def __init__(
        self,
        terms: Sequence[str],
        state_dim: int = 16,
        hidden: int = 16,
        seed: int = 0,
        beta_fn: Callable[[Tensor], Tensor] = one_plus_tanh,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.terms = tuple(terms)
        self.r_theta = nn.Sequential(_SeededLazyLinear(hidden, seed + 1), nn.GELU(), nn.Linear(hidden, state_dim))
        bound = 1 / math.sqrt(hidden)
        with torch.no_grad():
            for p in self.r_theta[2].parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        w = torch.randn(len(self.terms), state_dim, generator=g) / math.sqrt(state_dim)
        self.w_alpha = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp(min=1.0))
        self.w_beta = nn.Parameter(torch.zeros(state_dim))
        self.beta_fn = beta_fn
        self.register_buffer("h", torch.zeros(state_dim), persistent=False)
        self.register_buffer("gamma_t", torch.zeros(()), persistent=False)
        self.register_buffer("t", torch.zeros((), dtype=torch.long), persistent=False)
        # Filled by the optimizer: the stacked (1 + |C_G|, S, d) sample behind h's newest term.
        self.newest: Tensor | None = None
        self.live: tuple[bool, ...] = (False,) * len(self.terms)
        self.train_all_live = True

    def l_theta(self, sample: Tensor) -> Tensor:
        """Return ``l_theta`` for a stacked sample ``(1 + k, S, d)``: identity copy first.

        ``r_theta`` runs once over every generator copy (one batched call).
        """
        r = self.r_theta(sample)
        return r[0].mean(0) - r[1:].mean((0, 1))

    def state_value(self, with_grad: bool) -> Tensor:
        """Return ``h_t``; with ``with_grad`` its newest term carries the gradient into theta."""
        if not with_grad or self.newest is None:
            return self.h
        l = self.l_theta(self.newest)
        return self.h + self.gamma_t * (l - l.detach())

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Return ``(alpha, beta)``: ``alpha = GELU(w_alpha h)`` (K,) and ``beta = k(w_beta . h)``."""
        h = self.state_value(with_grad)
        alpha = nn.functional.gelu(self.w_alpha @ h)
        beta = self.beta_fn(self.w_beta @ h)
        return alpha, beta

    def lipschitz_bound(self) -> float:
        """Return B, a certified Lipschitz constant of ``r_theta``: ``||W2|| * Lip(GELU) * ||W1||``.

        Spectral norms; ``r_theta`` must have seen data (its input width is lazy).
        """
        w1, w2 = self.r_theta[0].weight, self.r_theta[2].weight
        if isinstance(w1, nn.parameter.UninitializedParameter):
            raise RuntimeError("r_theta has not seen a batch yet; its input width is unknown")
        s = torch.linalg.matrix_norm(w1.detach().double(), 2) * torch.linalg.matrix_norm(w2.detach().double(), 2)
        return float(s) * GELU_LIPSCHITZ

    @torch.no_grad()
    def commit(self, l: Tensor, a: float, b: float) -> None:
        """Advance one step: ``t += 1`` and ``h <- (1 - gamma_t) h + gamma_t l``."""
        self.t += 1
        self.gamma_t.copy_(gamma(self.t.to(self.h.dtype), a, b))
        self.h.mul_(1 - self.gamma_t).add_(self.gamma_t * l.to(self.h.dtype))

    def extra_repr(self) -> str:
        return f"terms={self.terms}, state_dim={self.h.numel()}"
