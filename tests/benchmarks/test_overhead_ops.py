"""The aten-op counter of ``benchmarks.overhead.ops``: what RECM's step costs in kernel launches."""

from __future__ import annotations

import torch

from benchmarks.overhead import ops


def test_counter_sees_every_phase_and_sums_to_the_total() -> None:
    """The phases partition the step: their counts add up to the step's total, and each phase ran ops."""
    c = ops.count("c", 2, steps=1, warmup=2, batch=32)
    assert sum(c["phases"].values()) == c["total"] > 0
    for phase in ("forward", "backward", "observe", "step", "zero_grad"):
        assert phase in c["phases"]
    assert min(c["phases"][p] for p in ("forward", "backward", "observe", "step")) > 0


def test_fixed_coefficient_floor_is_linear_in_layers() -> None:
    """Variant b (no RECM) costs the same ops for every layer: its count is exactly affine in L."""
    n = [ops.count("b", depth, steps=1, warmup=1, batch=32)["total"] for depth in (1, 2, 3)]
    assert n[2] - n[1] == n[1] - n[0] > 0


def test_counter_counts_ops_not_calls() -> None:
    """One ``add`` and one ``mul`` are two ops; a view is counted and reported as a view."""
    x = torch.ones(3)
    with ops.OpCounter() as counter:
        counter.phase = "forward"
        (x + 1).mul(2).view(3, 1)
    assert counter.by_phase()["forward"] == 3
    assert counter.views["forward"] == 1


def test_recm_cost_per_layer_stays_flat() -> None:
    """RECM's extra ops per step grow by at most 25 per tagged layer, and pairing a target costs O(1).

    The 25 per layer are what having parameters costs (the inner optimizer's reads of each
    parameter's step counter, autograd's accumulation into each gradient) plus the gradient of
    each learned coefficient; everything else in the step is batched across layers (measured: 23).
    """
    def extra(depth: int) -> tuple[float, float]:
        b, c = ops.count("b", depth, steps=1, warmup=2, batch=32), ops.count("c", depth, steps=1, warmup=2, batch=32)
        return c["total"] - b["total"], c["phases"]["observe"]

    (low, observe_low), (high, observe_high) = extra(2), extra(6)
    assert (high - low) / 4 <= 25
    assert observe_low == observe_high
