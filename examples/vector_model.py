"""A small relaxed vector model: the layer a user writes and tags, and a synthetic task.

Features are C 3-vectors per sample, ``(B, C, 3)``. The equivariant map mixes
channels only (it commutes with every rotation); the unconstrained candidates are
a dense map on the flattened 3C vector, a free bias and additive noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import recm_opt as recm


@recm.relaxed(
    inputs=recm.Vector("b c xyz"),
    terms={"weight": "un_weight", "bias": "un_bias", "noise": "noise_scale"},
)
class RelaxedVectorLinear(nn.Module):
    """``z -> W z`` on channels (equivariant) plus relaxations on the flattened vectors."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))
        # Unconstrained terms start small so that a small alpha means a small contribution.
        self.un_weight = nn.Parameter(torch.randn(3 * c_out, 3 * c_in) * 1e-2 / math.sqrt(3 * c_in))
        self.un_bias = nn.Parameter(torch.zeros(c_out, 3))
        self.noise_scale = nn.Parameter(torch.full((), 1e-2))

    def equivariant(self, z: Tensor) -> Tensor:
        """Channel mixing ``(B, C_in, 3) -> (B, C_out, 3)``."""
        return torch.einsum("oc,bcx->box", self.weight, z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        """The candidate terms that may break rotation symmetry."""
        if term == "weight":
            return (z.flatten(1) @ self.un_weight.T).view(z.shape[0], -1, 3)
        if term == "bias":
            return self.un_bias.expand(z.shape[0], -1, -1)
        noise = torch.randn(z.shape[0], self.un_bias.shape[0], 3, device=z.device, dtype=z.dtype)
        return self.noise_scale * noise if self.training else torch.zeros_like(noise)


class VectorGate(nn.Module):
    """Equivariant nonlinearity: scale each vector by a function of its norm."""

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        return z * torch.sigmoid(z.norm(dim=-1, keepdim=True) - 1.0)


class VectorNet(nn.Module):
    """Three relaxed vector layers with gates: ``(B, C, 3) -> (B, 3)``."""

    def __init__(self, c_in: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [RelaxedVectorLinear(c_in, hidden), RelaxedVectorLinear(hidden, hidden), RelaxedVectorLinear(hidden, 1)]
        )
        self.gate = VectorGate()

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        for i, layer in enumerate(self.layers):
            z = layer(z)
            if i < len(self.layers) - 1:
                z = self.gate(z)
        return z[:, 0]


def make_task(n: int, broken: float, c_in: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, c_in, 3)`` and targets ``(n, 3)``; ``broken = 0`` is exactly SO(3)-symmetric.

    The symmetric target is ``sum_c |x_c| x_c`` (rotation-equivariant) on isotropic
    Gaussian inputs. ``broken > 0`` adds ``broken * (x_0 projected on the x-axis +
    a fixed offset)``, a function no rotation-equivariant map can represent.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, 3, generator=g)
    y = (x.norm(dim=-1, keepdim=True) * x).sum(1) / c_in
    if broken:
        axis = torch.tensor([1.0, 0.0, 0.0])
        y = y + broken * ((x[:, 0] @ axis)[:, None] * axis + torch.tensor([0.0, 0.5, 0.0]))
    return x, y
