"""Host/device helpers: small copies without a sync, and one host sync for a batch of flags.

``step()`` and ``observe()`` decide per layer whether a sample or an update is
finite; these helpers keep those decisions on the device and bring them to the
host together, so that the number of host syncs does not grow with the layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned and non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _nonfinite_probes(samples: list[Tensor]) -> list[Tensor]:
    """One 0-d tensor per sample that is NaN/Inf exactly when the sample has a NaN/Inf entry.

    On CUDA, one multi-tensor kernel (the largest ``|value|``). On CPU that kernel is slow,
    and ``sum(0 * x)`` is exact and fast: ``0 * finite = 0``, ``0 * inf = NaN``.
    """
    if samples[0].device.type == "cuda":
        return list(torch._foreach_norm(samples, ord=math.inf))
    return [s.mul(0).sum() for s in samples]


def _finite_rows(x: Tensor) -> Tensor:
    """``(n,)``: whether each row ``x[i]`` is free of NaN/Inf, in a fixed number of kernels for any ``n``."""
    return x.reshape(x.shape[0], -1).mul(0).sum(1) == 0  # 0 * finite = 0 exactly; 0 * inf, 0 * nan are NaN


def _isfinite_each(xs: list[Tensor]) -> Tensor:
    """``isfinite`` of 0-d tensors as one bool vector (stacked per dtype, so nothing is rounded)."""
    if all(x.dtype == xs[0].dtype and x.device == xs[0].device for x in xs):
        return torch.isfinite(torch.stack(xs))
    return torch.stack([torch.isfinite(x).to(xs[0].device) for x in xs])


def _host_flags(pieces: list[Tensor]) -> list[bool]:
    """Bring bool tensors to the host as one list: a single sync when they share a device."""
    if not pieces:
        return []
    if all(p.device == pieces[0].device for p in pieces):
        return torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in pieces]).tolist()
    return [bool(b) for p in pieces for b in p.reshape(-1).tolist()]


