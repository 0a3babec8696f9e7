"""Steerable E(3)-equivariant graph network (SEGNN, Brandstetter et al. 2021) on e3nn, for N-body.

Every learned map is a steerable linear layer: an ``o3.FullyConnectedTensorProduct``
of the features with a steerable *attribute* (spherical harmonics), plus a bias on
the scalar outputs, followed by a gated non-linearity (``e3nn.nn.Gate``: SiLU on
scalars, sigmoid gates on the l > 0 features). For one layer, with
``a_ij = Y(x_i - x_j)`` and ``a_i = (mean_j a_ij + Y(v_i)) / 2`` (unit-norm
spherical harmonics, so activations keep their scale through the layers)::

    m_ij = G(W_m2(G(W_m1([h_i, h_j, ||x_ij||^2, q_i q_j]) (x) a_ij)) (x) a_ij)
    h_i' = h_i + W_u2(G(W_u1([h_i, mean_j m_ij]) (x) a_i)) (x) a_i

The input embedding maps ``[x_i - centre, v_i, ||v_i||]`` (1o, 1o, 0e; plus the
charge, 0e, on request) to the hidden irreps, and the head maps the last hidden
features to one 1o vector added to the input position.

``SEGNN(relaxed=True)`` makes each layer's node-update map a ``@relaxed`` RECM
layer (:class:`RelaxedNodeUpdate`) whose inputs are declared as e3nn
:class:`recm_opt.Irreps`. Its unconstrained candidates treat the irreps
components as plain numbers (a dense map of ``[h, mean_j m_ij, x, v]``, a free
bias that also gives the 1o channels a fixed direction, and learned-scale
noise), so they can break rotation symmetry. Until an optimizer is attached
the relaxed network computes exactly the plain one.
"""

from __future__ import annotations

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor, nn

import recm_opt as recm

from .egnn import NODE_VECTORS, _segment_mean


class SteerableLinear(nn.Module):
    """``o3.FullyConnectedTensorProduct(features, attribute -> out)`` plus a bias on the 0e outputs.

    Args:
        irreps_in: Irreps of the features.
        irreps_attr: Irreps of the steerable attribute (spherical harmonics).
        irreps_out: Irreps of the output.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_attr: o3.Irreps, irreps_out: o3.Irreps) -> None:
        super().__init__()
        self.irreps_out = o3.Irreps(irreps_out)
        self.tp = o3.FullyConnectedTensorProduct(irreps_in, irreps_attr, self.irreps_out)
        mask = torch.cat([torch.full((mul * ir.dim,), ir == o3.Irrep("0e")) for mul, ir in self.irreps_out])
        self.register_buffer("scalar_mask", mask, persistent=False)
        self.bias = nn.Parameter(torch.zeros(int(mask.sum())))

    def forward(self, x: Tensor, attr: Tensor) -> Tensor:
        """Applies the map to features ``x`` (N, irreps_in.dim) and attributes ``attr`` (N, irreps_attr.dim)."""
        out = self.tp(x, attr)
        return out.index_add(1, self.scalar_mask.nonzero().squeeze(1), self.bias.expand(out.shape[0], -1))


def gate_for(hidden: o3.Irreps) -> Gate:
    """The gated non-linearity whose output irreps are ``hidden`` (scalars first, then l > 0)."""
    scalars = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e")
    return Gate(scalars, [nn.functional.silu], gates, [torch.sigmoid], gated)


class GatedLinear(nn.Module):
    """A steerable linear map into the gate's input irreps, then the gate."""

    def __init__(self, irreps_in: o3.Irreps, irreps_attr: o3.Irreps, hidden: o3.Irreps) -> None:
        super().__init__()
        self.gate = gate_for(hidden)
        self.linear = SteerableLinear(irreps_in, irreps_attr, self.gate.irreps_in)

    def forward(self, x: Tensor, attr: Tensor) -> Tensor:  # noqa: D102
        return self.gate(self.linear(x, attr))


class Message(nn.Module):
    """Edge-message map: two gated steerable layers conditioned on ``a_ij``."""

    def __init__(self, hidden: o3.Irreps, attr: o3.Irreps, n_edge_scalars: int) -> None:
        super().__init__()
        self.l1 = GatedLinear(hidden + hidden + o3.Irreps(f"{n_edge_scalars}x0e"), attr, hidden)
        self.l2 = GatedLinear(hidden, attr, hidden)

    def forward(self, h: Tensor, edge_scalars: Tensor, edge_attr: Tensor, edge_index: Tensor) -> Tensor:
        """Messages (E, hidden.dim) from node features h (N, hidden.dim)."""
        row, col = edge_index
        z = torch.cat([h[row], h[col], edge_scalars], dim=1)
        return self.l2(self.l1(z, edge_attr), edge_attr)


class NodeUpdate(nn.Module):
    """Node-update map: ``dh_i = W_u2(G(W_u1([h_i, mean_j m_ij]) (x) a_i)) (x) a_i``; the layer adds h_i."""

    def __init__(self, hidden: o3.Irreps, attr: o3.Irreps) -> None:
        super().__init__()
        self.l1 = GatedLinear(hidden + hidden, attr, hidden)
        self.l2 = SteerableLinear(hidden, attr, hidden)

    def forward(self, h: Tensor, agg: Tensor, node_attr: Tensor) -> Tensor:
        """The increment of the node features (N, hidden.dim)."""
        z = torch.cat([h, agg], dim=1)
        return self.l2(self.l1(z, node_attr), node_attr)


def _candidates(module: nn.Module, n_in: int, n_out: int) -> None:
    """Unconstrained candidates of a relaxed update map: dense map, free bias, learned-scale noise (start small)."""
    module.un_weight = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        module.un_weight.weight.mul_(0.01)
    module.un_bias = nn.Parameter(torch.zeros(n_out))
    module.noise_scale = nn.Parameter(torch.full((), 1e-2))


_TERMS = {"weight": "un_weight", "bias": "un_bias", "noise": "noise_scale"}


def relaxed_node_update(hidden: o3.Irreps, attr: o3.Irreps) -> nn.Module:
    """A :class:`NodeUpdate` tagged ``@relaxed`` with ``Irreps`` inputs for these irreps."""

    @recm.relaxed(
        inputs={"h": recm.Irreps(hidden, "n irreps"), "agg": recm.Irreps(hidden, "n irreps"),
                "node_attr": recm.Irreps(attr, "n irreps"), "x": NODE_VECTORS, "v": NODE_VECTORS},
        terms=_TERMS,
    )
    class RelaxedNodeUpdate(NodeUpdate):
        """The node-update map with candidates on the raw components of ``[h, mean_j m_ij, x, v]``."""

        def __init__(self) -> None:
            super().__init__(hidden, attr)
            _candidates(self, 2 * hidden.dim + 6, hidden.dim)

        def equivariant(self, h: Tensor, agg: Tensor, node_attr: Tensor, x: Tensor, v: Tensor) -> Tensor:
            """The plain SEGNN increment (x and v unused)."""
            return NodeUpdate.forward(self, h, agg, node_attr)

        def unconstrained(self, term: str, h: Tensor, agg: Tensor, node_attr: Tensor, x: Tensor, v: Tensor) -> Tensor:
            """Candidate ``term`` (N, hidden.dim); it ignores the irreps structure."""
            if term == "weight":
                return self.un_weight(torch.cat([h, agg, x, v], dim=1))
            if term == "bias":
                return self.un_bias.expand(h.shape[0], -1)
            if term != "noise":
                raise ValueError(f"unknown unconstrained term {term!r}")
            noise = torch.randn(h.shape[0], hidden.dim, dtype=h.dtype, device=h.device)
            return self.noise_scale * noise if self.training else torch.zeros_like(noise)

    return RelaxedNodeUpdate()


class SEGNNLayer(nn.Module):
    """Message passing plus a residual node update."""

    def __init__(self, hidden: o3.Irreps, attr: o3.Irreps, n_edge_scalars: int, relaxed: bool) -> None:
        super().__init__()
        self.relaxed = relaxed
        self.message = Message(hidden, attr, n_edge_scalars)
        self.node_update = relaxed_node_update(hidden, attr) if relaxed else NodeUpdate(hidden, attr)

    def forward(self, h: Tensor, x: Tensor, v: Tensor, edge_scalars: Tensor, edge_attr: Tensor,
                node_attr: Tensor, edge_index: Tensor) -> Tensor:
        """Updated node features (N, hidden.dim)."""
        m = self.message(h, edge_scalars, edge_attr, edge_index)
        agg = _segment_mean(m, edge_index[0], h.shape[0])
        extra = (x, v) if self.relaxed else ()
        return h + self.node_update(h, agg, node_attr, *extra)


class SEGNN(nn.Module):
    """SEGNN for N-body: predicts positions from ``(x, v, ||v||[, q])`` and edge scalars ``q_i q_j``.

    Args:
        hidden: Hidden irreps, scalars first (e.g. ``"16x0e+8x1o"``).
        lmax_attr: Degree of the spherical-harmonic attributes.
        n_layers: Message-passing layers.
        in_scalars: Node input scalars (1: ``||v||``; 2: ``||v||`` and the charge).
        relaxed: Use ``@relaxed`` node-update maps.
    """

    def __init__(self, hidden: str = "16x0e+8x1o", lmax_attr: int = 1, n_layers: int = 4, in_scalars: int = 1,
                 relaxed: bool = False) -> None:
        super().__init__()
        self.hidden = o3.Irreps(hidden)
        if [ir.l for _, ir in self.hidden] != sorted(ir.l for _, ir in self.hidden) or self.hidden.lmax < 1:
            raise ValueError(f"SEGNN: hidden must list scalars first and contain l >= 1 irreps, got {hidden!r}")
        self.attr = o3.Irreps.spherical_harmonics(lmax_attr)
        self.irreps_in = o3.Irreps(f"{in_scalars}x0e+2x1o")
        self.embed = SteerableLinear(self.irreps_in, self.attr, self.hidden)
        self.layers = nn.ModuleList(SEGNNLayer(self.hidden, self.attr, 2, relaxed) for _ in range(n_layers))
        self.head1 = GatedLinear(self.hidden, self.attr, self.hidden)
        self.head2 = SteerableLinear(self.hidden, self.attr, o3.Irreps("1x1o"))
        with torch.no_grad():  # start near x' = x, as EGNN's small-gain last coordinate layer does
            self.head2.tp.weight.mul_(0.01)

    def forward(self, h: Tensor, x: Tensor, v: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> Tensor:
        """Predicts positions (same signature as :class:`benchmarks.models.egnn.EGNN`).

        Args:
            h: Node scalars (N, in_scalars).
            x: Positions (N,3).
            v: Velocities (N,3).
            edge_index: (2,E) edge index with per-graph offsets.
            edge_attr: Edge scalars (E,1), ``q_i q_j``.
            batch: Graph index of each node (N,).

        Returns:
            Predicted positions (N,3).
        """
        n_graphs = int(batch.max()) + 1 if batch.numel() else 0
        centre = _segment_mean(x, batch, n_graphs)[batch]
        x = x - centre
        rel = x[edge_index[0]] - x[edge_index[1]]
        sh = lambda u: o3.spherical_harmonics(self.attr, u, normalize=True, normalization="norm")  # noqa: E731
        edge_sh = sh(rel)
        node_attr = 0.5 * (_segment_mean(edge_sh, edge_index[0], x.shape[0]) + sh(v))
        edge_scalars = torch.cat([edge_attr, (rel**2).sum(1, keepdim=True)], dim=1)
        f = self.embed(torch.cat([h, x, v], dim=1), node_attr)
        for layer in self.layers:
            f = layer(f, x, v, edge_scalars, edge_sh, node_attr, edge_index)
        return x + centre + self.head2(self.head1(f, node_attr), node_attr)
