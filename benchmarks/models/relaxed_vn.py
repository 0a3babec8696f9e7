"""Relaxed Vector-Neuron linear layers and the VN-PointNet-like classifiers built from them.

The equivariant term is the channel-mixing ``VNLinear`` (it commutes with every
rotation). The unconstrained candidates are the usual relaxed counterpart: a dense
map on each point's flattened ``3C`` vector (channel-major, xyz minor, so a rotation
acts on it as ``kron(I_C, R)``), a free bias and additive noise with a learnable
scale. The layers are tagged with ``Vector("b c xyz n", units="b n")``: one
``l_theta`` unit per point.

Each relaxation method gets the terms and initialisation of its own paper
(:func:`relaxed_vn_pointnet`):

- RECM: weight, bias and noise, the weight at 0.01 times a default init, the
  bias at 0, the noise scale at 0.01; VN-LeakyReLU direction maps stay equivariant.
- ES (Pertigkiozoglou et al. 2024): a dense map with bias, started at zero; the
  direction maps are relaxed too (a dense map without bias).
- RPP (Finzi et al. 2021): ``W = P(w_equiv) + w_basic`` with ``w_basic`` at
  ``1e-3`` times a draw of the equivariant weight's init and the residual bias at
  ``1e-3`` times a uniform ``[0, 1) / sqrt(n_out)`` draw; every linear map relaxed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.tagging import _BAKED, get_relaxation

from .vn import VNLinear, VNPointNet

__all__ = ["INITS", "RelaxedVNLinear", "branch_vn_linear", "fix_coefficients", "relaxed_vn_pointnet", "vn_pointnet"]

INITS = ("small", "zero", "rpp")


@recm.relaxed(
    inputs=recm.Vector("b c xyz n", units="b n"),
    terms={"weight": "un_weight", "bias": "un_bias", "noise": "noise_scale"},
)
class RelaxedVNLinear(nn.Module):
    """``VNLinear`` (channel mixing) relaxed by a dense map on the flattened ``3C`` vector, a bias and noise.

    Args:
        c_in: input channels.
        c_out: output channels.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.eq = VNLinear(c_in, c_out)
        # Unconstrained terms start small (0.01 x a default init) so that a small
        # alpha really means a small non-equivariant contribution.
        bound = 1e-2 * math.sqrt(1.0 / (3 * c_in))
        self.un_weight = nn.Parameter(torch.empty(3 * c_out, 3 * c_in).uniform_(-bound, bound))
        self.un_bias = nn.Parameter(torch.zeros(c_out, 3))
        self.noise_scale = nn.Parameter(torch.full((), 1e-2))

    def equivariant(self, z: Tensor) -> Tensor:
        """Channel mixing ``(B, C_in, 3, N) -> (B, C_out, 3, N)``."""
        return self.eq(z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        """The candidate terms that may break rotation symmetry, each ``(B, C_out, 3, N)``."""
        b, n = z.shape[0], z.shape[-1]
        c_out = self.eq.c_out  # not un_bias's: export deletes a pruned term's parameter
        if term == "weight":
            # (B, C_in, 3, N) viewed as (B, 3 C_in, N) is the channel-major flattening: one matmul.
            return (self.un_weight @ z.reshape(b, -1, n)).view(b, c_out, 3, n)
        if term == "bias":
            return self.un_bias[None, :, :, None].expand(b, c_out, 3, n)
        noise = torch.randn(b, c_out, 3, n, device=z.device, dtype=z.dtype)
        return self.noise_scale * noise if self.training else torch.zeros_like(noise)


class _BranchVNLinear(nn.Module):
    """``VNLinear`` plus a dense map on the flattened ``3C`` vector and, optionally, a bias (tagged per instance)."""

    def __init__(self, c_in: int, c_out: int, bias: bool, init: str) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.eq = VNLinear(c_in, c_out)
        self.un_weight = nn.Parameter(torch.zeros(3 * c_out, 3 * c_in))
        self.un_bias = nn.Parameter(torch.zeros(c_out, 3)) if bias else None
        with torch.no_grad():
            if init == "small":
                bound = 1e-2 * math.sqrt(1.0 / (3 * c_in))
                self.un_weight.uniform_(-bound, bound)
            elif init == "rpp":  # 1e-3 x a draw of the equivariant weight's init, bias 1e-3 x U[0, 1) / sqrt(n)
                bound = math.sqrt(3.0 / c_in)
                self.un_weight.uniform_(-bound, bound).mul_(1e-3)
                if self.un_bias is not None:
                    self.un_bias.uniform_(0.0, 1.0).mul_(1e-3 / math.sqrt(3 * c_out))

    def equivariant(self, z: Tensor) -> Tensor:
        """Channel mixing ``(B, C_in, 3, N) -> (B, C_out, 3, N)``."""
        return self.eq(z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        """The dense map or the bias, each ``(B, C_out, 3, N)``."""
        b, n = z.shape[0], z.shape[-1]
        c_out = self.eq.c_out  # not un_weight's: export deletes a pruned term's parameter
        if term == "weight":
            return (self.un_weight @ z.reshape(b, -1, n)).view(b, c_out, 3, n)
        assert self.un_bias is not None
        return self.un_bias[None, :, :, None].expand(b, c_out, 3, n)


def branch_vn_linear(c_in: int, c_out: int, bias: bool = True, init: str = "zero") -> nn.Module:
    """A ``VNLinear`` relaxed by a dense map (and a bias when ``bias``), tagged with terms ``weight`` (, ``bias``)."""
    terms = {"weight": "un_weight", **({"bias": "un_bias"} if bias else {})}
    return recm.relaxed(_BranchVNLinear(c_in, c_out, bias, init), inputs=recm.Vector("b c xyz n", units="b n"),
                        terms=terms)


def vn_pointnet(n_classes: int, channels: tuple[int, ...] = (32, 64, 128), k_neighbors: int = 16) -> VNPointNet:
    """The equivariant-only VN-PointNet (every linear map a plain ``VNLinear``)."""
    return VNPointNet(n_classes, channels, k_neighbors)


def relaxed_vn_pointnet(n_classes: int, channels: tuple[int, ...] = (32, 64, 128), k_neighbors: int = 16,
                        method: str = "recm") -> VNPointNet:
    """VN-PointNet with the relaxed layers of ``method`` ("recm", "es" or "rpp", see the module docstring).

    "recm" relaxes the feature and head-frame maps (``len(channels) + 1`` tagged layers) with
    :class:`RelaxedVNLinear`; "es" and "rpp" also relax the VN-LeakyReLU direction maps
    (``2 len(channels) + 1`` tagged layers).
    """
    if method == "recm":
        return VNPointNet(n_classes, channels, k_neighbors, linear_factory=RelaxedVNLinear,
                          direction_factory=VNLinear)
    if method not in ("es", "rpp"):
        raise ValueError(f"method must be 'recm', 'es' or 'rpp', got {method!r}")
    init = "zero" if method == "es" else "rpp"
    return VNPointNet(n_classes, channels, k_neighbors,
                      linear_factory=lambda ci, co: branch_vn_linear(ci, co, bias=True, init=init),
                      direction_factory=lambda ci, co: branch_vn_linear(ci, co, bias=False, init=init))


@torch.no_grad()
def fix_coefficients(model: nn.Module, alpha: float = 0.5, beta: float = 1.0, requires_grad: bool = False) -> nn.Module:
    """Give every tagged layer constant coefficients, with every term live and no RECM machinery.

    Uses the same baked forward as :func:`recm_opt.export` (constant ``recm_alpha``
    and ``recm_beta`` buffers), so the model runs exactly the tagged forward that
    RECM runs, minus the modulation: the floor for RECM with every branch live.

    Args:
        model: a model with ``@relaxed`` layers and no optimizer attached.
        alpha: the value of every alpha_i.
        beta: the value of every beta.
        requires_grad: make alpha and beta require grad (never updated): autograd then keeps
            what their gradients need, as it must for RECM's learned coefficients.

    Returns:
        ``model``, modified in place.
    """
    for module in model.modules():
        tag = get_relaxation(module)
        if tag is None:
            continue
        ref = next(module.parameters())
        module.register_buffer("recm_alpha", torch.full((len(tag.term_names),), alpha, dtype=ref.dtype,
                                                        device=ref.device, requires_grad=requires_grad))
        module.register_buffer("recm_beta", torch.tensor(beta, dtype=ref.dtype, device=ref.device,
                                                       requires_grad=requires_grad))
        object.__setattr__(module, _BAKED, tag.term_names)
    return model
