"""Rotated vs aligned point clouds: RECM against VN, ES and RPP (paper section 5.1, Table 1, Figs 2 and 4, Table 4).

Trains a small VN-PointNet on the procedural stand-in for ModelNet40
(:mod:`pointcloud_data`) in two variants: "rotated" (a Haar SO(3) pose per sample,
at train and test) and "aligned" (canonical pose, where three class pairs differ
only by orientation, so breaking the symmetry pays). Methods, with the same model,
data, budget and seeds:

- ``vn``: the equivariant VN-PointNet (every linear map a ``VNLinear``);
- ``es``: ``recm.EquivarianceSchedule`` (triangle 0 -> 1 -> 0 over training, branch dropped at test);
- ``rpp``: ``recm.ResidualPathwayPrior`` (branch always on, trainable scale, L2 prior);
- ``recm``: ``recm.RECMOptimizer`` with its defaults (``a = 1e-3``) on both datasets.

The relaxed models tag their VN linear maps with three terms (``RelaxedVNLinear`` in
:mod:`relaxed_vn`): an unconstrained weight, a free bias and noise with a learnable
scale. The inner optimizer is Adam (lr 1e-3) for every method.

Usage::

    python benchmarks/pointcloud.py --quick --json /tmp/pointcloud_quick.json
    python benchmarks/pointcloud.py --json docs/results/pointcloud.json --png-dir docs/results
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pointcloud_data import CLASS_NAMES, haar_rotations, load_split
from relaxed_vn import relaxed_vn_pointnet, vn_pointnet
from torch import Tensor, nn
from vn import evaluate

import recm_opt as recm

METHODS = ("vn", "es", "rpp", "recm")
VARIANTS = ("rotated", "aligned")
TERMS = ("weight", "bias", "noise")
Data = tuple[Tensor, Tensor]


# ------------------------------------------------------------------ methods
def build(method: str, n_classes: int, channels: tuple[int, ...], total_steps: int,
          lr: float, recm_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Return the model and optimizer of one method (the caller seeds torch first).

    ``recm_kwargs`` overrides RECMOptimizer defaults (e.g. ``{"a": 1e-2}``); empty by default.
    """
    if method == "vn":
        model = vn_pointnet(n_classes, channels)
        return model, torch.optim.Adam(model.parameters(), lr=lr)
    model = relaxed_vn_pointnet(n_classes, channels)
    inner = torch.optim.Adam(model.parameters(), lr=lr)
    # The one line a user changes to A/B the policies (all on the same tagged model):
    policies: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "es": lambda: recm.EquivarianceSchedule(inner, model, total_steps=total_steps),
        "rpp": lambda: recm.ResidualPathwayPrior(inner, model),
        "recm": lambda: recm.RECMOptimizer(inner, model, group=recm.SO3Generators(), target=recm.Invariant("b"),
                                           **(recm_kwargs or {})),
    }
    if method not in policies:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model, policies[method]()


def alphas(opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """``{layer: [alpha_weight, alpha_bias, alpha_noise]}`` from the committed state."""
    if not isinstance(opt, recm.RECMOptimizer):
        return {}
    return {row["name"]: [row["alpha"][t] for t in TERMS] for row in opt.report()}


# ----------------------------------------------------------------- training
def train(model: nn.Module, opt: torch.optim.Optimizer, data: Data, epochs: int, batch_size: int,
          seed: int, log_every: int, rerotate: bool = False) -> tuple[list[int], list[dict[str, list[float]]],
                                                                     list[float]]:
    """Train with cross-entropy; return logged steps, alphas at those steps and epoch losses.

    With ``rerotate`` every batch gets fresh Haar rotations (augmentation), so the training
    distribution is exactly rotation invariant rather than a fixed set of rotated samples.
    """
    points, labels = data
    gen = torch.Generator().manual_seed(seed)
    rot_gen = torch.Generator().manual_seed(10_000 + seed)
    steps, history, losses, step = [0], [alphas(opt)], [], 0
    for _ in range(epochs):
        model.train()
        perm, total = torch.randperm(len(points), generator=gen), 0.0
        for i in range(0, len(points), batch_size):
            idx = perm[i : i + batch_size]
            x = points[idx]
            if rerotate:  # row vectors: x -> x R^T
                x = torch.einsum("bnj,bij->bni", x, haar_rotations(len(idx), rot_gen, dtype=x.dtype))
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(opt, recm.RECMOptimizer):
                opt.step(target=labels[idx])
            else:
                opt.step()
            step, total = step + 1, total + float(loss.detach()) * len(idx)
            if step % log_every == 0:
                steps.append(step)
                history.append(alphas(opt))
        losses.append(total / len(points))
    return steps, history, losses


def recm_summary(model: nn.Module, opt: recm.RECMOptimizer, test: Data) -> dict[str, Any]:
    """Per-layer final alphas, pruning, symmetry gap, overhead; and a check that export == eval."""
    rows = opt.report()
    model.eval()
    exported = recm.export(model)
    with torch.no_grad():
        x = test[0][:16]
        export_err = float((exported(x) - model(x)).abs().max())
    layers = [{"name": r["name"], **{f"alpha_{t}": r["alpha"][t] for t in TERMS}, "pruned": r["pruned"],
               "beta": r["beta"], "gap_w1": r.get("gap_w1"), "alpha_bound": r.get("alpha_bound")}
              for r in rows]
    return {"layers": layers, "overhead": recm.parameter_overhead(rows, model), "export_max_abs_err": export_err}


def run_one(method: str, variant: str, seed: int, train_data: Data, test_data: Data,
            cfg: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one (method, dataset, seed)."""
    steps_per_epoch = math.ceil(len(train_data[0]) / cfg.batch_size)
    torch.manual_seed(seed)
    recm_kwargs = {"a": cfg.a} if cfg.a is not None else {}
    model, opt = build(method, len(CLASS_NAMES), cfg.channels, cfg.epochs * steps_per_epoch, cfg.lr, recm_kwargs)
    t0 = time.perf_counter()
    steps, history, losses = train(model, opt, train_data, cfg.epochs, cfg.batch_size, seed, cfg.log_every,
                                   rerotate=cfg.rerotate and variant == "rotated")
    seconds = time.perf_counter() - t0
    result = evaluate(model, test_data)
    out = {"inst": result["instance_acc"], "cls": result["class_acc"], "seconds": seconds,
           "train_loss": losses, "steps": steps, "alpha_history": history}
    if method == "recm":
        out["recm"] = recm_summary(model, opt, test_data)  # type: ignore[arg-type]
    if method == "rpp":
        out["rpp_alpha"] = alphas(opt)
    return out


# ------------------------------------------------------------------ outputs
def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One dataset's entry of the JSON schema (lists hold the per-seed values)."""
    out: dict[str, Any] = {m: {"inst": [r["inst"] for r in rs], "cls": [r["cls"] for r in rs],
                               "seconds": [r["seconds"] for r in rs]} for m, rs in runs.items()}
    if "recm" in runs:
        per_seed = [r["recm"] for r in runs["recm"]]
        names = [layer["name"] for layer in per_seed[0]["layers"]]
        out["recm_layers"] = [
            {"name": name, **{k: [s["layers"][i][k] for s in per_seed]
                              for k in ("alpha_weight", "alpha_bias", "alpha_noise", "pruned", "beta",
                                        "gap_w1", "alpha_bound")}}
            for i, name in enumerate(names)
        ]
        out["recm_param_overhead"] = [s["overhead"] for s in per_seed]
        out["recm_export_max_abs_err"] = max(s["export_max_abs_err"] for s in per_seed)
        out["recm_alpha_history"] = {"steps": runs["recm"][0]["steps"],
                                     "alpha": [r["alpha_history"] for r in runs["recm"]]}
    if "rpp" in runs:
        out["rpp_final_alpha"] = [r["rpp_alpha"] for r in runs["rpp"]]
    return out


def mean_std(xs: list[float]) -> str:
    """``mean ± std`` in percent (sample std; 0 for one seed)."""
    t = torch.tensor(xs, dtype=torch.float64) * 100
    std = float(t.std()) if len(xs) > 1 else 0.0
    return f"{float(t.mean()):5.1f} ± {std:4.1f}"


def table(results: dict[str, Any]) -> str:
    """Table-1-style markdown: instance / class accuracy per method and dataset."""
    lines = ["| method | rotated inst | rotated cls | aligned inst | aligned cls |", "|---|---|---|---|---|"]
    for m in METHODS:
        if all(m in results.get(v, {}) for v in VARIANTS):
            cells = [mean_std(results[v][m][k]) for v in VARIANTS for k in ("inst", "cls")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(results: dict[str, Any]) -> str:
    """Table-4-style markdown: RECM's inference-parameter overhead and kept terms per dataset."""
    lines = ["| dataset | RECM parameter overhead (mean ± std over seeds) | per seed | layers with a kept term |",
             "|---|---|---|---|"]
    for v in VARIANTS:
        if "recm_param_overhead" not in results.get(v, {}):
            continue
        ov = results[v]["recm_param_overhead"]
        kept = sorted({f"{la['name']}:{t}" for la in results[v]["recm_layers"] for pruned in la["pruned"]
                       for t in TERMS if t not in pruned})
        t = torch.tensor(ov, dtype=torch.float64)
        std = float(t.std()) if len(ov) > 1 else 0.0
        lines.append(f"| {v} | {float(t.mean()):+.4f} ± {std:.4f} | {', '.join(f'{x:+.4f}' for x in ov)} | "
                     f"{', '.join(kept) or 'none'} |")
    return "\n".join(lines)


def layer_table(results: dict[str, Any]) -> str:
    """Final RECM alphas per layer and term (mean over seeds, max |.| in brackets)."""
    lines = ["| dataset | layer | alpha_W | alpha_b | alpha_noise | beta | W1 (newest, C_G) | 2 sqrt(m) B W1 |",
             "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        for la in results.get(v, {}).get("recm_layers", []):
            cells = []
            for k in ("alpha_weight", "alpha_bias", "alpha_noise"):
                xs = la[k]
                cells.append(f"{sum(xs) / len(xs):+.2e} [{max(abs(x) for x in xs):.2e}]")
            beta = sum(la["beta"]) / len(la["beta"])
            gaps = [g for g in la["gap_w1"] if g is not None]
            bounds = [b for b in la["alpha_bound"] if b is not None]
            gap = f"{sum(gaps) / len(gaps):.3f}" if gaps else "-"
            bound = f"{sum(bounds) / len(bounds):.2f}" if bounds else "-"
            lines.append(f"| {v} | {la['name']} | " + " | ".join(cells) + f" | {beta:.4f} | {gap} | {bound} |")
    return "\n".join(lines)


def plot_alphas(results: dict[str, Any], png_dir: Path) -> list[Path]:
    """Figures 2 and 4: alpha_W and alpha_b (one figure), alpha_noise (another), per layer, both datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for terms, fname in [(("weight", "bias"), "pointcloud_alpha_wb.png"), (("noise",), "pointcloud_alpha_noise.png")]:
        fig, axes = plt.subplots(len(terms), 2, figsize=(10, 3.2 * len(terms)), squeeze=False, sharex="col")
        for col, variant in enumerate(VARIANTS):
            hist = results[variant]["recm_alpha_history"]
            steps = hist["steps"]
            for row, term in enumerate(terms):
                ax, k = axes[row][col], TERMS.index(term)
                for j, name in enumerate(hist["alpha"][0][0]):
                    for s, seed_hist in enumerate(hist["alpha"]):
                        ax.plot(steps, [h[name][k] for h in seed_hist], color=f"C{j}", lw=1.2, alpha=0.8,
                                label=name if s == 0 else None)
                ax.axhline(0.01, color="k", ls=":", lw=0.8)
                ax.axhline(-0.01, color="k", ls=":", lw=0.8)
                ax.set_yscale("symlog", linthresh=1e-3)  # pruned (|alpha| < 0.01) and kept terms both visible
                ax.set_title(f"{variant}: alpha_{term}")
                ax.set_xlabel("optimizer step")
                ax.set_ylabel("alpha")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("RECM alpha per layer over training (all seeds; dotted: prune threshold 0.01)", fontsize=9)
        fig.tight_layout()
        path = png_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets a smoke-test budget."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget (a few minutes on one core)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None, help="training samples per class")
    p.add_argument("--n-test", type=int, default=None, help="test samples per class")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--a", type=float, default=None, help="RECM's a for both datasets (default: the library's 1e-3)")
    p.add_argument("--log-every", type=int, default=None, help="alpha logging period in steps")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--rerotate", action="store_true",
                   help="rotated variant: fresh Haar rotations for every training batch (augmentation)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png-dir", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="print the tables (and plots) of a saved run")
    cfg = p.parse_args(argv)
    quick = {"epochs": 3, "n_train": 12, "n_test": 10, "log_every": 5}
    full = {"epochs": 20, "n_train": 40, "n_test": 25, "log_every": 10}
    for k, v in (quick if cfg.quick else full).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.channels = tuple(cfg.channels)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (dataset, method, seed), print the table, write JSON and figures."""
    cfg = parse_args(argv)
    if cfg.from_json is not None:  # tables of an earlier run, no training
        results = json.loads(cfg.from_json.read_text())
        print(table(results), overhead_table(results), layer_table(results), sep="\n\n")
        if cfg.png_dir is not None:
            cfg.png_dir.mkdir(parents=True, exist_ok=True)
            for path in plot_alphas(results, cfg.png_dir):
                print("wrote", path)
        return results
    torch.set_num_threads(1)
    command = "python benchmarks/pointcloud.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, Any] = {"command": command, "config": {k: (list(v) if isinstance(v, tuple) else
                                                                  str(v) if isinstance(v, Path) else v)
                                                              for k, v in vars(cfg).items()}}
    t_all = time.perf_counter()
    for variant in cfg.variants:
        train_data = load_split("train", variant, cfg.n_train, cfg.data_seed)
        test_data = load_split("test", variant, cfg.n_test, cfg.data_seed)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
        for seed in cfg.seeds:
            for method in cfg.methods:
                r = run_one(method, variant, seed, train_data, test_data, cfg)
                runs[method].append(r)
                extra = ""
                if method == "recm":
                    kept = {la["name"]: [t for t in TERMS if t not in la["pruned"]] for la in r["recm"]["layers"]}
                    extra = f" overhead={r['recm']['overhead']:+.4f} kept={kept}"
                print(f"[{time.perf_counter() - t_all:7.1f}s] {variant:7s} {method:4s} seed={seed} "
                      f"inst={r['inst']:.3f} cls={r['cls']:.3f} ({r['seconds']:.1f}s){extra}", flush=True)
        results[variant] = aggregate(runs)
        results["total_seconds"] = time.perf_counter() - t_all
        if cfg.json is not None:  # after each dataset, so a long run leaves its finished half behind
            cfg.json.parent.mkdir(parents=True, exist_ok=True)
            cfg.json.write_text(json.dumps(results, indent=1))
            print("wrote", cfg.json, flush=True)
    print(table(results), overhead_table(results), layer_table(results), sep="\n\n")
    if cfg.png_dir is not None and "recm" in cfg.methods and set(cfg.variants) == set(VARIANTS):
        cfg.png_dir.mkdir(parents=True, exist_ok=True)
        for path in plot_alphas(results, cfg.png_dir):
            print("wrote", path)
    return results


if __name__ == "__main__":
    main()
