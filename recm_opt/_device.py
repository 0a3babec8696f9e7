"""Host/device helpers: small copies without a sync, and one host sync for a batch of flags.

``step()`` decides per sample and per layer whether a sample or an update is finite;
these helpers keep those decisions on the device and bring them to the host together,
so that the number of host syncs does not grow with the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned and non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _finite_rows(x: Tensor) -> Tensor:
    """``(n,)``: whether each row ``x[i]`` is free of NaN/Inf, in a fixed number of kernels for any ``n``."""
    return x.reshape(x.shape[0], -1).mul(0).sum(1) == 0  # 0 * finite = 0 exactly; 0 * inf, 0 * nan are NaN


def _host_flags(pieces: list[Tensor]) -> list[bool]:
    """Bring bool tensors to the host as one list: a single sync when they share a device."""
    if not pieces:
        return []
    if all(p.device == pieces[0].device for p in pieces):
        return torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in pieces]).tolist()
    return [bool(b) for p in pieces for b in p.reshape(-1).tolist()]


