"""DDP support for :class:`~recm_opt.optimizer.RECMOptimizer`, as functions: keep every rank's ``h`` identical.

Each rank captures its own shard of the batch, so ``l_theta`` is averaged over
the ranks that captured the layer (one collective for all layers), and the
modulation parameters' gradients are averaged over the ranks before the inner
step (a rank without a gradient contributes zeros). Without an initialised process
group of more than one rank, everything here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._layers import _Layer


def sync_grads(layers: list[_Layer]) -> None:
    """Average the modulation parameters' gradients over the ranks (a no-op without DDP)."""
    if not _distributed():
        return
    params = [p for layer in layers for p in layer.mod.parameters()]  # same list on every rank
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    grads: list[Tensor] = []
    for p, h in zip(params, has.tolist()):
        if h > 0:  # a rank without this gradient contributes zeros to the average
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(ls: list[Tensor | None]) -> list[Tensor | None]:
    """Average each layer's l over the ranks that captured it (one collective for all layers).

    Every rank passes one entry per layer it modulates, ``None`` where it captured nothing.
    """
    if not _distributed():
        return ls
    ref = next((l for l in ls if l is not None), None)
    m = max((l.numel() for l in ls if l is not None), default=0)
    device = _comm_device(ref)
    m = int(_all_reduce_max(m, device))
    buf = torch.zeros(len(ls), m + 1, dtype=torch.float64, device=device)
    for i, l in enumerate(ls):
        if l is not None:
            buf[i, : l.numel()], buf[i, m] = l.double(), 1.0
    dist.all_reduce(buf)
    dtype = ref.dtype if ref is not None else torch.float32
    return [None if buf[i, m] == 0 else (buf[i, :m] / buf[i, m]).to(dtype) for i in range(len(ls))]


def _comm_device(ref: Tensor | None) -> torch.device:
    """Device for collectives: NCCL needs CUDA tensors even on a rank that captured nothing."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return ref.device if ref is not None else torch.device("cpu")


def _all_reduce_max(x: int, device: torch.device | None = None) -> int:
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)

