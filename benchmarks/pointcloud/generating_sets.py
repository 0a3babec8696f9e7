"""How the size and choice of C_G affect RECM's alpha and accuracy (paper Figure 5 and Appendix C).

RECM on the point-cloud task (the main protocol of :mod:`benchmarks.pointcloud.experiment`:
fresh rotations with augmentation on ``rotated``, augmentation alone on ``aligned``)
with different sets ``C_G`` of rotations:

- ``pair`` (|C_G| = 2, the paper's and the library's default): 3/2 rad about x and about z;
- ``four`` (4): 3/2 rad about x, z, y and (1, 1, 1) / sqrt(3);
- ``eight`` (8): eight Haar-random rotations (almost surely a topological generating set);
- ``z_only`` (1): 3/2 rad about z alone, whose closure is SO(2), not SO(3);
- ``cube`` (2): pi/2 about x and about z, which generate the rotation group of the cube
  (24 elements), a finite subgroup, not a generating set of SO(3).

The first three are topological generating sets, so Lemma 4.3 makes their fixed
points the same (``W1(p, p_C) = 0`` iff ``p`` is SO(3)-invariant); the last two are not,
so a law invariant only under their closure would look symmetric to them.

Usage::

    python -m benchmarks.pointcloud.generating_sets --quick
    python -m benchmarks.pointcloud.generating_sets --json docs/results/pointcloud_generating_sets.json \\
        --png docs/results/pointcloud_generating_sets.png
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import recm_opt as recm
from recm_opt.groups import rotation_matrix

from ..progress import announce, expected, progress, write
from .experiment import git_commit, run_one, split_data, t_interval
from .experiment import parse_args as parse_experiment_args

CHOICES = ("pair", "four", "eight", "z_only", "cube")


class RotationSet(recm.SO3Generators):
    """An arbitrary finite set of rotations used as ``C_G`` (SO(3)'s actions and Haar sampler).

    Args:
        matrices: ``(k, 3, 3)`` rotation matrices.
        label: a name for reports.
    """

    def __init__(self, matrices: Tensor, label: str) -> None:
        m = matrices.to(torch.float64)
        eye = torch.eye(3, dtype=torch.float64)
        if m.dim() != 3 or m.shape[1:] != (3, 3) or not torch.allclose(m @ m.transpose(1, 2), eye.expand_as(m),
                                                                          atol=1e-10):
            raise ValueError(f"matrices must be (k, 3, 3) rotations, got shape {tuple(m.shape)}")
        self._matrices, self.label = m, label
        self.angle, self.axes = float("nan"), torch.zeros(0, 3, dtype=torch.float64)

    def generators(self) -> Tensor:  # noqa: D102
        return self._matrices

    def __repr__(self) -> str:
        return f"RotationSet({self.label}, size={len(self._matrices)})"


def generating_set(choice: str) -> RotationSet:
    """The set ``C_G`` named ``choice`` (see the module docstring)."""
    axis = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if choice == "pair":
        return RotationSet(recm.SO3Generators().generators(), choice)
    if choice == "four":
        axes = [axis(1, 0, 0), axis(0, 0, 1), axis(0, 1, 0), axis(1, 1, 1) / math.sqrt(3)]
        return RotationSet(torch.stack([rotation_matrix(a, 1.5) for a in axes]), choice)
    if choice == "eight":
        return RotationSet(recm.SO3Generators().sample(8, torch.Generator().manual_seed(123)), choice)
    if choice == "z_only":
        return RotationSet(rotation_matrix(axis(0, 0, 1), 1.5)[None], choice)
    if choice == "cube":
        return RotationSet(torch.stack([rotation_matrix(axis(1, 0, 0), math.pi / 2),
                                        rotation_matrix(axis(0, 0, 1), math.pi / 2)]), choice)
    raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, final max |alpha_W| over layers, overhead and alpha_W history of one (choice, variant)."""
    alpha_w = [max(abs(la["alpha_weight"]) for la in r["recm"]["layers"]) for r in runs]
    return {
        "inst": [r["inst"] for r in runs], "cls": [r["cls"] for r in runs],
        "max_alpha_weight": alpha_w, "overhead": [r["recm"]["overhead"] for r in runs],
        "kept": [[f"{la['name']}:{t}" for la in r["recm"]["layers"] for t in ("weight", "bias", "noise")
                  if t not in la["pruned"]] for r in runs],
        "steps": runs[0]["steps"],
        # per seed, per logged step: max over layers of |alpha_W|
        "alpha_weight_history": [[max((abs(v[0]) for v in h.values()), default=0.0) for h in r["alpha_history"]]
                                 for r in runs],
        "seconds": [r["seconds"] for r in runs],
    }


def table(results: dict[str, Any]) -> str:
    """Accuracy and final alpha_W per choice of C_G and dataset; paired difference to ``pair``."""
    lines = ["| C_G | size | generating | dataset | inst acc (95 % CI) | inst - pair (pts, 95 % CI) | "
             "final max abs(alpha_W) (mean, max) | overhead (mean) |", "|---|---|---|---|---|---|---|---|"]
    for v in results["config"]["variants"]:
        base = results[v].get("pair")
        for choice, r in results[v].items():
            mean, lo, hi = t_interval([100 * x for x in r["inst"]])
            diff = "-"
            if base is not None and choice != "pair":
                dm, dlo, dhi = t_interval([100 * (a - b) for a, b in zip(r["inst"], base["inst"])])
                diff = f"{dm:+.1f} [{dlo:+.1f}, {dhi:+.1f}]" + (" within noise" if dlo <= 0 <= dhi else "")
            aw = r["max_alpha_weight"]
            size = results["sizes"][choice]
            gen = "yes" if choice in ("pair", "four", "eight") else "no"
            lines.append(f"| {choice} | {size} | {gen} | {v} | {mean:.1f} [{lo:.1f}, {hi:.1f}] | {diff} | "
                         f"{sum(aw) / len(aw):.2e}, {max(aw):.2e} | {sum(r['overhead']) / len(aw):+.3f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Figure 5: max |alpha_W| over training per C_G (left: rotated, middle: aligned) and accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["config"]["variants"]
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(5 * (len(variants) + 1), 3.6))
    for ax, v in zip(axes, variants):
        for j, (choice, r) in enumerate(results[v].items()):
            for s, hist in enumerate(r["alpha_weight_history"]):
                ax.plot(r["steps"], hist, color=f"C{j}", lw=1, alpha=0.8, label=choice if s == 0 else None)
        ax.axhline(0.01, color="k", ls=":", lw=0.8)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(f"{v}: max over layers of abs(alpha_W)")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for k, v in enumerate(variants):
        for j, r in enumerate(results[v].values()):
            xs = [j + 0.15 * (2 * k - 1)] * len(r["inst"])
            ax.plot(xs, [100 * x for x in r["inst"]], "o", color=f"C{k}", ms=4, label=v if j == 0 else None)
    ax.set_xticks(range(len(results[variants[0]])), list(results[variants[0]]))
    ax.set_ylabel("test instance accuracy (%)")
    ax.set_title("accuracy per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (choice, dataset, seed) with RECM, print the table, write JSON and the figure."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=expected(
        "about 44 min on one core (every choice, Rotated and Aligned, 3 seeds), seconds with --quick"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, one epoch, one seed")
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=CHOICES)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--a", type=float, default=1e-3, help="RECM's a (the paper's ablations: 1e-3)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None)
    cfg, rest = p.parse_known_args(argv)
    if cfg.from_json is not None:
        results = json.loads(cfg.from_json.read_text())
        print(table(results))
        if cfg.png is not None:
            plot(results, cfg.png)
        return results
    exp = parse_experiment_args((["--quick"] if cfg.quick else []) + rest)
    cfg.seeds = cfg.seeds or ([0] if cfg.quick else [0, 1, 2])
    variants = [v for v in exp.variants if v in ("rotated", "aligned")]
    torch.set_num_threads(1)
    args = argv if argv is not None else sys.argv[1:]
    method = "recm" if cfg.a == 1e-3 else f"recm:{cfg.a:g}"
    results: dict[str, Any] = {
        "command": "python -m benchmarks.pointcloud.generating_sets " + " ".join(shlex.quote(a) for a in args),
        "commit": git_commit(), "machine": "CPU, 1 thread (2 shared cores)",
        "config": {"choices": cfg.choices, "seeds": cfg.seeds, "a": cfg.a, "variants": variants,
                   "epochs": exp.epochs, "n_train": exp.n_train, "n_test": exp.n_test,
                   "channels": list(exp.channels), "batch_size": exp.batch_size, "lr": exp.lr},
        "sizes": {c: len(generating_set(c).generators()) for c in cfg.choices},
    }
    t0 = time.perf_counter()
    total = len(variants) * len(cfg.choices) * len(cfg.seeds)
    announce("seconds" if cfg.quick else f"about {total * 44 / 30:.0f} min for {total} runs on one core (88 s each)")
    bar = iter(progress(range(total + 1), total=total, desc="runs"))
    next(bar)
    for v in variants:
        train_data, test_data = split_data(v, exp)
        results[v] = {}
        for choice in cfg.choices:
            runs = []
            for seed in cfg.seeds:
                r = run_one(method, v, seed, train_data, test_data, exp, group=generating_set(choice))
                next(bar, None)
                runs.append(r)
                write(f"[{time.perf_counter() - t0:7.1f}s] {v:8s} {choice:7s} seed={seed} inst={r['inst']:.3f} "
                      f"overhead={r['recm']['overhead']:+.3f} ({r['seconds']:.1f}s)")
            results[v][choice] = summarise(runs)
        results["total_seconds"] = time.perf_counter() - t0
        if cfg.json is not None:
            cfg.json.parent.mkdir(parents=True, exist_ok=True)
            cfg.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    if cfg.png is not None:
        plot(results, cfg.png)
        print("wrote", cfg.png)
    return results


if __name__ == "__main__":
    main()
