"""RECM at its defaults against a grid of ``a`` x RECM's step size x inner optimizer.

For every task of :mod:`benchmarks.tuning_free.tasks` (vector and set layouts, symmetric and
broken; fresh samples per batch), inner AdamW (lr 1e-3) and SGD with momentum 0.9 (lr 1e-2):

* the grid: ``a`` in {1e-1, 1e-2, 1e-3, 1e-4, 1e-5} x RECM's peak step size ``lr`` in
  {1e-3, 1e-2, 3e-2} (the same cosine-to-zero shape as the defaults), ``--grid-seeds`` seeds;
* the defaults (``total_steps`` given, nothing else), ``--seeds`` seeds;
* the best grid cell of each (task, inner) (lowest mean test MSE over the grid seeds), rerun on
  ``--seeds`` seeds, and paired with the defaults seed by seed;
* the defaults with ``alpha_fn="gelu"`` instead of the default ``"odd_gelu"``, ``--seeds`` seeds.

Judged by the library itself: test MSE on 4096 fresh samples in eval mode (pruned terms
removed), the number of kept terms, and ``||h||^2 / noise_var`` per layer. Broken tasks: the
paired difference of log test MSE, defaults minus best cell, with its 95 % t-interval.
Symmetric tasks: every term pruned in every seed.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.tuning_free --jobs 2   # about 60-90 minutes on 2 cores
    python -m benchmarks.tuning_free --quick                      # seconds: 60 steps, 2 cells, 1 seed
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import stats
from benchmarks.tuning_free.tasks import ROOT, TASKS, build, fit

A_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
LR_GRID = (1e-3, 1e-2, 3e-2)
INNERS = ("adamw", "sgd")


def run_one(task: str, inner: str, arm: str, seed: int, steps: int, batch: int = 64,
            settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one (task, inner optimizer, arm, seed) and judge it."""
    settings = dict(settings or {})
    model, opt, sample = build(task, inner, seed, steps, **settings)
    x, y = sample(steps * batch, seed + 1)
    xt, yt = sample(4096, 10_000 + seed)
    start = time.perf_counter()
    fit(model, opt, x, y, steps, batch)
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        mse = float((model(xt) - yt).pow(2).mean())
        mods = [(n, m.recm_modulation) for n, m in model.named_modules() if hasattr(m, "recm_modulation")]
        layers = [{"layer": n, "alpha": m.coefficients()[0].tolist(), "live": list(m.live),
                   "h_sq_over_noise": float(m.h.double().pow(2).sum() / m.noise_var.double().clamp(min=1e-300)),
                   "B": m.lipschitz_bound()} for n, m in mods]
    return {"task": task, "inner": inner, "arm": arm, "seed": seed, "steps": steps, "settings": settings,
            "a": opt.a, "lr": opt.lr, "test_mse": mse, "kept": sum(sum(la["live"]) for la in layers),
            "max_abs_alpha": max(abs(a) for la in layers for a in la["alpha"]), "layers": layers, "wall_s": wall}


def run_defaults_for(steps: int) -> Any:
    """The library's defaults for a run of ``steps`` (what the "default" arm uses)."""
    from recm_opt.schedule import run_defaults

    return run_defaults(steps)


def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def t_interval(xs: list[float]) -> dict[str, float]:
    """Mean and 95 % t-interval of ``xs`` as a JSON-ready dict (:func:`benchmarks.stats.t_interval`)."""
    iv = stats.t_interval(xs)
    return {"mean": iv.mean, "low": iv.lo, "high": iv.hi, "n": len(xs)}


def _cell(a: float, lr: float) -> str:
    return f"a={a:g},lr={lr:g}"


def _run_all(jobs: list[tuple], n_jobs: int) -> list[dict[str, Any]]:
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional (the ``progress`` extra)
        def tqdm(it: Any, **_: Any) -> Any:  # type: ignore[no-redef]
            return it

    if n_jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(n_jobs) as pool:
            return list(tqdm(pool.imap(_job, jobs), total=len(jobs), desc="runs", file=sys.stderr))
    return [_job(j) for j in tqdm(jobs, desc="runs", file=sys.stderr)]


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 steps, 2 grid cells, 1 seed, vector tasks (seconds)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--grid-seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tuning_free.json")
    args = ap.parse_args(argv)
    tasks, a_grid, lr_grid = args.tasks, A_GRID, LR_GRID
    if args.quick:
        args.steps, args.seeds, args.grid_seeds = 60, 1, 1
        tasks, a_grid, lr_grid = ["vector-symmetric", "vector-broken"], (1e-1,), (1e-3, 3e-2)
    expected = len(tasks) * len(INNERS) * (len(a_grid) * len(lr_grid) * args.grid_seeds + 3 * args.seeds)
    print(f"tuning_free: about {expected} runs of {args.steps} steps on {args.jobs} job(s)", file=sys.stderr)
    t0, commit = time.perf_counter(), _commit()  # the code the runs import: read before they start
    grid_jobs = [(task, inner, _cell(a, lr), seed, args.steps, 64, {"a": a, "lr": lr})
                 for task, inner, a, lr, seed in itertools.product(tasks, INNERS, a_grid, lr_grid,
                                                                   range(args.grid_seeds))]
    default_jobs = [(task, inner, arm, seed, args.steps, 64, settings)
                    for task, inner, seed in itertools.product(tasks, INNERS, range(args.seeds))
                    for arm, settings in (("default", {}), ("default-gelu", {"alpha_fn": "gelu"}))]
    runs = _run_all(grid_jobs + default_jobs, args.jobs)
    # the best grid cell of each (task, inner), rerun on the remaining seeds
    best: dict[tuple[str, str], str] = {}
    for task, inner in itertools.product(tasks, INNERS):
        cells: dict[str, list[float]] = {}
        for r in runs:
            if r["task"] == task and r["inner"] == inner and r["arm"].startswith("a="):
                cells.setdefault(r["arm"], []).append(math.log(r["test_mse"]))
        best[(task, inner)] = min(cells, key=lambda c: sum(cells[c]) / len(cells[c]))
    more = []
    for (task, inner), cell in best.items():
        settings = next(r["settings"] for r in runs if r["arm"] == cell)
        more += [(task, inner, cell, seed, args.steps, 64, settings) for seed in range(args.grid_seeds, args.seeds)]
    runs += _run_all(more, args.jobs)
    summary = summarise(runs, tasks, best, args.seeds)
    result = {"command": " ".join(["python -m benchmarks.tuning_free", *(argv if argv is not None else sys.argv[1:])]),
              "commit": commit, "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
              f"{args.jobs} job(s), 1 torch thread each", "steps": args.steps, "seeds": args.seeds,
              "grid_seeds": args.grid_seeds, "a_grid": list(a_grid), "lr_grid": list(lr_grid),
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    if not args.quick:
        figure(result, args.out.with_suffix(".png"))
    return result


def summarise(runs: list[dict[str, Any]], tasks: list[str], best: dict[tuple[str, str], str],
              seeds: int) -> list[dict[str, Any]]:
    """Per (task, inner): defaults, odd-GELU vs GELU, best cell, paired log-MSE intervals, pruning counts."""
    out = []
    for task, inner in itertools.product(tasks, INNERS):
        def arm(name: str, task: str = task, inner: str = inner) -> dict[int, dict[str, Any]]:
            return {r["seed"]: r for r in runs if r["task"] == task and r["inner"] == inner and r["arm"] == name}

        d, g, b = arm("default"), arm("default-gelu"), arm(best[(task, inner)])
        common = sorted(set(d) & set(b))
        row = {"task": task, "inner": inner, "best_cell": best[(task, inner)],
               "default_mse": t_interval([d[s]["test_mse"] for s in sorted(d)]),
               "best_mse": t_interval([b[s]["test_mse"] for s in sorted(b)]),
               "log_mse_default_minus_best": t_interval([math.log(d[s]["test_mse"] / b[s]["test_mse"])
                                                        for s in common]) if common else None,
               "log_mse_odd_minus_gelu": t_interval([math.log(d[s]["test_mse"] / g[s]["test_mse"])
                                                    for s in sorted(set(d) & set(g))]) if g else None,
               "default_kept": [d[s]["kept"] for s in sorted(d)],
               "gelu_kept": [g[s]["kept"] for s in sorted(g)],
               "best_kept": [b[s]["kept"] for s in sorted(b)],
               "default_all_pruned": all(d[s]["kept"] == 0 for s in d),
               "default_max_h_ratio": max(la["h_sq_over_noise"] for s in d for la in d[s]["layers"]),
               "grid": {r["arm"]: r["test_mse"] for r in runs if r["task"] == task and r["inner"] == inner
                        and r["arm"].startswith("a=") and r["seed"] == 0},
               "grid_kept": {r["arm"]: r["kept"] for r in runs if r["task"] == task and r["inner"] == inner
                             and r["arm"].startswith("a=") and r["seed"] == 0}}
        out.append(row)
    return out


def table(result: dict[str, Any]) -> str:
    """A markdown table of the summary."""
    lines = ["| task | inner | defaults: test MSE [95 % CI] | kept (per seed) | best grid cell | its MSE | "
             "log MSE defaults - best [95 % CI] | odd GELU - GELU log MSE [95 % CI] |", "|---" * 8 + "|"]
    for r in result["summary"]:
        def ci(x: dict[str, float] | None, f: str = "{:.4f}") -> str:
            return "-" if x is None else f"{f.format(x['mean'])} [{f.format(x['low'])}, {f.format(x['high'])}]"
        lines.append(f"| {r['task']} | {r['inner']} | {ci(r['default_mse'])} | {r['default_kept']} | "
                     f"{r['best_cell']} | {ci(r['best_mse'])} | {ci(r['log_mse_default_minus_best'], '{:+.3f}')} | "
                     f"{ci(r['log_mse_odd_minus_gelu'], '{:+.3f}')} |")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> None:
    """The grid as heat maps of log10 test MSE (seed 0), the defaults' (a, lr) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    a_grid, lr_grid = result["a_grid"], result["lr_grid"]
    fig, axes = plt.subplots(len(rows) // 2, 2, figsize=(9, 2.6 * (len(rows) // 2)), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        m = [[math.log10(r["grid"].get(_cell(a, lr), float("nan"))) for a in a_grid] for lr in lr_grid]
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(a_grid)), [f"{a:g}" for a in a_grid])
        ax.set_yticks(range(len(lr_grid)), [f"{lr:g}" for lr in lr_grid])
        ax.set_xlabel("a")
        ax.set_ylabel("RECM peak lr")
        d = next(x for x in result["runs"] if x["task"] == r["task"] and x["inner"] == r["inner"]
                 and x["arm"] == "default")
        ax.plot(_frac_index(d["a"], a_grid), _frac_index(d["lr"], lr_grid, log=True), "r*", ms=14,
                label=f"defaults: log10 MSE {math.log10(r['default_mse']['mean']):.2f}")
        ax.set_title(f"{r['task']}, {r['inner']}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        fig.colorbar(im, ax=ax, label="log10 test MSE")
    fig.suptitle("Grid (seed 0) vs defaults (red star, at their derived a and lr)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _frac_index(v: float, grid: tuple | list, log: bool = True) -> float:
    """Where ``v`` falls on the (log-spaced, possibly descending) grid's index axis."""
    xs = [math.log10(g) for g in grid]
    x = math.log10(v)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    sx = [xs[i] for i in order]
    if x <= sx[0]:
        return float(order[0])
    if x >= sx[-1]:
        return float(order[-1])
    for j in range(len(sx) - 1):
        if sx[j] <= x <= sx[j + 1]:
            f = (x - sx[j]) / (sx[j + 1] - sx[j])
            return order[j] + f * (order[j + 1] - order[j])
    return float("nan")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out or "unknown (not a git checkout)"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
