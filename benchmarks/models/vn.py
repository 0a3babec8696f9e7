"""Vector Neuron (Deng et al., 2021) building blocks and a small VN-PointNet.

Features use the layout (B, C, 3, M): batch, channels, the 3-D vector axis
and points (M may be N points or N*k flattened neighbours). Every VN linear
map is its own ``nn.Module`` built by an injectable ``linear_factory`` with
signature ``(c_in, c_out) -> nn.Module`` acting on (B, C_in, 3, M), so relaxed
(symmetry-breaking) replacements can be swapped in without touching the model.

Also provides a plain, non-equivariant PointNet-style baseline and a small
Adam training loop with hooks for custom optimizers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

EPS = 1e-6
LinearFactory = Callable[[int, int], nn.Module]


class VNLinear(nn.Module):
    """SO(3)-equivariant linear map: mixes channels only, no bias.

    Args:
        c_in: input channels.
        c_out: output channels.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        # Std 1/sqrt(c_in) keeps feature norms roughly constant across layers;
        # nn.Linear's smaller default shrinks them and the quadratic invariants
        # of the head then vanish.
        bound = math.sqrt(3.0 / c_in)
        self.weight = nn.Parameter(torch.empty(c_out, c_in).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C_in, 3, ...) to (B, C_out, 3, ...)."""
        return torch.einsum("oc,bc...->bo...", self.weight, x)

    def extra_repr(self) -> str:
        return f"c_in={self.c_in}, c_out={self.c_out}"


class VNLeakyReLU(nn.Module):
    """VN leaky ReLU with a learned direction per channel (Deng et al. 2021).

    For each channel the feature q and the direction k = U x are compared;
    when <q, k> < 0 the component of q along k is removed. The output is
    ``slope * q + (1 - slope) * relu_part``.

    Args:
        c: channels.
        negative_slope: leak factor.
        direction: VN linear module (c -> c) producing k; VNLinear if None.
    """

    def __init__(self, c: int, negative_slope: float = 0.2, direction: nn.Module | None = None) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.direction = direction if direction is not None else VNLinear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to (B, C, 3, ...); output has the same shape."""
        d = self.direction(x)
        dot = (x * d).sum(dim=2, keepdim=True)
        d_norm_sq = (d * d).sum(dim=2, keepdim=True)
        # EPS is a rotation-invariant scalar, so equivariance stays exact.
        projected = x - (dot / (d_norm_sq + EPS)) * d
        relu = torch.where(dot >= 0, x, projected)
        return self.negative_slope * x + (1.0 - self.negative_slope) * relu


def knn_mean_offset(points: Tensor, k: int) -> Tensor:
    """Offset of each point from the mean of its k nearest neighbours.

    Distances are rotation invariant, so the neighbourhoods are too and the
    offsets rotate with the cloud (an equivariant local shape descriptor).

    Args:
        points: (B, N, 3).
        k: neighbours (the point itself included).

    Returns:
        (B, N, 3) offsets x_i - mean_{j in knn(i)} x_j.
    """
    dist = torch.cdist(points, points)
    idx = dist.topk(k, dim=-1, largest=False).indices  # (B, N, k)
    batch = torch.arange(points.shape[0], device=points.device)[:, None, None]
    nbrs = points[batch, idx]  # (B, N, k, 3)
    return points - nbrs.mean(dim=2)


def lift_points(points: Tensor, k_neighbors: int) -> Tensor:
    """Lift a cloud (B, N, 3) to VN features (B, C0, 3, N).

    Channel 0 is the centred point (translation invariant); channel 1, when
    ``k_neighbors > 0``, is the local kNN offset.
    """
    centred = points - points.mean(dim=1, keepdim=True)
    chans = [centred]
    if k_neighbors > 0:
        chans.append(knn_mean_offset(points, k_neighbors))
    return torch.stack(chans, dim=1).transpose(2, 3)


class VNInvariantHead(nn.Module):
    """Invariant classifier head on equivariant features (cf. Deng's VNStdFeature).

    Each point's features are concatenated with the mean-pooled (global)
    features, a per-point frame z_n (3 vectors) is predicted from them by a
    VN linear map, and the inner products <x_{c,n}, z_{j,n}> are invariant
    because both factors rotate together. The frame must be per point: VN
    networks are odd (f(-x) = -f(x)), so on centrally symmetric shapes the
    pooled features vanish and a frame built from them alone would be zero.
    Invariants are pooled over points (mean and max) and fed to an MLP.

    Args:
        c: input channels.
        n_classes: number of logits.
        hidden: MLP hidden width.
        linear_factory: constructor of the frame VN linear map (2c -> 3).
    """

    def __init__(self, c: int, n_classes: int, hidden: int = 128, linear_factory: LinearFactory = VNLinear) -> None:
        super().__init__()
        self.frame = linear_factory(2 * c, 3)
        self.mlp = nn.Sequential(nn.Linear(12 * c, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Map features (B, C, 3, N) to logits (B, n_classes)."""
        pooled = x.mean(dim=3, keepdim=True)  # VN mean pooling, (B, C, 3, 1)
        x = torch.cat([x, pooled.expand_as(x)], dim=1)  # (B, 2C, 3, N)
        z = self.frame(x)  # (B, 3, 3, N)
        inv = torch.einsum("bcdn,bjdn->bcjn", x, z).flatten(1, 2)  # (B, 6C, N)
        feats = torch.cat([inv.mean(dim=2), inv.amax(dim=2)], dim=1)
        return self.mlp(feats)


class VNPointNet(nn.Module):
    """Small rotation-invariant VN-PointNet classifier.

    Args:
        n_classes: number of classes.
        channels: widths of the VNLinear + VNLeakyReLU stages.
        k_neighbors: kNN size of the local input channel (0 disables it).
        negative_slope: VNLeakyReLU leak.
        hidden: width of the invariant MLP head.
        linear_factory: constructor ``(c_in, c_out)`` of each VN linear map.
        direction_factory: constructor of the VNLeakyReLU direction maps;
            defaults to ``linear_factory``.
    """

    def __init__(
        self,
        n_classes: int,
        channels: tuple[int, ...] = (16, 32, 64),
        k_neighbors: int = 16,
        negative_slope: float = 0.2,
        hidden: int = 128,
        linear_factory: LinearFactory = VNLinear,
        direction_factory: LinearFactory | None = None,
    ) -> None:
        super().__init__()
        direction_factory = direction_factory or linear_factory
        self.k_neighbors = k_neighbors
        layers: list[nn.Module] = []
        c_prev = 2 if k_neighbors > 0 else 1
        for c in channels:
            layers += [linear_factory(c_prev, c), VNLeakyReLU(c, negative_slope, direction_factory(c, c))]
            c_prev = c
        self.features = nn.Sequential(*layers)
        self.head = VNInvariantHead(c_prev, n_classes, hidden, linear_factory)

    def forward(self, points: Tensor) -> Tensor:
        """Map points (B, N, 3) to logits (B, n_classes)."""
        return self.head(self.features(lift_points(points, self.k_neighbors)))


class PointNetBaseline(nn.Module):
    """Plain (non-equivariant) PointNet: shared per-point MLP, max pool, MLP.

    Uses raw centred coordinates, so it can exploit the canonical pose.

    Args:
        n_classes: number of classes.
        channels: widths of the shared per-point MLP.
        hidden: width of the classifier MLP.
    """

    def __init__(self, n_classes: int, channels: tuple[int, ...] = (64, 128, 256), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = 3
        for c in channels:
            layers += [nn.Linear(c_prev, c), nn.ReLU()]
            c_prev = c
        self.point_mlp = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c_prev, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, points: Tensor) -> Tensor:
        """Map points (B, N, 3) to logits (B, n_classes)."""
        centred = points - points.mean(dim=1, keepdim=True)
        return self.head(self.point_mlp(centred).amax(dim=1))


# ------------------------------------------------------------------- training
Data = tuple[Tensor, Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 128) -> dict[str, float | list[float]]:
    """Instance and mean per-class accuracy of ``model`` on ``data``.

    Args:
        model: classifier mapping (B, N, 3) to logits.
        data: (points, labels).
        batch_size: evaluation batch size.

    Returns:
        Dict with "instance_acc", "class_acc" and "per_class_acc".
    """
    points, labels = data
    model.eval()
    chunks = range(0, len(points), batch_size)
    preds = torch.cat([model(points[i : i + batch_size]).argmax(dim=1) for i in chunks])
    correct = (preds == labels).double()
    classes = labels.unique()
    per_class = [correct[labels == k].mean().item() for k in classes]
    return {
        "instance_acc": correct.mean().item(),
        "class_acc": sum(per_class) / len(per_class),
        "per_class_acc": per_class,
    }


StepHook = Callable[[torch.optim.Optimizer, Tensor], None]


def _train_epoch(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    gen: torch.Generator,
    on_step: StepHook | None,
) -> float:
    """Run one shuffled epoch and return the mean training loss."""
    points, labels = data
    model.train()
    perm = torch.randperm(len(points), generator=gen)
    total, count = 0.0, 0
    for i in range(0, len(points), batch_size):
        idx = perm[i : i + batch_size]
        loss = nn.functional.cross_entropy(model(points[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(optimizer, labels[idx])
        total, count = total + loss.item() * len(idx), count + len(idx)
    return total / count


def train_classifier(
    model: nn.Module,
    train: Data,
    test: Data,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    on_step: StepHook | None = None,
) -> dict[str, float | list[float]]:
    """Train ``model`` with cross-entropy and report test accuracy.

    Args:
        model: classifier mapping (B, N, 3) to logits; initialised by the caller.
        train: (points, labels) training data.
        test: (points, labels) test data.
        epochs: number of passes over ``train``.
        lr: Adam learning rate (ignored when ``make_optimizer`` is given).
        batch_size: minibatch size.
        seed: seed of the minibatch shuffling.
        make_optimizer: optional ``model -> Optimizer``; Adam(lr) if None.
        on_step: optional callback ``(optimizer, batch_targets)`` called right
            after every ``optimizer.step()``.

    Returns:
        Dict with "instance_acc", "class_acc", "per_class_acc" (test),
        "train_loss" (per epoch) and "epoch_seconds" (per epoch).
    """
    if make_optimizer is not None:
        optimizer = make_optimizer(model)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, seconds = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        losses.append(_train_epoch(model, train, optimizer, batch_size, gen, on_step))
        seconds.append(time.perf_counter() - t0)
    result = evaluate(model, test)
    result.update(train_loss=losses, epoch_seconds=seconds)
    return result
