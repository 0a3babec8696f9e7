"""The pruning rule on point clouds with a fresh rotation per batch (reduced: 3 seeds, 2 modulation lrs).

Trains the relaxed VN-PointNet of ``benchmarks/pointcloud`` (channels 8, 16, 32; Adam 1e-3;
10 epochs of 40 clouds per class, batch 16, the paper's augmentation) with
``RECMOptimizer(lr=...)`` for RECM's group at 1e-3 and 3e-2, seeds 0-2, on "rotated" (a
fresh Haar rotation per batch: symmetric) and "aligned" (canonical poses: the symmetry is
broken). Each trained model is judged by the library with ``prune_z = 3`` and ``prune_z = 0``.
This is a reduced check (the paper trains ~82,000 steps), labelled so in its JSON.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.lr_robustness.pointcloud --jobs 2   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import recm_opt as recm
from benchmarks.models.relaxed_vn import relaxed_vn_pointnet
from benchmarks.models.vn import evaluate
from benchmarks.pointcloud.data import CLASS_NAMES
from benchmarks.pointcloud.experiment import split_data, train
from benchmarks.progress import announce, expected, progress

ROOT = Path(__file__).resolve().parents[2]


def run_one(variant: str, lr: float, seed: int, epochs: int) -> dict[str, Any]:
    """Train one (variant, modulation lr, seed); accuracy and kept terms under prune_z 3 and 0."""
    torch.set_num_threads(1)
    cfg = argparse.Namespace(n_train=40, n_test=25, data_seed=0)
    train_data, test_data = split_data(variant, cfg)
    torch.manual_seed(seed)
    model = relaxed_vn_pointnet(len(CLASS_NAMES), (8, 16, 32), method="recm")
    example = torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(0))
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Invariant("b"),
                             lr=lr, example=example)
    start = time.perf_counter()
    train(model, opt, train_data, variant, epochs, 16, seed, log_every=10 ** 9)
    out: dict[str, Any] = {"variant": variant, "lr": lr, "seed": seed, "epochs": epochs,
                           "seconds": time.perf_counter() - start, "rules": {}}
    mods = [m.recm_modulation for m in model.modules() if hasattr(m, "recm_modulation")]
    for z in (3.0, 0.0):
        for m in mods:
            m.prune_z = z
            m.refresh_live()
        result = evaluate(model, test_data)
        out["rules"][f"z{z:g}"] = {"kept": sum(sum(m.live) for m in mods), "inst": result["instance_acc"]}
    with torch.no_grad():
        out["layers"] = [{"alpha": m.coefficients()[0].tolist(),
                          "h_sq_over_noise": float(m.h.double().pow(2).sum() / m.noise_var.double().clamp(min=1e-300))}
                         for m in mods]
    return out


def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def main(argv: list[str] | None = None) -> dict[str, Any]:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=expected("about 10 min with --jobs 2 on 2 cores (12 runs)"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-2])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lr_robustness_pointcloud.json")
    args = p.parse_args(argv)
    jobs = [(v, lr, s, args.epochs) for v in ("rotated", "aligned") for lr in args.lrs for s in range(args.seeds)]
    announce(f"about {len(jobs) * 100 / max(1, args.jobs) / 60:.0f} min for {len(jobs)} runs on {args.jobs} "
             "process(es)")
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("forkserver").Pool(args.jobs) as pool:
            runs = list(progress(pool.imap(_job, jobs), total=len(jobs)))
    else:
        runs = [_job(j) for j in progress(jobs)]
    summary = {}
    for v in ("rotated", "aligned"):
        for lr in args.lrs:
            rs = [r for r in runs if r["variant"] == v and r["lr"] == lr]
            summary[f"{v} lr={lr:g}"] = {
                "all_pruned_z3": f"{sum(r['rules']['z3']['kept'] == 0 for r in rs)}/{len(rs)}",
                "all_pruned_z0": f"{sum(r['rules']['z0']['kept'] == 0 for r in rs)}/{len(rs)}",
                "kept_z3": [r["rules"]["z3"]["kept"] for r in rs], "kept_z0": [r["rules"]["z0"]["kept"] for r in rs],
                "acc_z3": [r["rules"]["z3"]["inst"] for r in rs], "acc_z0": [r["rules"]["z0"]["inst"] for r in rs],
                "max_abs_alpha": max(abs(a) for r in rs for la in r["layers"] for a in la["alpha"]),
                "h_sq_over_noise": [[round(la["h_sq_over_noise"], 2) for la in r["layers"]] for r in rs],
            }
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    result = {"command": "python -m benchmarks.lr_robustness.pointcloud " + " ".join(argv or sys.argv[1:]),
              "commit": commit, "reduced": "3 seeds, 2 modulation lrs, 10 epochs of 40 clouds per class (300 steps)",
              "summary": summary, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                                   else o) + "\n")
    for k, v in summary.items():
        print(k, {kk: vv for kk, vv in v.items() if kk != "h_sq_over_noise"})
    return result


if __name__ == "__main__":
    main()
