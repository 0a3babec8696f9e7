"""A relaxed Vector-Neuron linear layer and the VN-PointNet-like classifier built from it.

The equivariant term is the channel-mixing ``VNLinear`` (it commutes with every
rotation). The unconstrained candidates are the usual relaxed counterpart
(DESIGN.md section 5): a dense map on each point's flattened ``3C`` vector
(channel-major, xyz minor, so a rotation acts on it as ``kron(I_C, R)``), a free
bias and additive noise with a learnable scale. The layer is tagged with
``Vector("b c xyz n", units="b n")``: one ``l_theta`` unit per point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from vn import VNLinear, VNPointNet

import recm_opt as recm
from recm_opt.tagging import _BAKED, get_relaxation

__all__ = ["RelaxedVNLinear", "fix_coefficients", "relaxed_vn_pointnet", "vn_pointnet"]


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
        c_out = self.un_bias.shape[0]
        if term == "weight":
            # (B, C_in, 3, N) viewed as (B, 3 C_in, N) is the channel-major flattening: one matmul.
            return (self.un_weight @ z.reshape(b, -1, n)).view(b, c_out, 3, n)
        if term == "bias":
            return self.un_bias[None, :, :, None].expand(b, c_out, 3, n)
        noise = torch.randn(b, c_out, 3, n, device=z.device, dtype=z.dtype)
        return self.noise_scale * noise if self.training else torch.zeros_like(noise)


def vn_pointnet(n_classes: int, channels: tuple[int, ...] = (32, 64, 128), k_neighbors: int = 16) -> VNPointNet:
    """The equivariant-only VN-PointNet (every linear map a plain ``VNLinear``)."""
    return VNPointNet(n_classes, channels, k_neighbors)


def relaxed_vn_pointnet(n_classes: int, channels: tuple[int, ...] = (32, 64, 128),
                        k_neighbors: int = 16) -> VNPointNet:
    """VN-PointNet whose feature and head-frame maps are relaxed (``len(channels) + 1`` tagged layers).

    The VN-LeakyReLU direction maps stay exactly equivariant, as in the paper's set-up.
    """
    return VNPointNet(n_classes, channels, k_neighbors, linear_factory=RelaxedVNLinear,
                      direction_factory=VNLinear)


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
