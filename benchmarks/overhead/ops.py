"""Aten ops per training step, by phase: RECM's cost on a GPU, counted on any machine.

A GPU launches about one kernel per aten op, and each launch costs a few microseconds
whatever the op does, so the number of aten ops that RECM adds to a training step is
what it costs there. A ``TorchDispatchMode`` counts every op that reaches the
dispatcher (views and other aliasing ops are counted too, and reported apart) while
one training step runs, split into phases:

- ``forward``: the model and the loss;
- ``backward``: ``loss.backward()``;
- ``observe``: ``opt.observe(y)`` (RECM only: pairing the captures with the target);
- ``step``: ``opt.step()``;
- ``zero_grad``: ``opt.zero_grad()``.

The model is a residual stack of L ``RelaxedVectorLinear`` layers (width 16,
batch 256) with AdamW (foreach):

- ``b``: every branch live with fixed ``alpha = 0.5`` and ``beta = 1``, no RECM
  machinery (the floor for a relaxed model whose branches are all live);
- ``c``: the same model with ``RECMOptimizer(AdamW)``.

``c - b`` is RECM's extra ops per step; its slope in L is the per-layer cost.

Usage::

    python -m benchmarks.overhead.ops                 # L in 1, 4, 16, 64 -> docs/results/overhead_ops.json
    python -m benchmarks.overhead.ops --layers 1 4 --json /tmp/ops.json
    python -m benchmarks.overhead.ops --accumulate 2 --json docs/results/overhead_ops_accumulate2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import recm_opt as recm
from benchmarks.models.relaxed_vn import fix_coefficients
from benchmarks.overhead.models import RelaxedVectorLinear, make_task
from benchmarks.overhead.run import VectorStack
from benchmarks.progress import expected

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("forward", "backward", "observe", "step", "zero_grad")
LAYERS = (1, 4, 16, 64)


class OpCounter(TorchDispatchMode):
    """Count aten ops by phase (``counter.phase = name`` before each phase) and by op name."""

    def __init__(self, host: set[int] | None = None) -> None:
        super().__init__()
        self.phase = "other"
        self.ops: Counter[tuple[str, str]] = Counter()
        self.views: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.host = host or set()  # ids of tensors that stay on the host in a GPU run (optimizer step counters)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[(self.phase, func._overloadpacket.__name__)] += 1
        if any(r.alias_info is not None for r in func._schema.returns):
            self.views[self.phase] += 1
        elif func._overloadpacket.__name__ == "_local_scalar_dense" and args and id(args[0]) in self.host:
            self.host_reads[self.phase] += 1
        return func(*args, **(kwargs or {}))

    def by_phase(self) -> dict[str, int]:
        """Ops per phase."""
        out = dict.fromkeys(PHASES, 0)
        for (phase, _), n in self.ops.items():
            out[phase] = out.get(phase, 0) + n
        return out


def build(variant: str, depth: int, width: int = 16, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Variant ``b`` or ``c`` of the residual stack of ``depth`` tagged layers, and its optimizer."""
    torch.manual_seed(seed)
    model = VectorStack(depth, width, RelaxedVectorLinear)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    if variant == "b":
        fix_coefficients(model, alpha=0.5, beta=1.0)
        return model, inner
    if variant == "c":
        return model, recm.RECMOptimizer(inner, model, target=recm.Vector("b xyz"),
                                         example=torch.zeros(1, width, 3))
    raise ValueError(f"variant must be 'b' or 'c', got {variant!r}")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
               counter: OpCounter | None = None, accumulate: int = 1) -> None:
    """One training step: forward, backward, observe (RECM) per micro-batch, then step, zero_grad.

    Phases are labelled on ``counter``; ``accumulate`` splits the batch into that many micro-batches.
    """

    def phase(name: str) -> None:
        if counter is not None:
            counter.phase = name

    for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):  # micro-batches: gradient accumulation
        phase("forward")
        loss = nn.functional.mse_loss(model(xs), ys) / accumulate
        phase("backward")
        loss.backward()
        if isinstance(opt, recm.RECMOptimizer):
            phase("observe")
            opt.observe(ys)
    phase("step")
    opt.step()
    phase("zero_grad")
    opt.zero_grad()
    phase("other")


def count(variant: str, depth: int, steps: int = 3, warmup: int = 3, batch: int = 256,
          width: int = 16, accumulate: int = 1) -> dict[str, Any]:
    """Aten ops per step of one variant, after ``warmup`` steps, averaged over ``steps`` (they agree)."""
    model, opt = build(variant, depth, width)
    x, y = make_task(batch * (warmup + steps), 0.0, c_in=width, seed=0)
    for i in range(warmup):
        train_step(model, opt, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch], accumulate=accumulate)
    per_step = []
    totals: Counter[tuple[str, str]] = Counter()
    views: Counter[str] = Counter()
    host: Counter[str] = Counter()
    # torch keeps a non-capturable, non-fused optimizer's step counters on the CPU, also for CUDA
    # parameters: reading them (bias corrections) is host work, not a kernel launch
    steps_ids = {id(st["step"]) for st in opt.state.values() if isinstance(st.get("step"), Tensor)}
    for i in range(warmup, warmup + steps):
        with OpCounter(steps_ids) as counter:
            train_step(model, opt, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch], counter, accumulate)
        per_step.append(sum(counter.ops.values()))
        totals.update(counter.ops)
        views.update(counter.views)
        host.update(counter.host_reads)
    phases = dict.fromkeys(PHASES, 0.0)
    for (ph, _), n in totals.items():
        phases[ph] = phases.get(ph, 0.0) + n / steps
    top = sorted(((f"{ph}:{op}", n / steps) for (ph, op), n in totals.items()), key=lambda kv: -kv[1])[:25]
    total, n_views, n_host = sum(per_step) / steps, sum(views.values()) / steps, sum(host.values()) / steps
    return {"total": total, "per_step": per_step, "phases": phases,
            "views": {ph: n / steps for ph, n in views.items()},
            "host_reads": {ph: n / steps for ph, n in host.items()},
            "kernels": total - n_views - n_host, "top_ops": dict(top)}


def measure(layers: tuple[int, ...] = LAYERS, steps: int = 3, accumulate: int = 1) -> dict[str, Any]:
    """b and c for every depth; ``c - b`` in total and by phase, and its slope per layer."""
    rows = []
    for depth in layers:
        b, c = count("b", depth, steps, accumulate=accumulate), count("c", depth, steps, accumulate=accumulate)
        rows.append({
            "layers": depth, "b": b, "c": c, "c_minus_b": c["total"] - b["total"],
            "c_minus_b_per_layer": (c["total"] - b["total"]) / depth,
            "c_minus_b_by_phase": {ph: c["phases"].get(ph, 0.0) - b["phases"].get(ph, 0.0) for ph in PHASES},
            "c_minus_b_kernels": c["kernels"] - b["kernels"],
            "target": 200 + 25 * depth,
        })
    out: dict[str, Any] = {"rows": rows}
    if len(rows) >= 2:  # least-squares slope of c - b (all ops, and kernels only) against L
        xs = [r["layers"] for r in rows]
        for key, name in (("c_minus_b", ""), ("c_minus_b_kernels", "kernels_")):
            ys = [r[key] for r in rows]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            out[f"{name}slope_per_layer"] = slope
            out[f"{name}intercept"] = my - slope * mx
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: b and c ops per step, c - b, per layer, and c - b by phase."""
    lines = ["| L | b ops | c ops | c - b | (c - b) / L | target 200 + 25 L | c - b kernels | forward | backward | "
             "observe | step | zero_grad |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ph = r["c_minus_b_by_phase"]
        lines.append(f"| {r['layers']} | {r['b']['total']:.0f} | {r['c']['total']:.0f} | {r['c_minus_b']:.0f} | "
                     f"{r['c_minus_b_per_layer']:.0f} | {r['target']} | {r['c_minus_b_kernels']:.0f} | "
                     + " | ".join(f"{ph[p]:+.0f}" for p in PHASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=expected("about 15 s on one core (12 s measured for L in 1, 4, 16, 64)"))
    p.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (observe after each)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "overhead_ops.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    result = measure(tuple(args.layers), args.steps, args.accumulate)
    result["accumulate"] = args.accumulate
    result.update({
        "command": "python -m benchmarks.overhead.ops " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "residual stack of L RelaxedVectorLinear (width 16), batch 256, AdamW(foreach=True)",
        "variants": {"b": "every branch live, fixed alpha = 0.5, beta = 1", "c": "RECMOptimizer(AdamW)"},
        "counted": "every aten op reaching the dispatcher during forward, backward, observe, step, zero_grad; "
                   "kernels = ops - views - reads of the inner optimizer's CPU step counters",
        "machine": f"{platform.machine()} CPU (op counts do not depend on the machine)",
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
    })
    print(table(result))
    if "slope_per_layer" in result:
        kernels = f"{result['kernels_intercept']:.0f} + {result['kernels_slope_per_layer']:.1f} L"
        print(f"c - b ~ {result['intercept']:.0f} + {result['slope_per_layer']:.1f} L ops; kernels (no views, no "
              f"host step-counter reads) ~ {kernels}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
