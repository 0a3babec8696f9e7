"""The rotation spread of an N-body data variant's targets: an error floor for isotropic inputs only.

For a state s (frame 30) and Haar-random rotations R_1..R_K, re-simulate the
rotated states and rotate the results back: ``y_k = R_k^T F(R_k s)``. If the
dynamics F commute with rotations every y_k equals F(s). Otherwise an exactly
equivariant predictor f must output ``R^T f(R s) = f(s)`` for every R, so over the
orbit of s (every orientation equally likely) its expected squared error is at
least the rotation-variance of y, estimated without bias by the sample variance
over k. The spread is reported in the task's units (MSE per coordinate).

It is a floor only for inputs drawn isotropically. When the symmetry breaking has
already acted on the inputs (a field along z pushes every charge for 30 frames
before the input frame), their orientation carries the breaking direction and an
equivariant model can do better: EGNN beats the spread at field 1
(docs/results/nbody_study.md). The function keeps its historical name,
``equivariance_floor``, and its JSON key ``floor_mse``.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.nbody import data as nd
from recm_opt.groups import _haar_rotations


def equivariance_floor(n_sims: int = 500, n_rot: int = 8, clip: str = "component", field: float = 0.0,
                       seed: int = 0, changed_tol: float = 1e-6) -> dict[str, Any]:
    """Measures the rotation spread of one variant's targets on ``n_sims`` test states.

    Args:
        n_sims: Test trajectories used (the first of the test split).
        n_rot: Rotations per trajectory (K >= 2).
        clip: Force clipping of the variant.
        field: External field strength of the variant.
        seed: Data seed and rotation seed.
        changed_tol: A trajectory counts as changed by rotation when some y_k differs from
            the mean by more than this (max-abs over its coordinates).

    Returns:
        ``{"floor_mse", "frac_changed", "n_sims", "n_rot", "max_dev"}``.
    """
    if n_rot < 2:
        raise ValueError(f"equivariance_floor: n_rot must be >= 2, got {n_rot}")
    test = nd.load_split("test", n_sims, seed, clip, field)
    rots = _haar_rotations(n_sims * n_rot, torch.Generator().manual_seed(seed)).reshape(n_sims, n_rot, 1, 3, 3)
    rep = lambda t: t[:, None].expand(-1, n_rot, *t.shape[1:])  # noqa: E731
    rot = lambda r, u: (r @ u[..., None])[..., 0]  # noqa: E731  # u @ R^T per particle
    loc, vel, q = rep(test["loc"]), rep(test["vel"]), rep(test["charges"])
    out = nd.advance(rot(rots, loc).reshape(-1, nd.N_BODIES, 3), rot(rots, vel).reshape(-1, nd.N_BODIES, 3),
                     q.reshape(-1, nd.N_BODIES, 1), clip=clip, field=field)
    back = rot(rots.transpose(-1, -2), out.reshape(n_sims, n_rot, nd.N_BODIES, 3))  # (S,K,N,3)
    dev = back - back.mean(1, keepdim=True)
    var = (dev**2).sum(1) / (n_rot - 1)  # unbiased over rotations, (S,N,3)
    per_sim = dev.abs().amax(dim=(1, 2, 3))
    return {"floor_mse": float(var.mean()), "frac_changed": float((per_sim > changed_tol).double().mean()),
            "n_sims": n_sims, "n_rot": n_rot, "max_dev": float(per_sim.max())}
