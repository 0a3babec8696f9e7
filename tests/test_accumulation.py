"""Gradient accumulation: k micro-batches give the step of their union.

What is averaged, and how (see ``recm_opt.optimizer``'s module docstring): every
training forward between two steps is captured; at ``step()`` each layer's
``l_theta`` is the unit-weighted mean over all captures, i.e. the ``l_theta`` of
the union of the micro-batches, and ``h``'s newest term (the gradient path into
``r_theta``) is built from the same union. With each micro-batch's loss weighted
by its share of the units, parameters and ``h`` therefore match one big batch up
to float rounding (exactly the same sums, added in a different order).
"""

from __future__ import annotations

import pytest
import torch
from tiny import TinyNet, example
from torch import Tensor

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

# Same arithmetic in a different summation order: a few ulps per reduction, grown over
# a handful of steps. 1e3 ulps leaves ample room and still catches a wrong weighting
# (which shows up at the 1e-2 relative level).
TOL = {torch.float32: 1e3 * torch.finfo(torch.float32).eps, torch.float64: 1e3 * torch.finfo(torch.float64).eps}


def _run(sizes: list[int], steps: int, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Train with each step's batch split into micro-batches of ``sizes``; return params and h."""
    model = TinyNet().to(dtype)
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                        target=recm.Vector("b xyz"), a=0.1, example=example(model))
    total = sum(sizes)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(total, 4, 3, generator=g, dtype=dtype)
        y = x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0], dtype=dtype)
        for xb, yb in zip(x.split(sizes), y.split(sizes)):
            # sum of per-sample losses / total: micro-batch losses add up to the big batch's mean
            loss = (model(xb) - yb).pow(2).sum() / total
            loss.backward()
            opt.observe(yb)
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    return params, [model.enc.recm_modulation.h.clone(), model.dec.recm_modulation.h.clone()]


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [5, 11, 16]], ids=["equal", "unequal"])
def test_micro_batches_match_one_big_batch(sizes: list[int], dtype: torch.dtype) -> None:
    """k micro-batches (unit-weighted) give the parameters and h of one batch of their union."""
    params, hs = _run(sizes, steps=4, dtype=dtype)
    ref_params, ref_hs = _run([sum(sizes)], steps=4, dtype=dtype)
    assert all(bool(h.abs().max() > 0) for h in ref_hs), "h never moved: the test would be vacuous"
    tol = TOL[dtype]
    for a, b in zip(params + hs, ref_params + ref_hs):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)

