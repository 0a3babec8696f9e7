"""RECM's training-time and memory overhead against the equivariant baseline.

Each model trains in four variants, built in one process and timed with interleaved
repeats (the order rotates every round, so drift in the machine's load hits every
variant alike):

- ``a``: the equivariant-only model with the inner optimizer (Adam) alone;
- ``b``: the relaxed model with fixed alpha/beta, every branch live, no RECM machinery
  (the floor for RECM with every branch live);
- ``c``: the relaxed model with ``RECMOptimizer`` (every branch live in training);
- ``d``: ``RECMOptimizer(skip_pruned=True)`` on a symmetric task, where every alpha is
  pruned (checked after the warm-up and reported as ``d_live_terms``).

A fifth variant, ``b_grad`` (b whose fixed alpha/beta require grad, never updated), is
timed alongside and reported under ``details``: c/b = (b_grad/b) (c/b_grad) splits RECM's
cost into learning the coefficients by gradient (autograd keeps every branch output and
reduces it against the output gradient) and the rest of the machinery.

Per model: the median step time of each variant (seconds), the ratios b/a, c/a, c/b
and d/a, the peak memory of one training step of c against b, and ``run_over_a``: a
whole training run on the symmetric task with RECM (pruned branches skipped) against
the equivariant baseline, same epochs, epochs interleaved across variants. The final
test metric of that run is given with and without skipping pruned branches.

Models: a VN-PointNet-like classifier (300 points, batch 24, 4 tagged layers) on
randomly rotated procedural point clouds, an EGNN on charged 5-body graphs (batch 100,
8 tagged layers) and a stack of tagged vector layers (batch 256), swept over 1, 4, 16
and 64 layers.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.overhead.run --quick --json /tmp/overhead_quick.json
    OMP_NUM_THREADS=2 python -m benchmarks.overhead.run --threads 2 --json docs/results/overhead_cpu.json
    python -m benchmarks.overhead.run --device cuda --quick --json overhead_gpu.json
    python -m benchmarks.overhead.run --ops        # aten ops per step by phase -> docs/results/overhead_ops.json

``--quick`` finishes in under 3 minutes on 2 CPU cores (about 2 minutes); the full
mode (about 10 minutes on one core of a loaded 2-core machine) is what
``docs/benchmarks.md`` reports. ``--profile`` adds a per-phase profile of b and c.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.benchmark import Timer

import recm_opt as recm
from benchmarks.models.relaxed_vn import fix_coefficients, relaxed_vn_pointnet, vn_pointnet
from benchmarks.overhead.models import RelaxedVectorLinear, VectorGate, make_task
from benchmarks.pointcloud import data as pointcloud_data
from benchmarks.progress import announce, expected, progress

VARIANTS = ("a", "b", "c", "d")
Batch = tuple[tuple[Tensor, ...], Tensor]


# ------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One model and its symmetric task: how to build, feed, score and wrap it."""

    name: str
    equivariant: Callable[[], nn.Module]
    relaxed: Callable[[], nn.Module]
    target: recm.Representation
    loss: Callable[[Tensor, Tensor], Tensor]
    train: Callable[[torch.Generator], Iterator[Batch]]  # one shuffled epoch
    metric: Callable[[nn.Module], float]  # on the test split, model in eval mode
    metric_name: str
    lr: float = 1e-3
    timing: list[Batch] = field(default_factory=list)  # fixed batches for step timing


def _epochs(n: int, batch: int, gen: torch.Generator, make: Callable[[Tensor], Batch]) -> Iterator[Batch]:
    for idx in torch.randperm(n, generator=gen).split(batch):
        if len(idx) == batch:
            yield make(idx)


def vn_task(device: torch.device, n_train: int, n_test: int) -> Task:
    """VN-PointNet-like classifier on randomly rotated clouds (a rotation-symmetric task)."""
    classes = len(pointcloud_data.CLASS_NAMES)
    train = [t.to(device) for t in pointcloud_data.generate_split("train", "rotated", n_train // classes)]
    test = [t.to(device) for t in pointcloud_data.generate_split("test", "rotated", max(1, n_test // classes))]

    def make(idx: Tensor) -> Batch:
        idx = idx.to(device)
        return (train[0][idx],), train[1][idx]

    @torch.no_grad()
    def accuracy(model: nn.Module) -> float:
        model.eval()
        pred = torch.cat([model(p).argmax(1) for p in test[0].split(64)])
        model.train()
        return float((pred == test[1]).double().mean())

    task = Task("vn_pointnet", lambda: vn_pointnet(classes), lambda: relaxed_vn_pointnet(classes),
                recm.Invariant("b"), nn.functional.cross_entropy,
                lambda g: _epochs(len(train[1]), 24, g, make), accuracy, "test_accuracy")
    task.timing = [make(torch.arange(i * 24, (i + 1) * 24) % len(train[1])) for i in range(3)]
    return task


def egnn_task(device: torch.device, n_train: int, n_test: int) -> Task:
    """EGNN on charged 5-body (rotation-symmetric physics), batch 100 graphs."""
    from benchmarks.overhead.models import egnn_modules

    egnn, nbody_data = egnn_modules()
    train = {k: v.to(device) for k, v in nbody_data.generate_split(n_train, nbody_data.split_seed("train", 0)).items()}
    test = {k: v.to(device) for k, v in nbody_data.generate_split(n_test, nbody_data.split_seed("test", 0)).items()}

    def graphs(data: dict[str, Tensor], idx: Tensor) -> Batch:
        g = nbody_data.batch_graphs(*(data[k][idx].float() for k in ("loc", "vel", "charges", "target")))
        return (g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"]), g["y"]

    @torch.no_grad()
    def mse(model: nn.Module) -> float:
        model.eval()
        inputs, y = graphs(test, torch.arange(n_test, device=device))
        out = float(nn.functional.mse_loss(model(*inputs), y))
        model.train()
        return out

    task = Task("egnn", lambda: egnn.EGNN(relaxed=False), lambda: egnn.EGNN(relaxed=True), recm.Vector("n xyz"),
                nn.functional.mse_loss, lambda g: _epochs(n_train, 100, g, lambda i: graphs(train, i.to(device))),
                mse, "test_mse", lr=5e-4)
    task.timing = [graphs(train, torch.arange(i * 100, (i + 1) * 100, device=device) % n_train) for i in range(3)]
    return task


class VectorLinear(nn.Module):
    """The equivariant part of :class:`RelaxedVectorLinear` alone: channel mixing."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / math.sqrt(c_in))

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        return torch.einsum("oc,bcx->box", self.weight, z)


class VectorStack(nn.Module):
    """``depth`` vector layers of width ``c`` with gates; predicts a 3-vector per sample."""

    def __init__(self, depth: int, c: int, layer: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer(c, c) for _ in range(depth))
        self.gate = VectorGate()

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        # Residual, so that 64 gates do not shrink the features into denormal floats (slow on CPU).
        for layer in self.layers:
            z = z + self.gate(layer(z)) / math.sqrt(len(self.layers))
        return z.mean(1)


def stack_task(device: torch.device, depth: int, n_train: int, n_test: int, c: int = 16) -> Task:
    """A deep stack of tagged vector layers on the exactly SO(3)-symmetric vector regression."""
    x, y = (t.to(device) for t in make_task(n_train, 0.0, c_in=c, seed=0))
    xt, yt = (t.to(device) for t in make_task(n_test, 0.0, c_in=c, seed=1))

    def make(idx: Tensor) -> Batch:
        idx = idx.to(device)
        return (x[idx],), y[idx]

    @torch.no_grad()
    def mse(model: nn.Module) -> float:
        model.eval()
        out = float(nn.functional.mse_loss(model(xt), yt))
        model.train()
        return out

    task = Task(f"vector_stack_{depth}", lambda: VectorStack(depth, c, VectorLinear),
                lambda: VectorStack(depth, c, RelaxedVectorLinear), recm.Vector("b xyz"), nn.functional.mse_loss,
                lambda g: _epochs(n_train, 256, g, make), mse, "test_mse")
    task.timing = [make(torch.arange(i * 256, (i + 1) * 256) % n_train) for i in range(3)]
    return task


# ----------------------------------------------------------------- variants
class Runner:
    """One variant of one task: its model, optimizer and a training step."""

    def __init__(self, task: Task, variant: str, device: torch.device, seed: int = 0,
                 skip_pruned: bool | None = None) -> None:
        torch.manual_seed(seed)  # every variant starts from the same equivariant weights
        self.task, self.variant = task, variant
        self.model = (task.equivariant() if variant == "a" else task.relaxed()).to(device)
        if variant in ("b", "b_grad"):  # b_grad: b whose fixed coefficients require grad
            fix_coefficients(self.model, alpha=0.5, beta=1.0, requires_grad=variant == "b_grad")
        self.inner = torch.optim.Adam(self.model.parameters(), lr=task.lr)
        self.recm: recm.RECMOptimizer | None = None
        if variant in ("c", "d"):
            skip = variant == "d" if skip_pruned is None else skip_pruned
            self.recm = recm.RECMOptimizer(self.inner, self.model, recm.SO3Generators(), target=task.target,
                                           skip_pruned=skip, example=task.timing[0][0])
        self._next = 0

    def step(self, batch: Batch) -> None:
        """One training step: forward, loss, backward, optimizer step, zero_grad."""
        inputs, y = batch
        self.task.loss(self.model(*inputs), y).backward()
        if self.recm is not None:
            self.recm.step(target=y)
            self.recm.zero_grad()
        else:
            self.inner.step()
            self.inner.zero_grad()

    def timed_step(self) -> None:
        """A step on the next of the task's fixed timing batches."""
        self.step(self.task.timing[self._next % len(self.task.timing)])
        self._next += 1

    def live_terms(self) -> int:
        """How many unconstrained terms are live (not pruned) across the tagged layers."""
        if self.recm is None:
            return 0
        return sum(len(row["kept"]) for row in self.recm.report())

    def recm_bytes(self) -> int:
        """Bytes of RECM's own state: modulation parameters, their optimizer state, h and the stored samples."""
        mods = [m for m in self.model.modules() if isinstance(m, recm.modulation.Modulation)]
        tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
        tensors += [t for m in mods for p in m.parameters() for t in self.inner.state.get(p, {}).values()
                    if isinstance(t, Tensor)]
        tensors += [m.newest for m in mods if m.newest is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def resident_bytes(self) -> int:
        """Bytes held between steps: parameters, buffers, optimizer state and RECM's stored samples."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for s in self.inner.state.values() for t in s.values() if isinstance(t, Tensor)]
        tensors += [m.newest for m in self.model.modules() if isinstance(getattr(m, "newest", None), Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                    if not isinstance(t, nn.parameter.UninitializedParameter)}
        return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


# ----------------------------------------------------------------- measures
def time_steps(runners: dict[str, Runner], steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each runner, one value per repeat; the variant order rotates every repeat."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.timed_step()
    names, out = list(runners), {name: [] for name in runners}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            timer = Timer(stmt="step()", globals={"step": runners[name].timed_step})
            out[name].append(timer.timeit(steps).mean)
    return out


class _PeakTracker(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while active (CPU has no allocator statistics).

    An output counts as a new allocation when the op's schema says it aliases no input;
    a storage counts as freed once its weak reference expires.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = all(r.alias_info is None for r in func._schema.returns)
        self._collect()
        if fresh:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    if st.data_ptr() not in self.live and st.nbytes():
                        self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
                        self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        return out

    def _collect(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]


def step_peak_bytes(runner: Runner, device: torch.device) -> int:
    """Peak memory of one training step: resident state plus the step's transient peak."""
    gc.collect()
    resident = runner.resident_bytes()
    batch = runner.task.timing[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(batch)
        torch.cuda.synchronize()
        return resident + torch.cuda.max_memory_allocated() - base
    if device.type != "cpu":
        raise ValueError(f"memory is measured on cpu and cuda only, got {device}")
    with _PeakTracker() as tracker:
        runner.step(batch)
    return resident + tracker.peak


def whole_run(task: Task, device: torch.device, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train a (equivariant), c with skip_pruned and c without, epochs interleaved; time and final metric."""
    runners = {"a": Runner(task, "a", device, seed), "c_skip": Runner(task, "c", device, seed, skip_pruned=True),
               "c_all": Runner(task, "c", device, seed, skip_pruned=False)}
    gens = {name: torch.Generator().manual_seed(seed) for name in runners}  # same batches for every variant
    seconds = {name: 0.0 for name in runners}
    for epoch in range(epochs):
        names = list(runners)
        for name in names[epoch % 3:] + names[: epoch % 3]:
            batches = list(task.train(gens[name]))  # built before the clock starts
            _sync(device)
            start = time.perf_counter()
            for batch in batches:
                runners[name].step(batch)
            _sync(device)
            seconds[name] += time.perf_counter() - start
    metrics = {name: task.metric(r.model) for name, r in runners.items()}
    return {
        "epochs": epochs, "seconds": seconds, "metric": task.metric_name, "final": metrics,
        "live_terms": {name: r.live_terms() for name, r in runners.items()},
        "run_over_a": seconds["c_skip"] / seconds["a"], "run_all_live_over_a": seconds["c_all"] / seconds["a"],
    }


PHASES = ("forward", "backward", "observe", "step")


def _phased_step(runner: Runner, batch: Batch) -> None:
    """One training step with each phase under a profiler label."""
    from torch.profiler import record_function

    inputs, y = batch
    with record_function("forward"):
        loss = runner.task.loss(runner.model(*inputs), y)
    with record_function("backward"):
        loss.backward()
    opt = runner.recm if runner.recm is not None else runner.inner
    if runner.recm is not None:
        with record_function("observe"):
            runner.recm.observe(y)
    with record_function("step"):
        opt.step()
    opt.zero_grad()


def profile_phases(task: Task, device: torch.device, steps: int = 5) -> dict[str, dict[str, dict[str, float]]]:
    """Per-phase host time (ms per step), aten ops and device kernels per step, for b and c."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, dict[str, dict[str, float]]] = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for variant in ("b", "c"):
        runner = Runner(task, variant, device)
        for i in range(3):
            runner.step(task.timing[i % len(task.timing)])
        _sync(device)
        with profile(activities=activities) as prof:
            for i in range(steps):
                _phased_step(runner, task.timing[i % len(task.timing)])
            _sync(device)
        events = prof.events()
        phases = {}
        for name in PHASES:
            spans = [e for e in events if e.name == name]
            if not spans:
                continue
            inside = [e for e in events if e.name.startswith("aten::") and any(
                s.time_range.start <= e.time_range.start and e.time_range.end <= s.time_range.end for s in spans)
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
            phases[name] = {"host_ms": sum(s.cpu_time_total for s in spans) / steps / 1e3,
                            "aten_ops": len(inside) / steps}
        kernels = [e for e in events if getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA") and not e.name.startswith(("Memcpy", "Memset"))]
        phases["total"] = {"device_kernels": len(kernels) / steps}
        out[variant] = phases
    return out


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def measure(task: Task, device: torch.device, cfg: dict[str, int], run_epochs: int) -> tuple[dict, dict]:
    """The JSON entry for one model, and the details (spreads, paired ratios, memory, run)."""
    # b_grad (details only): b whose fixed coefficients require grad, to split c/b into the cost of
    # learning alpha/beta by gradient (autograd keeps and reduces every branch output) and the rest.
    runners = {v: Runner(task, v, device) for v in (*VARIANTS, "b_grad")}
    times = time_steps(runners, cfg["steps"], cfg["repeats"], cfg["warmup"])
    med = {v: statistics.median(ts) for v, ts in times.items()}
    mem = {v: step_peak_bytes(runners[v], device) for v in ("b", "b_grad", "c")}
    run = whole_run(task, device, run_epochs) if run_epochs else None
    entry = {f"{v}_s": med[v] for v in VARIANTS}
    entry.update({f"{x}_over_{y}": med[x] / med[y] for x, y in (("b", "a"), ("c", "a"), ("c", "b"), ("d", "a"))})
    entry["run_over_a"] = run["run_over_a"] if run else None
    entry["mem_c_over_b"] = mem["c"] / mem["b"]
    paired = {f"{x}_over_{y}": _quartiles([p / q for p, q in zip(times[x], times[y])])
              for x, y in (("b", "a"), ("c", "a"), ("c", "b"), ("d", "a"), ("b_grad", "b"), ("c", "b_grad"))}
    details = {
        "b_grad_s": med["b_grad"],
        "c_over_b_grad": med["c"] / med["b_grad"],
        "step_s_quartiles": {v: _quartiles(ts) for v, ts in times.items()},
        "step_s_iqr": {v: _quartiles(ts)[2] - _quartiles(ts)[0] for v, ts in times.items()},
        "paired_ratio_quartiles": paired,
        "tagged_layers": len(runners["c"].recm.layers) if runners["c"].recm else 0,
        "d_live_terms": runners["d"].live_terms(),
        "peak_bytes": mem,
        "recm_state_bytes": runners["c"].recm_bytes(),
        "run": run,
    }
    return entry, details


# -------------------------------------------------------------------- main
def _config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"vn": {"steps": 2, "repeats": 3, "warmup": 2}, "egnn": {"steps": 5, "repeats": 5, "warmup": 3},
                "stack": {"steps": 4, "repeats": 5, "warmup": 2},
                "sweep_timing": {"steps": 2, "repeats": 3, "warmup": 2}, "vn_data": (96, 48), "egnn_data": (500, 200),
                "stack_data": (1024, 512), "vn_epochs": 1, "egnn_epochs": 2, "stack_epochs": 2, "sweep": (1, 4, 16, 64)}
    return {"vn": {"steps": 4, "repeats": 9, "warmup": 3}, "egnn": {"steps": 20, "repeats": 11, "warmup": 5},
            "stack": {"steps": 10, "repeats": 11, "warmup": 3},
            "sweep_timing": {"steps": 10, "repeats": 11, "warmup": 3}, "vn_data": (480, 240), "egnn_data": (1000, 500),
            "stack_data": (4096, 1024), "vn_epochs": 4, "egnn_epochs": 10, "stack_epochs": 10, "sweep": (1, 4, 16, 64)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _row(name: str, e: dict[str, Any]) -> str:
    run = "-" if e["run_over_a"] is None else f"{e['run_over_a']:.3f}"
    return (f"| {name} | {e['a_s'] * 1e3:.2f} | {e['b_s'] * 1e3:.2f} | {e['c_s'] * 1e3:.2f} | {e['d_s'] * 1e3:.2f} | "
            f"{e['b_over_a']:.3f} | {e['c_over_a']:.3f} | {e['c_over_b']:.3f} | {e['d_over_a']:.3f} | {run} | "
            f"{e['mem_c_over_b']:.3f} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a markdown table and optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=expected(
        "about 10 min on 2 CPU cores (585 s), under 3 min with --quick (121 s), 151 s with --quick --profile"))
    parser.add_argument("--quick", action="store_true", help="small repeats and data: < 3 min on 2 CPU cores")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--models", nargs="*", default=["vn_pointnet", "egnn", "vector_stack", "sweep"],
                        help="subset of vn_pointnet egnn vector_stack sweep")
    parser.add_argument("--profile", action="store_true",
                        help="also profile b and c of each model by phase (host ms, aten ops, device kernels)")
    parser.add_argument("--ops", action="store_true",
                        help="count aten ops per step by phase instead (benchmarks.overhead.ops; writes "
                             "docs/results/overhead_ops.json unless --json is given)")
    args = parser.parse_args(argv)
    if args.ops:
        from benchmarks.overhead import ops

        return ops.main(["--json", str(args.json)] if args.json else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = _config(args.quick)
    announce("under 3 min (121 s measured)" if args.quick else "about 10 min (585 s measured)")
    started = time.perf_counter()
    print(f"device: {_device_name(device)}, torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {"device": _device_name(device), "models": {}, "layers_sweep": {}}
    details: dict[str, Any] = {}
    builders: dict[str, Callable[[], tuple[Task, dict, int]]] = {
        "vn_pointnet": lambda: (vn_task(device, *cfg["vn_data"]), cfg["vn"], cfg["vn_epochs"]),
        "egnn": lambda: (egnn_task(device, *cfg["egnn_data"]), cfg["egnn"], cfg["egnn_epochs"]),
        "vector_stack": lambda: (stack_task(device, 16, *cfg["stack_data"]), cfg["stack"], cfg["stack_epochs"]),
    }
    for name in progress([m for m in args.models if m in builders], desc="models", unit="model"):
        task, timing, epochs = builders[name]()
        results["models"][name], details[name] = measure(task, device, timing, epochs)
        if args.profile:
            details[name]["profile"] = prof = profile_phases(task, device)
            print(f"{name} profile: {json.dumps(prof)}", flush=True)
        print(f"{name}: {json.dumps(results['models'][name])} ({time.perf_counter() - started:.0f} s)", flush=True)
    if "sweep" in args.models:
        sweep: dict[str, Any] = {"layers": list(cfg["sweep"])}
        for depth in progress(cfg["sweep"], desc="layer sweep", unit="depth"):
            if depth == 16 and "vector_stack" in results["models"]:  # the same set-up: reuse its timing
                entry, det = results["models"]["vector_stack"], details["vector_stack"]
            else:
                entry, det = measure(stack_task(device, depth, *cfg["stack_data"]), device, cfg["sweep_timing"], 0)
            for k, v in entry.items():
                sweep.setdefault(k, []).append(v)
            sweep.setdefault("machinery_s_per_layer", []).append((entry["c_s"] - entry["b_s"]) / depth)
            details[f"sweep_{depth}"] = det
            print(f"sweep {depth}: c/b {entry['c_over_b']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        results["layers_sweep"] = sweep
    results["details"] = details
    results["command"] = " ".join(sys.argv)
    results["torch"] = torch.__version__
    results["threads"] = torch.get_num_threads()
    results["seconds"] = time.perf_counter() - started
    print("\n| model | a ms | b ms | c ms | d ms | b/a | c/a | c/b | d/a | run/a | mem c/b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, e in results["models"].items():
        print(_row(name, e))
    if results["layers_sweep"]:
        s = results["layers_sweep"]
        for i, depth in enumerate(s["layers"]):
            row = {k: v[i] for k, v in s.items() if isinstance(v, list)}
            print(_row(f"stack x{depth}", row | {"run_over_a": None}))
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
