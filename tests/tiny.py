"""A tiny deterministic relaxed model shared by the training-loop tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import recm_opt as recm


@recm.relaxed(inputs=recm.Vector("b c xyz"), terms={"weight": "un"})
class TinyVectorLinear(nn.Module):
    """Channel mixing (equivariant) plus a dense map on the flattened vectors; no noise term."""

    def __init__(self, c_in: int, c_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, generator=g) / math.sqrt(c_in))
        self.un = nn.Parameter(torch.randn(3 * c_out, 3 * c_in, generator=g) * 1e-2)

    def equivariant(self, z: Tensor) -> Tensor:
        return torch.einsum("oc,bcx->box", self.weight, z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return (z.flatten(1) @ self.un.T).reshape(z.shape[0], -1, 3)


class TinyNet(nn.Module):
    """Two tagged layers: ``(B, 4, 3) -> (B, 3)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.enc = TinyVectorLinear(4, 6, seed=1 + seed)
        self.dec = TinyVectorLinear(6, 1, seed=2 + seed)

    def forward(self, z: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(z)))[:, 0]


def batch(n: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, 4, 3)`` and targets with an offset no rotation can produce."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, generator=g)
    return x, x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0])


def train_steps(model: nn.Module, opt: recm.RECMOptimizer, steps: range) -> None:
    """One optimizer step per entry of ``steps`` on ``batch(16, seed=step)``."""
    for step in steps:
        x, y = batch(16, seed=step)
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()


def example(model: nn.Module, n: int = 1) -> Tensor:
    """A zero batch of model inputs ``(n, C, 3)`` for ``RECMOptimizer(example=...)``.

    The first tagged layer's channel count and the model's dtype give its shape.
    """
    first = next(m for m in model.modules() if recm.is_relaxed(m))
    return torch.zeros(n, first.weight.shape[1], 3, dtype=first.weight.dtype, device=first.weight.device)


def spawn_ranks(worker: Callable[..., None], world: int, out: Path, what: str, watchdog_s: float = 300) -> list[dict]:
    """Run ``worker(rank, init_file, out)`` on ``world`` spawned processes; return each rank's saved ``rank{r}.pt``.

    A watchdog kills the workers and fails the test after ``watchdog_s``: a worker stuck anywhere would
    otherwise hang the whole suite. ``join()`` re-raises a worker's error.
    """
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + watchdog_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} {what} workers did not finish within {watchdog_s} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
