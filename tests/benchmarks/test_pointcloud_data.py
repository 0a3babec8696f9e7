"""Tests for the procedural point-cloud data and the Vector-Neuron blocks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import recm_opt as recm
from benchmarks.models import vn
from benchmarks.pointcloud import data as pcd


def _haar(n: int, generator: torch.Generator) -> Tensor:
    """The library's Haar sampler (the only one), float64."""
    return recm.SO3Generators().sample(n, generator)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's cache out of the user's home directory."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path))


def _rotate(points: Tensor, rot: Tensor) -> Tensor:
    """Rotate row-vector clouds (B, N, 3) by per-sample matrices (B, 3, 3)."""
    return torch.einsum("bnj,bij->bni", points, rot)


def _rotate_vn(feats: Tensor, rot: Tensor) -> Tensor:
    """Rotate VN features (B, C, 3, N) by per-sample matrices (B, 3, 3)."""
    return torch.einsum("bij,bcjn->bcin", rot, feats)


def _procrustes(src: Tensor, dst: Tensor) -> Tensor:
    """Best rotations R with dst ~= src R^T for batches (B, N, 3)."""
    u, _, vh = torch.linalg.svd(dst.transpose(1, 2) @ src)
    return u @ vh


def test_shapes_classes_and_centring() -> None:
    points, labels = pcd.load_split("train", "aligned", n_per_class=3, seed=0)
    n_classes = len(pcd.CLASS_NAMES)
    assert n_classes >= 10
    assert points.shape == (3 * n_classes, 300, 3) and points.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=n_classes).tolist() == [3] * n_classes
    assert points.mean(dim=1).abs().max() < 1e-5


def test_deterministic_and_cached(tmp_path: Path) -> None:
    first = pcd.load_split("test", "rotated", n_per_class=2, seed=5)
    files = sorted(p.name for p in (tmp_path / "pointcloud").iterdir())
    assert len(files) == 1 and not files[0].endswith(".tmp")
    cached = pcd.load_split("test", "rotated", n_per_class=2, seed=5)
    fresh = pcd.generate_split("test", "rotated", n_per_class=2, seed=5)
    for a, b, c in zip(first, cached, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_splits_and_seeds_differ() -> None:
    train, _ = pcd.generate_split("train", "aligned", n_per_class=2, seed=0)
    test, _ = pcd.generate_split("test", "aligned", n_per_class=2, seed=0)
    other, _ = pcd.generate_split("train", "aligned", n_per_class=2, seed=1)
    assert not torch.allclose(train, test)
    assert not torch.allclose(train, other)


def test_haar_rotation_moments() -> None:
    n = 20_000
    rot = _haar(n, torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=rot.dtype).expand(n, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(n, dtype=rot.dtype), atol=1e-12)
    # Haar: E[R_ij] = 0, Var[R_ij] = 1/3, Var[R_ij^2] = 1/5 - 1/9 = 4/45.
    assert rot.mean(0).abs().max() < 5 * math.sqrt(1 / (3 * n))
    assert (rot.pow(2).mean(0) - 1 / 3).abs().max() < 5 * math.sqrt(4 / 45 / n)


def test_rotated_variant_is_rotated_aligned_variant() -> None:
    aligned, la = pcd.generate_split("train", "aligned", n_per_class=10, seed=0)
    rotated, lr = pcd.generate_split("train", "rotated", n_per_class=10, seed=0)
    assert torch.equal(la, lr)
    rot = _procrustes(aligned.double(), rotated.double())
    assert torch.allclose(_rotate(aligned.double(), rot), rotated.double(), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(len(rot), dtype=rot.dtype), atol=1e-9)
    # Per-sample rotations look Haar: entry means vanish within a CLT bound.
    assert rot.mean(0).abs().max() < 5 * math.sqrt(1 / (3 * len(rot)))


def test_aligned_orientation_pairs_differ_by_pose() -> None:
    points, labels = pcd.generate_split("train", "aligned", n_per_class=5, seed=0)
    extent = points.amax(dim=1) - points.amin(dim=1)
    tall, lying = (pcd.CLASS_NAMES.index(n) for n in ("box_tall", "box_lying"))
    assert (extent[labels == tall].argmax(dim=1) == 2).all()
    assert (extent[labels == lying].argmax(dim=1) == 0).all()


def test_vn_linear_and_relu_equivariant() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 7, dtype=torch.float64)
    rot = _haar(4, torch.Generator().manual_seed(1))
    for layer in (vn.VNLinear(5, 6), vn.VNLeakyReLU(5)):
        layer = layer.double()
        assert torch.allclose(layer(_rotate_vn(x, rot)), _rotate_vn(layer(x), rot), atol=1e-12)


@pytest.mark.parametrize("k_neighbors", [0, 8])
def test_vn_pointnet_rotation_invariant(k_neighbors: int) -> None:
    torch.manual_seed(0)
    model = vn.VNPointNet(7, channels=(6, 8), k_neighbors=k_neighbors).double()
    x = torch.randn(3, 50, 3, dtype=torch.float64)
    rot = _haar(3, torch.Generator().manual_seed(2))
    logits = model(x)
    assert logits.shape == (3, 7)
    assert (model(_rotate(x, rot)) - logits).abs().max() < 1e-9


def test_baseline_is_not_invariant() -> None:
    torch.manual_seed(0)
    model = vn.PointNetBaseline(7).double()
    x = torch.randn(3, 50, 3, dtype=torch.float64)
    rot = _haar(3, torch.Generator().manual_seed(2))
    assert (model(_rotate(x, rot)) - model(x)).abs().max() > 1e-6


def test_linear_factory_is_used_for_every_vn_linear() -> None:
    built: list[tuple[int, int]] = []

    def factory(c_in: int, c_out: int) -> nn.Module:
        built.append((c_in, c_out))
        return vn.VNLinear(c_in, c_out)

    model = vn.VNPointNet(5, channels=(4, 6), linear_factory=factory)
    n_vn_linear = sum(isinstance(m, vn.VNLinear) for m in model.modules())
    # Two stages x (linear + direction) + the head's frame map.
    assert len(built) == n_vn_linear == 5


def test_train_classifier_hooks() -> None:
    torch.manual_seed(0)
    train = pcd.load_split("train", "aligned", n_per_class=2)
    test = pcd.load_split("test", "aligned", n_per_class=1)
    model = vn.VNPointNet(len(pcd.CLASS_NAMES), channels=(4, 4), k_neighbors=4)
    steps: list[int] = []
    result = vn.train_classifier(
        model,
        train,
        test,
        epochs=1,
        batch_size=8,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        on_step=lambda opt, y: steps.append(len(y)),
    )
    assert sum(steps) == len(train[1]) and len(steps) == 3
    assert 0.0 <= result["instance_acc"] <= 1.0 and 0.0 <= result["class_acc"] <= 1.0
    assert len(result["train_loss"]) == len(result["epoch_seconds"]) == 1
