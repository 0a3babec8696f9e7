"""The library's pruning rule against the modulation learning rate (``RECMOptimizer(prune_z=...)``).

Trains the demo's ``VectorNet`` (three relaxed vector layers, batch 64, 2000 steps) with
``RECMOptimizer`` on ``examples/vector_model.py::make_task`` with ``broken = 0``
(exactly symmetric) and ``broken = 1``, for modulation-group lr in {1e-4, 1e-3, 1e-2,
3e-2}, inner AdamW (lr 1e-3) and SGD with momentum 0.9 (lr 1e-2), seeds 0-2, and
``alpha_fn`` "gelu" (the default) and "odd_gelu". Pruning only decides evaluation and
export (training forwards use every term), so each trained model is judged twice, by the
library itself: with ``prune_z = 3`` (the default: ``|alpha| >= 0.01`` and
``||h||^2 >= 9 noise_var``) and with ``prune_z = 0`` (``|alpha| >= 0.01`` alone, the
rule before the noise test).

Targets: on the symmetric task every term pruned in every cell (3 seeds each); on the
broken task the test MSE (4096 fresh samples, eval mode, pruned terms removed) within 5 %
of the gelu run judged with ``prune_z = 0`` on the same seed.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.lr_robustness.library --jobs 2   # about 10 minutes on 2 cores
    python -m benchmarks.lr_robustness.library --quick                      # seconds: 150 steps, 2 cells
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.lr_robustness.run import GELU_MIN, ROOT, _test_mse, _vector_model, build_vector_net
from benchmarks.progress import announce, expected, progress, write
from benchmarks.stats import t_interval
from benchmarks.tuning_free.tasks import fit


def run_one(task: str, alpha_fn: str, opt_name: str, lr: float, seed: int, steps: int,
            batch: int = 64) -> dict[str, Any]:
    """Train one configuration; judge it with prune_z = 3 and prune_z = 0."""
    vm = _vector_model()
    model, opt = build_vector_net(opt_name, lr, seed, alpha_fn=alpha_fn)
    x, y = vm.make_task(steps * batch, 0.0 if task == "symmetric" else 1.0, seed=seed + 1)
    xt, yt = vm.make_task(4096, 0.0 if task == "symmetric" else 1.0, seed=10_000 + seed)
    start = time.perf_counter()
    fit(model, opt, x, y, steps, batch)
    mods = [(n, m.recm_modulation) for n, m in model.named_modules() if hasattr(m, "recm_modulation")]
    out: dict[str, Any] = {"task": task, "alpha_fn": alpha_fn, "opt": opt_name, "lr": lr, "seed": seed,
                           "steps": steps, "wall_s": time.perf_counter() - start, "rules": {}}
    for z in (3.0, 0.0):
        for _, m in mods:
            m.prune_z = z
            m.refresh_live()
        out["rules"][f"z{z:g}"] = {"live": [list(m.live) for _, m in mods], "test_mse": _test_mse(model, xt, yt)}
    with torch.no_grad():
        out["layers"] = [{"layer": n, "alpha": m.coefficients()[0].tolist(),
                          "h_sq_over_noise": float(m.h.double().pow(2).sum() / m.noise_var.double().clamp(min=1e-300)),
                          "B": m.lipschitz_bound()} for n, m in mods]
    return out


def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per alpha_fn, rule and cell: symmetric runs with every term pruned, broken MSE against gelu + prune_z=0."""
    base = {(r["opt"], r["lr"], r["seed"]): r["rules"]["z0"]["test_mse"]
            for r in records if r["task"] == "broken" and r["alpha_fn"] == "gelu"}
    out: dict[str, Any] = {}
    for fn in sorted({r["alpha_fn"] for r in records}):
        for rule in ("z3", "z0"):
            cells, sym_ok, brk_ok = {}, True, True
            logs = []
            for opt in ("adamw", "sgd"):
                for lr in sorted({r["lr"] for r in records}):
                    sym = [r for r in records if r["task"] == "symmetric" and r["alpha_fn"] == fn
                           and r["opt"] == opt and r["lr"] == lr]
                    brk = [r for r in records if r["task"] == "broken" and r["alpha_fn"] == fn
                           and r["opt"] == opt and r["lr"] == lr and (opt, lr, r["seed"]) in base]
                    if not sym and not brk:
                        continue
                    pruned = [not any(any(layer) for layer in r["rules"][rule]["live"]) for r in sym]
                    ratios = [r["rules"][rule]["test_mse"] / base[(opt, lr, r["seed"])] for r in brk]
                    logs += [math.log(v) for v in ratios]
                    cells[f"{opt} lr={lr:g}"] = {
                        "symmetric_all_pruned": f"{sum(pruned)}/{len(pruned)}",
                        "symmetric_max_abs_alpha": max((abs(a) for r in sym for la in r["layers"] for a in la["alpha"]),
                                                       default=None),
                        "symmetric_max_h_sq_over_noise": max((la["h_sq_over_noise"] for r in sym for la in r["layers"]),
                                                             default=None),
                        "broken_min_h_sq_over_noise": min((la["h_sq_over_noise"] for r in brk for la in r["layers"]),
                                                          default=None),
                        "broken_mse_ratio": ratios,
                        "broken_terms_kept": sum(sum(map(sum, r["rules"][rule]["live"])) for r in brk),
                        "broken_terms_at_gelu_min": sum(a < GELU_MIN + 0.01 for r in brk for la in r["layers"]
                                                        for a in la["alpha"]),
                        "broken_terms": sum(len(la["alpha"]) for r in brk for la in r["layers"]),
                    }
                    sym_ok &= len(pruned) >= 3 and all(pruned)
                    brk_ok &= bool(ratios) and max(ratios) <= 1.05
            mean, lo, hi = t_interval(logs) if logs else (math.nan, math.nan, math.nan)
            out[f"{fn}+{rule}"] = {"cells": cells, "meets_symmetric_target": sym_ok,
                                   "meets_broken_target_every_seed": brk_ok,
                                   "broken_geo_mean_ratio": math.exp(mean),
                                   "broken_geo_mean_ratio_ci95": [math.exp(lo), math.exp(hi)], "pairs": len(logs)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=expected(
        "about 14 min with --jobs 2 on 2 cores (96 runs, 848 s), seconds with --quick; runs already in --cache "
        "are not redone"))
    p.add_argument("--quick", action="store_true", help="150 steps, 1 seed, 2 learning rates, AdamW, GELU")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    p.add_argument("--opts", nargs="+", default=["adamw", "sgd"])
    p.add_argument("--alpha-fns", nargs="+", default=["gelu", "odd_gelu"])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "lr_robustness_library_runs.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lr_robustness_library.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs, args.opts, args.alpha_fns = 150, 1, [1e-3, 3e-2], ["adamw"], ["gelu"]
        args.cache = ROOT / "outputs" / "lr_robustness_library_quick.jsonl"
        args.out = ROOT / "outputs" / "lr_robustness_library_quick.json"
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["task"], rec["alpha_fn"], rec["opt"], rec["lr"], rec["seed"], rec["steps"])] = rec
    jobs = [(task, fn, o, lr, s, args.steps) for fn in args.alpha_fns for o in args.opts for lr in args.lrs
            for s in range(args.seeds) for task in ("symmetric", "broken")]
    todo = [j for j in jobs if j not in done]
    announce("seconds" if args.quick else f"about {len(todo) * 17.7 / max(1, args.jobs) / 60:.0f} min for "
             f"{len(todo)} runs on {args.jobs} process(es) (measured: 96 runs in 848 s with --jobs 2)")
    t0 = time.perf_counter()
    with args.cache.open("a") as f:
        if args.jobs > 1 and todo:
            import multiprocessing as mp

            with mp.get_context("forkserver").Pool(args.jobs) as pool:
                for rec in progress(pool.imap_unordered(_job, todo), total=len(todo)):
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done[(rec["task"], rec["alpha_fn"], rec["opt"], rec["lr"], rec["seed"], rec["steps"])] = rec
                    write(f"[{time.perf_counter() - t0:5.0f}s] {rec['task']} {rec['alpha_fn']} {rec['opt']} "
                          f"lr={rec['lr']:g} seed={rec['seed']}")
        else:
            for j in progress(todo):
                rec = _job(j)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[j] = rec
    records = [done[j] for j in jobs]
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    result = {
        "command": "python -m benchmarks.lr_robustness.library " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit, "machine": f"{platform.machine()} CPU, 1 thread per run, shared 2-core host",
        "torch": torch.__version__, "steps": args.steps, "summary": summarise(records), "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, d in result["summary"].items():
        print(f"{name:14s} symmetric: {d['meets_symmetric_target']!s:5s} broken (every seed <= 1.05): "
              f"{d['meets_broken_target_every_seed']!s:5s} geo-mean ratio {d['broken_geo_mean_ratio']:.3f} "
              f"[{d['broken_geo_mean_ratio_ci95'][0]:.3f}, {d['broken_geo_mean_ratio_ci95'][1]:.3f}]")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
