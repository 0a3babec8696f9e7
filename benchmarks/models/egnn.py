"""Plain E(n)-equivariant graph network (Satorras et al. 2021) for N-body.

Pure-torch EGNN with velocity-aware coordinate updates, written for the
flattened-node layout produced by :func:`benchmarks.nbody.data.batch_graphs`:

    m_ij  = phi_e(h_i, h_j, ||x_i - x_j||^2, a_ij)
    x_i' = x_i + C * sum_j (x_i - x_j) phi_x(m_ij) + phi_v(h_i) v_i
    h_i' = h_i + phi_h(h_i, sum_j m_ij)

with C = 1/(number of neighbours) (mean aggregation, as in the reference).
Each layer holds the edge-message map, the coordinate-update map and the
node-update map as separate submodules so they can be addressed individually.
The two update maps return the *increments* (x_i' - x_i and h_i' - h_i); the
layer adds the residual, so RECM's beta scales the update and not the state.

``EGNN(relaxed=True)`` swaps both update maps of every layer for ``@relaxed``
RECM layers (:class:`RelaxedCoordUpdate`, :class:`RelaxedNodeUpdate`) whose
unconstrained candidates see the raw coordinates and velocities and can
therefore break rotation symmetry. Until an optimizer is attached they compute
exactly the plain EGNN maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import recm_opt as recm

# Flattened-node layout: one RECM unit per node.
NODE_SCALARS = recm.Invariant("n f")
NODE_VECTORS = recm.Vector("n xyz")
DIM = 3


def _segment_sum(values: Tensor, index: Tensor, n_segments: int) -> Tensor:
    """Sums rows of ``values`` into ``n_segments`` buckets given by ``index``."""
    out = values.new_zeros((n_segments, values.shape[1]))
    return out.index_add_(0, index, values)


def _segment_mean(values: Tensor, index: Tensor, n_segments: int) -> Tensor:
    """Averages rows of ``values`` per bucket (empty buckets give zero)."""
    total = _segment_sum(values, index, n_segments)
    ones = values.new_ones((values.shape[0], 1))
    count = _segment_sum(ones, index, n_segments).clamp(min=1)
    return total / count


class EdgeMessage(nn.Module):
    """Edge-message map phi_e: (h_i, h_j, ||x_i - x_j||^2, a_ij) -> m_ij.

    Invariant inputs only, so messages are E(n)-invariant.
    """

    def __init__(self, hidden: int, edge_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden + 1 + edge_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
        )

    def forward(self, h: Tensor, radial: Tensor, edge_attr: Tensor, edge_index: Tensor) -> Tensor:
        """Computes messages.

        Args:
            h: Node features (N,H).
            radial: Squared distances per edge (E,1).
            edge_attr: Edge attributes (E,D).
            edge_index: (2,E) receiver i (row) and sender j (col).

        Returns:
            Messages (E,H).
        """
        row, col = edge_index
        return self.mlp(torch.cat([h[row], h[col], radial, edge_attr], dim=1))


class CoordUpdate(nn.Module):
    """Coordinate-update map: dx_i = mean_j (x_i - x_j) phi_x(m_ij) + phi_v(h_i) v_i.

    Equivariant because each term is a vector (x_i - x_j or v_i) times an
    invariant scalar. phi_x's last layer is bias-free with xavier gain 0.001,
    as in the reference, so training starts close to x' = x + phi_v v.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.phi_x = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.phi_v = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(
        self, x: Tensor, v: Tensor, h: Tensor, m: Tensor, coord_diff: Tensor, edge_index: Tensor
    ) -> Tensor:
        """Updates positions.

        Args:
            x: Positions (N,3).
            v: Velocities (N,3).
            h: Node features before this layer's node update (N,H).
            m: Messages (E,H).
            coord_diff: x_i - x_j per edge (E,3).
            edge_index: (2,E) edge index.

        Returns:
            The position increment x_i' - x_i (N,3).
        """
        # The reference clamps trans to +-100 per component; that breaks exact
        # rotation equivariance, so it is left out here.
        trans = coord_diff * self.phi_x(m)
        agg = _segment_mean(trans, edge_index[0], x.shape[0])
        return agg + self.phi_v(h) * v


class NodeUpdate(nn.Module):
    """Node-update map: dh_i = phi_h(h_i, sum_j m_ij); the layer adds the residual h_i."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.phi_h = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, h: Tensor, m: Tensor, edge_index: Tensor) -> Tensor:
        """Updates node features.

        Args:
            h: Node features (N,H).
            m: Messages (E,H).
            edge_index: (2,E) edge index; messages are summed at the receiver.

        Returns:
            The feature increment h_i' - h_i (N,H).
        """
        agg = _segment_sum(m, edge_index[0], h.shape[0])
        return self.phi_h(torch.cat([h, agg], dim=1))


def _init_candidates(module: nn.Module, hidden: int, out: int) -> None:
    """Adds the unconstrained candidates of one relaxed update map to ``module``.

    - ``un_weight``: a dense map of the node's raw ``(x, v)`` 6-vector and its
      features h to the update; it sees coordinate components, so it can break
      rotation symmetry.
    - ``un_bias``: a free bias on the update (a fixed direction for vectors).
    - ``noise_scale``: additive Gaussian noise with a learnable scale (training only).

    They start small so that a small alpha means a small contribution.
    """
    module.un_weight = nn.Linear(2 * DIM + hidden, out, bias=False)
    with torch.no_grad():
        module.un_weight.weight.mul_(0.01)
    module.un_bias = nn.Parameter(torch.zeros(out))
    module.noise_scale = nn.Parameter(torch.full((), 1e-2))
    module.candidate_out = out  # not from a candidate's parameter: export deletes a pruned term's


def _candidate(module: nn.Module, term: str, x: Tensor, v: Tensor, h: Tensor) -> Tensor:
    """Evaluates the unconstrained candidate ``term`` of a relaxed update map (N, out)."""
    if term == "weight":
        return module.un_weight(torch.cat([x, v, h], dim=1))
    if term == "bias":
        return module.un_bias.expand(x.shape[0], -1)
    if term != "noise":
        raise ValueError(f"unknown unconstrained term {term!r}")
    noise = torch.randn(x.shape[0], module.candidate_out, dtype=x.dtype, device=x.device)
    return module.noise_scale * noise if module.training else torch.zeros_like(noise)


_TERMS = {"weight": "un_weight", "bias": "un_bias", "noise": "noise_scale"}


@recm.relaxed(inputs={"x": NODE_VECTORS, "v": NODE_VECTORS, "h": NODE_SCALARS}, terms=_TERMS)
class RelaxedCoordUpdate(CoordUpdate):
    """The coordinate-update map with RECM candidates on the raw (x, v, h) of each node.

    ``x`` is the layer's position relative to the input graph centre, so the
    candidates stay translation invariant and only rotation symmetry can break.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        _init_candidates(self, hidden, DIM)

    def equivariant(
        self, x: Tensor, v: Tensor, h: Tensor, m: Tensor, coord_diff: Tensor, edge_index: Tensor
    ) -> Tensor:
        """The plain EGNN increment (see :class:`CoordUpdate`)."""
        return CoordUpdate.forward(self, x, v, h, m, coord_diff, edge_index)

    def unconstrained(
        self, term: str, x: Tensor, v: Tensor, h: Tensor, m: Tensor, coord_diff: Tensor, edge_index: Tensor
    ) -> Tensor:
        """Candidate ``term`` on the raw node state (N,3)."""
        return _candidate(self, term, x, v, h)


@recm.relaxed(inputs={"h": NODE_SCALARS, "x": NODE_VECTORS, "v": NODE_VECTORS}, terms=_TERMS)
class RelaxedNodeUpdate(NodeUpdate):
    """The node-update map with RECM candidates that also see the raw (x, v) of each node."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        _init_candidates(self, hidden, hidden)

    def equivariant(self, h: Tensor, m: Tensor, edge_index: Tensor, x: Tensor, v: Tensor) -> Tensor:
        """The plain EGNN increment (see :class:`NodeUpdate`); x and v are unused here."""
        return NodeUpdate.forward(self, h, m, edge_index)

    def unconstrained(self, term: str, h: Tensor, m: Tensor, edge_index: Tensor, x: Tensor, v: Tensor) -> Tensor:
        """Candidate ``term`` on the raw node state (N,H)."""
        return _candidate(self, term, x, v, h)


class EGNNLayer(nn.Module):
    """One velocity-aware E_GCL layer: message, then coordinate and node updates.

    Args:
        hidden: Width of node features and messages.
        edge_dim: Number of edge attributes.
        relaxed: Use the ``@relaxed`` update maps (identical until RECM is attached).
    """

    def __init__(self, hidden: int, edge_dim: int, relaxed: bool = False) -> None:
        super().__init__()
        self.relaxed = relaxed
        self.message = EdgeMessage(hidden, edge_dim)
        self.coord_update = (RelaxedCoordUpdate if relaxed else CoordUpdate)(hidden)
        self.node_update = (RelaxedNodeUpdate if relaxed else NodeUpdate)(hidden)

    def forward(
        self, h: Tensor, x: Tensor, v: Tensor, edge_index: Tensor, edge_attr: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Applies the layer.

        Args:
            h: Node features (N,H).
            x: Positions relative to the input graph centre (N,3).
            v: Velocities (N,3).
            edge_index: (2,E) edge index.
            edge_attr: Edge attributes (E,D).

        Returns:
            ``(h', x')``; both updates use this layer's input h and x.
        """
        coord_diff = x[edge_index[0]] - x[edge_index[1]]
        radial = (coord_diff**2).sum(dim=1, keepdim=True)
        m = self.message(h, radial, edge_attr, edge_index)
        x_new = x + self.coord_update(x, v, h, m, coord_diff, edge_index)
        extra = (x, v) if self.relaxed else ()
        return h + self.node_update(h, m, edge_index, *extra), x_new


class EGNN(nn.Module):
    """EGNN_vel for N-body: predicts future positions from (||v||, x, v, q_i q_j).

    Edge attributes are [q_i q_j, squared input distance]. Positions are
    centred per graph before the layers and the centre is added back, which
    keeps coordinates small and leaves the map translation-equivariant.
    With ``relaxed=True`` every layer's update maps are ``@relaxed`` RECM layers.
    """

    def __init__(
        self, in_node: int = 1, in_edge: int = 1, hidden: int = 64, n_layers: int = 4, relaxed: bool = False
    ) -> None:
        super().__init__()
        self.embedding = nn.Linear(in_node, hidden)
        self.layers = nn.ModuleList(EGNNLayer(hidden, in_edge + 1, relaxed) for _ in range(n_layers))

    def forward(
        self, h: Tensor, x: Tensor, v: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor
    ) -> Tensor:
        """Predicts positions.

        Args:
            h: Node features (N,F).
            x: Positions (N,3).
            v: Velocities (N,3).
            edge_index: (2,E) edge index with per-graph offsets.
            edge_attr: Edge attributes (E,in_edge).
            batch: Graph index of each node (N,).

        Returns:
            Predicted positions (N,3).
        """
        n_graphs = int(batch.max()) + 1 if batch.numel() else 0
        centre = _segment_mean(x, batch, n_graphs)[batch]  # per-graph mean, per axis
        x = x - centre
        diff = x[edge_index[0]] - x[edge_index[1]]
        edge_attr = torch.cat([edge_attr, (diff**2).sum(1, keepdim=True)], dim=1)
        h = self.embedding(h)
        for layer in self.layers:
            h, x = layer(h, x, v, edge_index, edge_attr)
        return x + centre
