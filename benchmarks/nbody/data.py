"""Charged 5-body N-body data set (Kipf et al. 2018) in EGNN's standard set-up.

Written from the physics. Each simulation has 5 unit-mass particles in 3-D
with charges +1 or -1 (equal probability) interacting through a Coulomb-like
force ``F_i = sum_{j != i} q_i q_j (x_i - x_j) / ||x_i - x_j||^3`` whose
components are clipped to +-0.1/dt. Integration is symplectic Euler with
dt = 0.001 for 5000 steps; every 100th step is recorded, giving 49 frames.

The task (Satorras et al. 2021) maps frame 30 (positions, velocities,
charges) to the positions at frame 40 on a fully connected graph whose edge
attribute is ``q_i q_j``. Splits of 3000/2000/2000 simulations are generated
from disjoint seed streams, vectorised over simulations, and cached on disk.

Two variants of the physics (same initial states) serve the symmetry
experiments: ``clip="norm"`` rescales forces by their length instead of clipping
components, which keeps the dynamics rotation-equivariant, and ``field=E`` adds
a uniform external field ``E`` along z acting on the charges, which breaks it.

Run ``python -m benchmarks.nbody.data`` to print the linear-baseline anchor.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch import Tensor

N_BODIES = 5
DIM = 3
DT = 1e-3
N_STEPS = 5000
SAMPLE_FREQ = 100
N_FRAMES = N_STEPS // SAMPLE_FREQ - 1  # 49: step 0 is never recorded
VEL_NORM = 0.5
INTERACTION = 1.0
MAX_FORCE = 0.1 / DT
FRAME_IN = 30
FRAME_OUT = 40
SPLIT_SIZES = {"train": 3000, "valid": 2000, "test": 2000}
CLIPS = ("component", "norm")
FIELD_AXIS = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # the external field points along z
CACHE_VERSION = 1  # bump when the generator changes so stale caches are ignored


def split_seed(split: str, seed: int) -> int:
    """Derives an independent 63-bit generator seed for one split.

    Hashing (seed, split) gives disjoint, reproducible streams without relying
    on the order in which splits are generated.

    Args:
        split: Split name, e.g. ``"train"``.
        seed: Base seed.

    Returns:
        A non-negative integer below 2**63.
    """
    digest = hashlib.sha256(f"nbody:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_state(
    n_sims: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Samples initial positions, velocities and charges.

    Args:
        n_sims: Number of simulations S.
        gen: Random generator (consumed in a fixed order).

    Returns:
        ``(loc, vel, charges)`` of shapes (S,5,3), (S,5,3), (S,5,1), float64.
        Positions are N(0,1) per coordinate; each particle's velocity has a
        uniformly random direction and norm exactly ``VEL_NORM``.
    """
    shape = (n_sims, N_BODIES, DIM)
    loc = torch.randn(shape, generator=gen, dtype=torch.float64)
    vel = torch.randn(shape, generator=gen, dtype=torch.float64)
    # A normalised isotropic Gaussian is uniform on the sphere.
    vel = vel * (VEL_NORM / vel.norm(dim=-1, keepdim=True))
    signs = torch.randint(0, 2, (n_sims, N_BODIES, 1), generator=gen)
    charges = (2 * signs - 1).to(torch.float64)
    return loc, vel, charges


def forces(loc: Tensor, charges: Tensor, clip: str = "component", field: float = 0.0) -> Tensor:
    """Clipped pairwise Coulomb-like forces, optionally in a uniform external field.

    Args:
        loc: Positions (S,N,3).
        charges: Charges (S,N,1).
        clip: ``"component"`` clips each Cartesian component to +-``MAX_FORCE``
            (the reference; not rotation-equivariant), ``"norm"`` rescales any force
            longer than ``MAX_FORCE`` to that length (rotation-equivariant).
        field: Strength E of a uniform field along ``FIELD_AXIS``; particle i feels
            ``q_i E`` on top of the pairwise force (added before clipping).

    Returns:
        Forces (S,N,3).
    """
    diff = loc[:, :, None, :] - loc[:, None, :, :]  # x_i - x_j, (S,N,N,3)
    dist2 = (diff**2).sum(-1)
    eye = torch.eye(loc.shape[1], dtype=torch.bool, device=loc.device)
    # Put 1 on the diagonal so i == j never divides by zero; then mask it out.
    inv_d3 = dist2.masked_fill(eye, 1.0).pow(-1.5).masked_fill(eye, 0.0)
    qq = charges @ charges.transpose(1, 2)  # (S,N,N)
    force = ((INTERACTION * qq * inv_d3)[..., None] * diff).sum(2)
    if field:
        force = force + field * charges * FIELD_AXIS.to(force)
    if clip == "component":
        return force.clamp(-MAX_FORCE, MAX_FORCE)
    if clip == "norm":
        norm = force.norm(dim=-1, keepdim=True)
        return force * (MAX_FORCE / norm.clamp(min=MAX_FORCE))
    raise ValueError(f"forces: clip must be one of {CLIPS}, got {clip!r}")


def simulate(
    loc: Tensor, vel: Tensor, charges: Tensor, clip: str = "component", field: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Integrates trajectories with symplectic Euler and records 49 frames.

    Follows Kipf et al.'s loop: one initial kick, then for steps 1..4999 a
    drift, a record every ``SAMPLE_FREQ`` steps, and a kick. Frame k is the
    state after (k+1)*100 drifts; its velocity is the one used for that drift.

    Args:
        loc: Initial positions (S,N,3).
        vel: Initial velocities (S,N,3).
        charges: Charges (S,N,1).
        clip: Force clipping, see :func:`forces`.
        field: External field strength, see :func:`forces`.

    Returns:
        ``(locs, vels)`` each of shape (S, 49, N, 3).
    """
    loc, vel = loc.clone(), vel.clone()
    locs, vels = [], []
    vel += DT * forces(loc, charges, clip, field)
    for step in range(1, N_STEPS):
        loc += DT * vel
        if step % SAMPLE_FREQ == 0:
            locs.append(loc.clone())
            vels.append(vel.clone())
        vel += DT * forces(loc, charges, clip, field)
    return torch.stack(locs, 1), torch.stack(vels, 1)


def advance(loc: Tensor, vel: Tensor, charges: Tensor, n_frames: int = FRAME_OUT - FRAME_IN,
            clip: str = "component", field: float = 0.0) -> Tensor:
    """Continues a recorded frame ``n_frames`` frames ahead and returns the positions there.

    A recorded frame holds the position after a drift and the velocity used for that
    drift, so the loop resumes with a kick. ``advance(frame 30) == frame 40`` up to
    round-off; it is what the equivariance-floor measurement re-simulates.

    Args:
        loc: Positions of the frame (S,N,3).
        vel: Velocities of the frame (S,N,3).
        charges: Charges (S,N,1).
        n_frames: Frames to advance (each ``SAMPLE_FREQ`` steps).
        clip: Force clipping, see :func:`forces`.
        field: External field strength, see :func:`forces`.

    Returns:
        Positions (S,N,3) ``n_frames`` frames later.
    """
    loc, vel = loc.clone(), vel.clone()
    for _ in range(n_frames * SAMPLE_FREQ):
        vel += DT * forces(loc, charges, clip, field)
        loc += DT * vel
    return loc


def generate_split(n_sims: int, seed: int, clip: str = "component", field: float = 0.0) -> dict[str, Tensor]:
    """Generates one split's task tensors (no caching).

    Every physics variant starts from the same initial states for one seed, so
    variants differ only in their dynamics.

    Args:
        n_sims: Number of simulations.
        seed: Generator seed (already split-specific).
        clip: Force clipping, see :func:`forces`.
        field: External field strength, see :func:`forces`.

    Returns:
        Dict with ``loc``, ``vel`` (frame 30), ``charges`` and ``target``
        (positions at frame 40), all float64.
    """
    gen = torch.Generator().manual_seed(seed)
    loc0, vel0, charges = initial_state(n_sims, gen)
    locs, vels = simulate(loc0, vel0, charges, clip, field)
    return {
        "loc": locs[:, FRAME_IN].contiguous(),
        "vel": vels[:, FRAME_IN].contiguous(),
        "charges": charges,
        "target": locs[:, FRAME_OUT].contiguous(),
    }


def cache_dir() -> Path:
    """Returns the cache directory ($RECM_OPT_CACHE or ~/.cache/recm_opt)/nbody."""
    root = os.environ.get("RECM_OPT_CACHE", str(Path.home() / ".cache" / "recm_opt"))
    return Path(root).expanduser() / "nbody"


def _atomic_save(obj: dict[str, Tensor], path: Path) -> None:
    """Saves via a temporary file and rename so readers never see partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def variant_tag(clip: str = "component", field: float = 0.0) -> str:
    """The cache-name suffix of a physics variant (empty for the reference)."""
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    return ("" if clip == "component" else f"_{clip}clip") + (f"_field{field:g}" if field else "")


def load_split(split: str, n: int | None = None, seed: int = 0, clip: str = "component",
               field: float = 0.0) -> dict[str, Tensor]:
    """Loads (generating and caching on first use) one split.

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"`` (any name works; the name
            selects the seed stream).
        n: Number of simulations; defaults to the standard split size.
        seed: Base seed shared by all splits of one data set.
        clip: Force clipping, see :func:`forces`.
        field: External field strength, see :func:`forces`.

    Returns:
        Dict with ``loc`` (S,5,3), ``vel`` (S,5,3), ``charges`` (S,5,1) and
        ``target`` (S,5,3), float64.
    """
    n = SPLIT_SIZES[split] if n is None else n
    path = cache_dir() / f"{split}_{n}_{seed}{variant_tag(clip, field)}_v{CACHE_VERSION}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    data = generate_split(n, split_seed(split, seed), clip, field)
    _atomic_save(data, path)
    return data


def edges(n_nodes: int = N_BODIES) -> Tensor:
    """Fully connected edge index without self-loops.

    Args:
        n_nodes: Number of nodes.

    Returns:
        Long tensor (2, n*(n-1)) of (row=i, col=j) pairs, i != j, row-major.
    """
    idx = torch.arange(n_nodes)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    mask = rows != cols
    return torch.stack([rows[mask], cols[mask]])


def batch_graphs(
    loc: Tensor, vel: Tensor, charges: Tensor, target: Tensor | None = None, charge_feature: bool = False
) -> dict[str, Tensor]:
    """Flattens a batch of simulations into EGNN's flattened-node layout.

    Args:
        loc: Positions (B,N,3).
        vel: Velocities (B,N,3).
        charges: Charges (B,N,1).
        target: Optional target positions (B,N,3).
        charge_feature: Also give each node its charge, ``h = [||v||, q]``. In the
            reference only the products ``q_i q_j`` are seen, which fix the charges up
            to a global sign; an external field makes that sign observable.

    Returns:
        Dict with ``h`` (B*N,1) node features ``||v||`` (B*N,2 with the charge), ``x`` (B*N,3),
        ``v`` (B*N,3), ``edge_index`` (2,E) with per-graph node offsets,
        ``edge_attr`` (E,1) = q_i q_j, ``batch`` (B*N,) graph index and, if
        given, ``y`` (B*N,3).
    """
    b, n, _ = loc.shape
    base = edges(n).to(loc.device)
    offsets = (torch.arange(b, device=loc.device) * n).repeat_interleave(base.shape[1])
    edge_index = base.repeat(1, b) + offsets
    q = charges.reshape(b * n, 1)
    out = {
        "h": torch.cat([vel.norm(dim=-1, keepdim=True), charges], -1).reshape(b * n, 2) if charge_feature
        else vel.norm(dim=-1).reshape(b * n, 1),
        "x": loc.reshape(b * n, DIM),
        "v": vel.reshape(b * n, DIM),
        "edge_index": edge_index,
        "edge_attr": q[edge_index[0]] * q[edge_index[1]],
        "batch": torch.arange(b, device=loc.device).repeat_interleave(n),
    }
    if target is not None:
        out["y"] = target.reshape(b * n, DIM)
    return out


def fit_linear(train: dict[str, Tensor]) -> float:
    """Fits the scalar c of the model ``x + c v`` by closed-form least squares.

    Args:
        train: Split dict with ``loc``, ``vel``, ``target``.

    Returns:
        The least-squares scalar c.
    """
    v, r = train["vel"], train["target"] - train["loc"]
    return float((v * r).sum() / (v * v).sum())


def linear_test_mse(c: float, data: dict[str, Tensor]) -> float:
    """MSE (mean over all coordinates, as in EGNN) of ``x + c v``.

    Args:
        c: Scalar from :func:`fit_linear`.
        data: Split dict with ``loc``, ``vel``, ``target``.

    Returns:
        The mean squared error.
    """
    pred = data["loc"] + c * data["vel"]
    return float(((pred - data["target"]) ** 2).mean())


def main() -> None:
    """Generates (or loads) the standard splits and prints the linear anchor."""
    start = time.perf_counter()
    splits = {name: load_split(name) for name in SPLIT_SIZES}
    elapsed = time.perf_counter() - start
    c = fit_linear(splits["train"])
    mse = linear_test_mse(c, splits["test"])
    ok = 0.075 <= mse <= 0.095
    print(f"load/generate time: {elapsed:.1f} s (cache: {cache_dir()})")
    print(f"linear x + c*v: c = {c:.4f}, valid MSE = "
          f"{linear_test_mse(c, splits['valid']):.4f}, test MSE = {mse:.4f} "
          f"(published 0.0819; anchor [0.075, 0.095] {'OK' if ok else 'FAILED'})")


if __name__ == "__main__":
    main()
