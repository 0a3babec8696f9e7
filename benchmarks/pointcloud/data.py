"""Procedural stand-in for ModelNet40 ("Aligned" vs "Rotated" point clouds).

ModelNet40 cannot be downloaded in our environment, so this module samples
point clouds on the surfaces of parametric solids and box composites. Some
class pairs are exact rotations of each other in distribution (tall vs lying
box, standing vs lying cylinder, cone up vs cone down): a rotation-invariant
classifier cannot separate them on aligned data, whereas a model that uses
the canonical frame can. In the "rotated" variant each sample gets a Haar
random SO(3) rotation, so that orientation cue is destroyed for every model.

Generation is deterministic from ``(split, variant, n_per_class, seed)`` and
cached under ``$RECM_OPT_CACHE/pointcloud`` (default ``~/.cache/recm_opt``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recm_opt import SO3Generators

N_POINTS = 300
JITTER_STD = 0.01
JITTER_CLIP = 0.05
SCALE_RANGE = (0.8, 1.25)
# Bump when the generator changes so stale caches are not reused.
DATA_VERSION = 1

SPLIT_CODES = {"train": 0, "test": 1}
VARIANTS = ("aligned", "rotated")

Array = np.ndarray
Rng = np.random.Generator


# ----------------------------------------------------------------- primitives
def _sample_triangles(rng: Rng, n: int, tris: Array) -> Array:
    """Sample ``n`` points uniformly (by area) on a set of triangles.

    Args:
        rng: numpy random generator.
        n: number of points.
        tris: triangle vertices, shape (T, 3, 3).

    Returns:
        Points of shape (n, 3).
    """
    e1, e2 = tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]
    area = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)
    idx = rng.choice(len(tris), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    # Reflect points of the unit square that fall outside the triangle.
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    return tris[idx, 0] + u[:, None] * e1[idx] + v[:, None] * e2[idx]


def _box_area(half: Array) -> float:
    """Surface area of an axis-aligned box with half-extents ``half``."""
    a, b, c = half
    return 8.0 * (a * b + b * c + a * c)


def _sample_box(rng: Rng, n: int, half: Array, centre: Array | None = None) -> Array:
    """Sample ``n`` points uniformly on the surface of an axis-aligned box.

    Args:
        rng: numpy random generator.
        n: number of points.
        half: half-extents (3,).
        centre: box centre (3,); origin if None.

    Returns:
        Points of shape (n, 3).
    """
    half = np.asarray(half, dtype=np.float64)
    # Face pair normal to axis k has total area 8 * prod(half) / half[k].
    face_area = np.prod(half) / half
    axis = rng.choice(3, size=n, p=face_area / face_area.sum())
    pts = rng.uniform(-1.0, 1.0, size=(n, 3))
    pts[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    pts *= half
    return pts if centre is None else pts + np.asarray(centre)


def _sample_boxes(rng: Rng, n: int, boxes: list[tuple[Array, Array]]) -> Array:
    """Sample ``n`` points on a union of boxes, allocated by surface area.

    Interior overlaps are not removed; they are small for our composites and
    harmless for a classification benchmark.

    Args:
        rng: numpy random generator.
        n: number of points.
        boxes: list of (centre, half_extents).

    Returns:
        Points of shape (n, 3).
    """
    areas = np.array([_box_area(h) for _, h in boxes])
    counts = rng.multinomial(n, areas / areas.sum())
    parts = [_sample_box(rng, k, h, c) for (c, h), k in zip(boxes, counts) if k > 0]
    return np.concatenate(parts, axis=0)


def _sample_cylinder(rng: Rng, n: int, r: float, half_h: float) -> Array:
    """Points on a closed cylinder with axis z, centred at the origin."""
    side, caps = 2.0 * np.pi * r * 2.0 * half_h, 2.0 * np.pi * r * r
    on_side = rng.random(n) < side / (side + caps)
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    # Cap points: radius sqrt(U) * r gives uniform density on the disc.
    rad = np.where(on_side, r, r * np.sqrt(rng.random(n)))
    z = np.where(on_side, rng.uniform(-half_h, half_h, n), rng.choice([-half_h, half_h], n))
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)


def _sample_cone(rng: Rng, n: int, r: float, h: float) -> Array:
    """Points on a closed cone, base disc at z=0, apex at z=h."""
    lateral, base = np.pi * r * np.hypot(r, h), np.pi * r * r
    on_side = rng.random(n) < lateral / (lateral + base)
    t = np.sqrt(rng.random(n))  # fraction of the way from apex (side) or radius (base)
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    rad = r * t
    z = np.where(on_side, h * (1.0 - t), 0.0)
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)


def _unit_sphere(rng: Rng, n: int) -> Array:
    """Uniform points on the unit sphere."""
    g = rng.standard_normal((n, 3))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _sample_ellipsoid(rng: Rng, n: int, axes: Array) -> Array:
    """Area-uniform points on an ellipsoid via rejection from the sphere map."""
    a, b, c = axes
    out: list[Array] = []
    while sum(len(o) for o in out) < n:
        s = _unit_sphere(rng, 2 * n)
        # Area element of the map sphere -> ellipsoid, up to a constant.
        w = np.sqrt((b * c * s[:, 0]) ** 2 + (a * c * s[:, 1]) ** 2 + (a * b * s[:, 2]) ** 2)
        keep = rng.random(2 * n) < w / max(a * b, b * c, a * c)
        out.append(s[keep] * np.asarray(axes))
    return np.concatenate(out)[:n]


def _sample_torus(rng: Rng, n: int, big_r: float, small_r: float) -> Array:
    """Area-uniform points on a torus with symmetry axis z."""
    out: list[Array] = []
    while sum(len(o) for o in out) < n:
        u, v = rng.uniform(0.0, 2.0 * np.pi, (2, 2 * n))
        # Area element is proportional to the distance from the z axis.
        keep = rng.random(2 * n) < (big_r + small_r * np.cos(v)) / (big_r + small_r)
        ring = big_r + small_r * np.cos(v[keep])
        out.append(np.stack([ring * np.cos(u[keep]), ring * np.sin(u[keep]), small_r * np.sin(v[keep])], 1))
    return np.concatenate(out)[:n]


def _sample_pyramid(rng: Rng, n: int, half_side: float, h: float) -> Array:
    """Points on a square pyramid, base at z=0, apex at (0, 0, h)."""
    s = half_side
    corners = np.array([[s, s, 0.0], [-s, s, 0.0], [-s, -s, 0.0], [s, -s, 0.0]])
    apex = np.array([0.0, 0.0, h])
    sides = [np.stack([corners[i], corners[(i + 1) % 4], apex]) for i in range(4)]
    base = [corners[[0, 1, 2]], corners[[0, 2, 3]]]
    return _sample_triangles(rng, n, np.stack(sides + base))


# --------------------------------------------------------------- shape classes
def _box_half_extents(rng: Rng) -> Array:
    """Half-extents (x, y, z) of an upright tall box."""
    return np.array([rng.uniform(0.2, 0.35), rng.uniform(0.2, 0.35), rng.uniform(0.6, 0.9)])


def _box_tall(rng: Rng, n: int) -> Array:
    return _sample_box(rng, n, _box_half_extents(rng))


def _box_lying(rng: Rng, n: int) -> Array:
    # Same size distribution as the tall box with the long axis moved to x:
    # an exact rotation of the tall class.
    return _sample_box(rng, n, _box_half_extents(rng)[[2, 1, 0]])


def _cyl_params(rng: Rng) -> tuple[float, float]:
    return rng.uniform(0.2, 0.35), rng.uniform(0.6, 0.9)


def _cylinder_standing(rng: Rng, n: int) -> Array:
    return _sample_cylinder(rng, n, *_cyl_params(rng))


def _cylinder_lying(rng: Rng, n: int) -> Array:
    return _sample_cylinder(rng, n, *_cyl_params(rng))[:, [2, 1, 0]]


def _cone_params(rng: Rng) -> tuple[float, float]:
    return rng.uniform(0.4, 0.6), rng.uniform(0.9, 1.4)


def _cone_up(rng: Rng, n: int) -> Array:
    return _sample_cone(rng, n, *_cone_params(rng))


def _cone_down(rng: Rng, n: int) -> Array:
    # Rotation by pi about x (a proper rotation, not a reflection).
    return _sample_cone(rng, n, *_cone_params(rng)) * np.array([1.0, -1.0, -1.0])


def _sphere(rng: Rng, n: int) -> Array:
    return _unit_sphere(rng, n) * rng.uniform(0.5, 0.8)


def _ellipsoid(rng: Rng, n: int) -> Array:
    axes = np.array([rng.uniform(0.7, 0.9), rng.uniform(0.4, 0.55), rng.uniform(0.2, 0.3)])
    return _sample_ellipsoid(rng, n, axes)


def _torus(rng: Rng, n: int) -> Array:
    return _sample_torus(rng, n, rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.25))


def _pyramid(rng: Rng, n: int) -> Array:
    return _sample_pyramid(rng, n, rng.uniform(0.4, 0.6), rng.uniform(0.6, 1.0))


def _legs(half_w: float, half_d: float, leg: float, height: float) -> list[tuple[Array, Array]]:
    """Four vertical legs of half-width ``leg`` from z=0 to ``height``."""
    half = np.array([leg, leg, height / 2.0])
    xs, ys = half_w - leg, half_d - leg
    return [(np.array([sx * xs, sy * ys, height / 2.0]), half) for sx in (-1, 1) for sy in (-1, 1)]


def _chair(rng: Rng, n: int) -> Array:
    w, seat_h = rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.55)
    t, leg, back_h = rng.uniform(0.03, 0.05), rng.uniform(0.03, 0.05), rng.uniform(0.4, 0.6)
    boxes = _legs(w, w, leg, seat_h)
    boxes.append((np.array([0.0, 0.0, seat_h + t]), np.array([w, w, t])))
    boxes.append((np.array([0.0, -w + t, seat_h + 2 * t + back_h / 2]), np.array([w, t, back_h / 2])))
    return _sample_boxes(rng, n, boxes)


def _table(rng: Rng, n: int) -> Array:
    hw, hd, h = rng.uniform(0.6, 0.8), rng.uniform(0.35, 0.5), rng.uniform(0.5, 0.7)
    t, leg = rng.uniform(0.03, 0.05), rng.uniform(0.03, 0.05)
    boxes = _legs(hw, hd, leg, h)
    boxes.append((np.array([0.0, 0.0, h + t]), np.array([hw, hd, t])))
    return _sample_boxes(rng, n, boxes)


_SAMPLERS: dict[str, Callable[[Rng, int], Array]] = {
    "box_tall": _box_tall,
    "box_lying": _box_lying,
    "cylinder_standing": _cylinder_standing,
    "cylinder_lying": _cylinder_lying,
    "cone_up": _cone_up,
    "cone_down": _cone_down,
    "sphere": _sphere,
    "ellipsoid": _ellipsoid,
    "torus": _torus,
    "pyramid": _pyramid,
    "chair": _chair,
    "table": _table,
}
CLASS_NAMES: list[str] = list(_SAMPLERS)
# Class pairs whose shape distributions are exact rotations of one another.
ORIENTATION_PAIRS: list[tuple[int, int]] = [
    (CLASS_NAMES.index(a), CLASS_NAMES.index(b))
    for a, b in [("box_tall", "box_lying"), ("cylinder_standing", "cylinder_lying"), ("cone_up", "cone_down")]
]


# ----------------------------------------------------------------- generation
def _split_seed(seed: int, split: str, stream: int) -> np.random.SeedSequence:
    """Seed sequence for one (seed, split, stream); splits never share streams."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
    return np.random.SeedSequence([seed, SPLIT_CODES[split], stream])


def _finish_cloud(rng: Rng, pts: Array) -> Array:
    """Scale, jitter, centre and shuffle one cloud of shape (N_POINTS, 3)."""
    pts = pts * rng.uniform(*SCALE_RANGE)
    pts = pts + np.clip(JITTER_STD * rng.standard_normal(pts.shape), -JITTER_CLIP, JITTER_CLIP)
    pts = pts - pts.mean(axis=0, keepdims=True)
    return pts[rng.permutation(len(pts))]


def generate_aligned(split: str, n_per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate canonical-pose clouds without touching the cache.

    Each class draws from its own stream, so class ``k``'s first samples do
    not depend on ``n_per_class``.

    Args:
        split: "train" or "test".
        n_per_class: samples per class.
        seed: base seed.

    Returns:
        points (S, N_POINTS, 3) float32 and labels (S,) int64, class-major.
    """
    clouds, labels = [], []
    for k, name in enumerate(CLASS_NAMES):
        rng = np.random.default_rng(_split_seed(seed, split, k))
        clouds += [_finish_cloud(rng, _SAMPLERS[name](rng, N_POINTS)) for _ in range(n_per_class)]
        labels += [k] * n_per_class
    points = torch.from_numpy(np.stack(clouds)).to(torch.float32)
    return points, torch.tensor(labels, dtype=torch.int64)


def generate_split(split: str, variant: str, n_per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate one split of a variant without touching the cache.

    The rotated variant rotates exactly the aligned clouds (jitter is
    isotropic, so rotating after jittering is equivalent in distribution).

    Args:
        split: "train" or "test".
        variant: "aligned" or "rotated".
        n_per_class: samples per class.
        seed: base seed.

    Returns:
        points (S, N_POINTS, 3) float32 and labels (S,) int64.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    points, labels = generate_aligned(split, n_per_class, seed)
    if variant == "rotated":
        state = int(_split_seed(seed, split, 10_000).generate_state(1, np.uint64)[0] >> np.uint64(1))
        gen = torch.Generator().manual_seed(state)
        rot = SO3Generators().sample(len(points), gen)  # Haar, float64
        # Row-vector convention: x -> x R^T.
        points = torch.einsum("snj,sij->sni", points.double(), rot).float()
    return points, labels


# -------------------------------------------------------------------- caching
def cache_dir() -> Path:
    """Directory of cached point-cloud splits (read from the env each call)."""
    root = os.environ.get("RECM_OPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "recm_opt")
    return Path(root) / "pointcloud"


def _atomic_save(obj: dict[str, Tensor], path: Path) -> None:
    """Write ``obj`` to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_split(split: str, variant: str, n_per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Load (or generate and cache) one split of the procedural data set.

    Args:
        split: "train" or "test"; they use disjoint random streams.
        variant: "aligned" (canonical pose) or "rotated" (Haar SO(3) per sample).
        n_per_class: samples per class.
        seed: base seed.

    Returns:
        points (S, 300, 3) float32 and labels (S,) int64 with S = 12 * n_per_class.
    """
    name = f"v{DATA_VERSION}_{split}_{variant}_n{n_per_class}_s{seed}.pt"
    path = cache_dir() / name
    if path.exists():
        data = torch.load(path, weights_only=True)
        return data["points"], data["labels"]
    points, labels = generate_split(split, variant, n_per_class, seed)
    _atomic_save({"points": points, "labels": labels}, path)
    return points, labels


def main() -> None:
    """Generate (or load) small splits and print class counts and timings."""
    for split in SPLIT_CODES:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            points, labels = load_split(split, variant, n_per_class=50)
            dt = time.perf_counter() - t0
            counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
            print(f"{split:5s} {variant:7s} points={tuple(points.shape)} {dt:.2f}s counts={counts}")
    print("classes:", ", ".join(f"{i}:{n}" for i, n in enumerate(CLASS_NAMES)))
    print("orientation pairs:", [(CLASS_NAMES[a], CLASS_NAMES[b]) for a, b in ORIENTATION_PAIRS])
    print("cache:", cache_dir())


if __name__ == "__main__":
    main()
