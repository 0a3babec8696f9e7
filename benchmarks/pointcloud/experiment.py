"""Rotated vs aligned point clouds: RECM against VN, ES and RPP (paper section 5.1, Table 1, Figs 2 and 4, Table 4).

Trains a small VN-PointNet on the procedural stand-in for ModelNet40
(:mod:`benchmarks.pointcloud.data`). Datasets ("variants"):

- ``rotated``: the paper's protocol (the constraint-relaxation code it follows).
  Training clouds start in canonical pose and every batch gets, per cloud, a random
  per-axis scale in [2/3, 3/2] and shift in [-0.2, 0.2], a fresh Haar SO(3) rotation,
  random point dropout (a ratio drawn in [0, 0.875], dropped points replaced by the
  first point), a random scale in [0.8, 1.25] and a shift in [-0.1, 0.1]. Test clouds
  carry one Haar rotation each.
- ``aligned``: the same augmentations without the rotation; test clouds in canonical
  pose (three class pairs differ only by orientation, so breaking the symmetry pays).
- ``rotated_fixed``: one fixed Haar pose per training cloud, no augmentation (the
  protocol of our first tables).

Methods, with the same data, budget, seeds and inner optimizer (Adam, lr 1e-3):

- ``vn``: the equivariant VN-PointNet;
- ``es``: ``recm.EquivarianceSchedule`` with its penalty (0.01 x (Lie-derivative norm +
  branch norm)) and zero-initialised branch, direction maps relaxed too;
- ``rpp:<w>`` (``rpp:<w>:dec``): ``recm.ResidualPathwayPrior`` with residual prior ``w``,
  equivariant prior 1e-3, prior in the gradient (decoupled proximal step), every map relaxed;
- ``recm``: ``recm.RECMOptimizer`` at its defaults, told the run length (``a`` and its own step
  size derived from it; |C_G| = 2); ``recm:<a>`` sets ``a``, ``recm:<a>:<lr>`` also RECM's peak step size.

Usage::

    python -m benchmarks.pointcloud --quick
    python -m benchmarks.pointcloud --json docs/results/pointcloud.json --png-dir docs/results
    python -m benchmarks.pointcloud --from-json docs/results/pointcloud.json   # tables only
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import recm_opt as recm

from ..models.relaxed_vn import relaxed_vn_pointnet, vn_pointnet
from ..models.vn import evaluate
from ..progress import announce, expected, progress, write
from ..stats import t_interval  # noqa: F401  (re-exported: generating_sets, tests)
from .data import CLASS_NAMES, load_split

VARIANTS = ("rotated", "aligned", "rotated_fixed")
DEFAULT_METHODS = ("vn", "es", "rpp:1e0", "rpp:1e2", "rpp:1e2:dec", "recm", "recm:1e-1")
FIXED_METHODS = ("vn", "es", "rpp:1e2", "recm", "recm:1e-1")
RECM_TERMS = ("weight", "bias", "noise")
Data = tuple[Tensor, Tensor]
ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------ augmentation
def augment(points: Tensor, gen: torch.Generator, rotate: bool) -> Tensor:
    """The paper's training augmentations of a batch ``(B, N, 3)`` (see the module docstring)."""
    b, n, _ = points.shape
    u = lambda *shape, lo, hi: lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=points.dtype)  # noqa: E731
    x = points * u(b, 1, 3, lo=2 / 3, hi=3 / 2) + u(b, 1, 3, lo=-0.2, hi=0.2)
    if rotate:  # row vectors: x -> x R^T
        rot = recm.SO3Generators().sample(b, gen).to(points.dtype)
        x = torch.einsum("bnj,bij->bni", x, rot)
    ratio = u(b, 1, lo=0.0, hi=0.875)
    drop = torch.rand(b, n, generator=gen, dtype=points.dtype) <= ratio
    x = torch.where(drop[..., None], x[:, :1].expand_as(x), x)
    return x * u(b, 1, 1, lo=0.8, hi=1.25) + u(b, 1, 3, lo=-0.1, hi=0.1)


# ------------------------------------------------------------------ methods
def parse_method(method: str) -> dict[str, Any]:
    """``"rpp:1e2:dec"`` -> ``{"kind": "rpp", "residual_prior": 100.0, "decoupled": True}``."""
    parts = method.split(":")
    if parts[0] in ("vn", "es", "recm") and len(parts) == 1:
        return {"kind": parts[0]}
    if parts[0] == "recm" and len(parts) == 2:
        return {"kind": "recm", "a": float(parts[1])}
    if parts[0] == "recm" and len(parts) == 3:  # recm:<a>:<RECM's peak step size>
        return {"kind": "recm", "a": float(parts[1]), "lr": float(parts[2])}
    if parts[0] == "rpp" and len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "dec"):
        return {"kind": "rpp", "residual_prior": float(parts[1]), "decoupled": len(parts) == 3}
    raise ValueError(f"method must be vn, es, recm, recm:<a>, recm:<a>:<lr>, rpp:<w> or rpp:<w>:dec, got {method!r}")


def _inner(params: Any, lr: float, inner: str) -> torch.optim.Optimizer:
    """The optimizer of the model's weights: Adam (the paper's), or SGD with momentum 0.9."""
    if inner == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def build(method: str, channels: tuple[int, ...], total_steps: int, lr: float,
          group: recm.Group | None = None, inner_name: str = "adam") -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of one method (the caller seeds torch first)."""
    spec = parse_method(method)
    n_classes = len(CLASS_NAMES)
    if spec["kind"] == "vn":
        model = vn_pointnet(n_classes, channels)
        return model, _inner(model.parameters(), lr, inner_name)
    model = relaxed_vn_pointnet(n_classes, channels, method=spec["kind"])
    inner = _inner(model.parameters(), lr, inner_name)
    if spec["kind"] == "es":
        return model, recm.EquivarianceSchedule(inner, model, total_steps=total_steps)
    if spec["kind"] == "rpp":
        return model, recm.ResidualPathwayPrior(inner, model, residual_prior=spec["residual_prior"],
                                                decoupled=spec["decoupled"])
    example = torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(0))  # sizes r_theta, no global RNG
    settings = {k: spec[k] for k in ("a", "lr") if k in spec}  # the others derive from the run length
    return model, recm.RECMOptimizer(inner, model, group=group or recm.SO3Generators(), target=recm.Invariant("b"),
                                     example=example, total_steps=total_steps, **settings)


def recm_alphas(opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """``{layer: [alpha_weight, alpha_bias, alpha_noise]}`` of a RECM optimizer, else ``{}``."""
    if type(opt) is not recm.RECMOptimizer:
        return {}
    return {row["name"]: [row["alpha"][t] for t in RECM_TERMS] for row in opt.report()}


def branch_ratio(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """RPP: ``||theta_un|| / ||theta_eq||`` over the tagged layers (how far from equivariant it ended)."""
    assert isinstance(opt, recm.ResidualPathwayPrior)
    ids = {id(p): s for p, s in opt.prior_parameters()}
    un = sum(float(p.detach().pow(2).sum()) for p in model.parameters() if ids.get(id(p)) == opt.residual_prior)
    eq = sum(float(p.detach().pow(2).sum()) for p in model.parameters() if ids.get(id(p)) == opt.equivariant_prior)
    return math.sqrt(un / eq) if eq else float("nan")


# ----------------------------------------------------------------- training
def train(model: nn.Module, opt: torch.optim.Optimizer, data: Data, variant: str, epochs: int, batch_size: int,
          seed: int, log_every: int) -> tuple[list[int], list[dict[str, list[float]]], list[float]]:
    """Train with cross-entropy (+ ES's penalty); return logged steps, RECM alphas there, epoch losses."""
    points, labels = data
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(10_000 + seed)
    steps, history, losses, step = [0], [recm_alphas(opt)], [], 0
    for _ in range(epochs):
        model.train()
        perm, total = torch.randperm(len(points), generator=gen), 0.0
        for i in range(0, len(points), batch_size):
            idx = perm[i : i + batch_size]
            x = points[idx]
            if variant != "rotated_fixed":
                x = augment(x, aug_gen, rotate=variant == "rotated")
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            total += float(loss.detach()) * len(idx)
            if isinstance(opt, recm.EquivarianceSchedule):
                loss = loss + opt.regularizer()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(opt, recm.RECMOptimizer):
                opt.step(target=labels[idx])
            else:
                opt.step()
            step += 1
            if step % log_every == 0:
                steps.append(step)
                history.append(recm_alphas(opt))
        losses.append(total / len(points))
    return steps, history, losses


def recm_summary(model: nn.Module, opt: recm.RECMOptimizer, test: Data) -> dict[str, Any]:
    """Per-layer final alphas and pruning, the parameter overhead, and a check that export == eval."""
    rows = opt.report()
    model.eval()
    exported = recm.export(model)
    with torch.no_grad():
        x = test[0][:16]
        export_err = float((exported(x) - model(x)).abs().max())
    layers = [{"name": r["name"], **{f"alpha_{t}": r["alpha"][t] for t in RECM_TERMS}, "pruned": r["pruned"],
               "beta": r["beta"]} for r in rows]
    return {"layers": layers, "overhead": recm.parameter_overhead(rows, model), "export_max_abs_err": export_err}


def split_data(variant: str, cfg: argparse.Namespace) -> tuple[Data, Data]:
    """Training clouds (canonical pose unless ``rotated_fixed``) and test clouds of a variant."""
    train_kind = "rotated" if variant == "rotated_fixed" else "aligned"
    test_kind = "aligned" if variant == "aligned" else "rotated"
    return (load_split("train", train_kind, cfg.n_train, cfg.data_seed),
            load_split("test", test_kind, cfg.n_test, cfg.data_seed))


def run_one(method: str, variant: str, seed: int, train_data: Data, test_data: Data, cfg: argparse.Namespace,
            group: recm.Group | None = None) -> dict[str, Any]:
    """Train and evaluate one (method, dataset, seed)."""
    steps_per_epoch = math.ceil(len(train_data[0]) / cfg.batch_size)
    torch.manual_seed(seed)
    model, opt = build(method, cfg.channels, cfg.epochs * steps_per_epoch, cfg.lr, group, getattr(cfg, "inner", "adam"))
    t0 = time.perf_counter()
    steps, history, losses = train(model, opt, train_data, variant, cfg.epochs, cfg.batch_size, seed, cfg.log_every)
    seconds = time.perf_counter() - t0
    result = evaluate(model, test_data)
    out: dict[str, Any] = {"inst": result["instance_acc"], "cls": result["class_acc"], "seconds": seconds,
                           "train_loss": losses}
    if type(opt) is recm.RECMOptimizer:
        out["recm"] = recm_summary(model, opt, test_data)
        out["steps"], out["alpha_history"] = steps, history
    if isinstance(opt, recm.ResidualPathwayPrior):
        out["branch_ratio"] = branch_ratio(model, opt)
    return out


# ------------------------------------------------------------------ statistics
def paired(results: dict[str, Any], variant: str, a: str, b: str, key: str = "inst") -> dict[str, Any]:
    """``a - b`` per seed (percentage points), its mean, 95 % CI and whether the CI covers 0."""
    xs, ys = results[variant]["methods"][a][key], results[variant]["methods"][b][key]
    diffs = [100 * (x - y) for x, y in zip(xs, ys)]
    mean, lo, hi = t_interval(diffs)
    return {"a": a, "b": b, "mean": mean, "lo": lo, "hi": hi, "within_noise": bool(lo <= 0 <= hi),
            "n": len(diffs)}


def mean_ci(xs: list[float]) -> str:
    """``mean ± half-width of the 95 % t-interval`` in percent."""
    mean, lo, hi = t_interval([100 * x for x in xs])
    return f"{mean:5.1f} ± {(hi - lo) / 2:4.1f}" if len(xs) > 1 else f"{mean:5.1f}"


def accuracy_table(results: dict[str, Any], variants: tuple[str, ...]) -> str:
    """Instance / class accuracy per method (mean ± 95 % CI half-width over seeds)."""
    head = " | ".join(f"{v} inst | {v} cls" for v in variants)
    lines = [f"| method | {head} |", "|---|" + "---|" * (2 * len(variants))]
    methods = [m for m in results["config"]["methods"] if all(m in results.get(v, {}).get("methods", {})
                                                              for v in variants)]
    for m in methods:
        cells = [mean_ci(results[v]["methods"][m][k]) for v in variants for k in ("inst", "cls")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, Any], variants: tuple[str, ...]) -> str:
    """RECM minus each other method, instance accuracy, paired over seeds."""
    lines = ["| dataset | comparison | mean diff (pts) | 95 % CI | verdict |", "|---|---|---|---|---|"]
    for v in variants:
        for p in results.get(v, {}).get("paired", []):
            verdict = "within noise" if p["within_noise"] else ("RECM better" if p["mean"] > 0 else "RECM worse")
            lines.append(f"| {v} | {p['a']} - {p['b']} | {p['mean']:+.1f} | [{p['lo']:+.1f}, {p['hi']:+.1f}] | "
                         f"{verdict} |")
    return "\n".join(lines)


def overhead_table(results: dict[str, Any]) -> str:
    """Table-4-style: RECM's inference-parameter overhead and the kept terms per dataset."""
    lines = ["| dataset | method | parameter overhead (mean over seeds) | per seed | kept terms (layer:term, seeds) |",
             "|---|---|---|---|---|"]
    for v, method in [(var, m) for var in VARIANTS for m in results.get(var, {}).get("recm", {})]:
        runs = results[v]["recm"][method]["runs"]
        ov = [r["overhead"] for r in runs]
        kept: dict[str, int] = {}
        for r in runs:
            for la in r["layers"]:
                for t in RECM_TERMS:
                    if t not in la["pruned"]:
                        kept[f"{la['name']}:{t}"] = kept.get(f"{la['name']}:{t}", 0) + 1
        kept_s = ", ".join(f"{k} ({n})" for k, n in sorted(kept.items())) or "none"
        lines.append(f"| {v} | {method} | {sum(ov) / len(ov):+.4f} | {', '.join(f'{x:+.3f}' for x in ov)} | {kept_s} |")
    return "\n".join(lines)


def rpp_table(results: dict[str, Any]) -> str:
    """RPP's final ``||theta_un|| / ||theta_eq||`` per configuration and dataset (mean over seeds)."""
    lines = ["| dataset | method | ||theta_un|| / ||theta_eq|| (mean, min-max) |", "|---|---|---|"]
    for v in VARIANTS:
        for m, r in results.get(v, {}).get("methods", {}).items():
            if "branch_ratio" in r:
                xs = r["branch_ratio"]
                lines.append(f"| {v} | {m} | {sum(xs) / len(xs):.2e} ({min(xs):.1e} - {max(xs):.1e}) |")
    return "\n".join(lines)


def tables(results: dict[str, Any]) -> str:
    """Every table of a run, as markdown."""
    main = tuple(v for v in ("rotated", "aligned") if v in results)
    out = []
    if main:
        out += ["Main protocol (fresh augmentations):", accuracy_table(results, main), paired_table(results, main)]
    if "rotated_fixed" in results:
        out += ["Fixed poses:", accuracy_table(results, ("rotated_fixed",)), paired_table(results, ("rotated_fixed",))]
    out += [overhead_table(results), rpp_table(results)]
    return "\n\n".join(out)


def plot_alphas(results: dict[str, Any], png_dir: Path, method: str = "recm", stem: str = "pointcloud") -> list[Path]:
    """Figures 2 and 4: RECM's alpha_W, alpha_b (one figure) and alpha_noise (another), per layer and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if method in results.get(v, {}).get("recm", {})]
    tag = "" if method == "recm" else "_" + method.replace(":", "_a")
    paths: list[Path] = []
    if not variants:
        return paths
    for terms, fname in [(("weight", "bias"), f"{stem}_alpha_wb.png"), (("noise",), f"{stem}_alpha_noise.png")]:
        fig, axes = plt.subplots(len(terms), len(variants), figsize=(5 * len(variants), 3.2 * len(terms)),
                                 squeeze=False, sharex="col")
        for col, variant in enumerate(variants):
            hist = results[variant]["recm"][method]["history"]
            for row, term in enumerate(terms):
                ax, k = axes[row][col], RECM_TERMS.index(term)
                for j, name in enumerate(hist["alpha"][0][0]):
                    for s, seed_hist in enumerate(hist["alpha"]):
                        ax.plot(hist["steps"], [h[name][k] for h in seed_hist], color=f"C{j}", lw=1, alpha=0.7,
                                label=name if s == 0 else None)
                ax.axhline(0.01, color="k", ls=":", lw=0.8)
                ax.axhline(-0.01, color="k", ls=":", lw=0.8)
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.set_title(f"{variant}: alpha_{term}")
                ax.set_xlabel("optimizer step")
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"{method}: alpha per layer over training (every seed; dotted: prune threshold 0.01)", fontsize=9)
        fig.tight_layout()
        path = png_dir / fname.replace(".png", f"{tag}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets a smoke-test budget."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], epilog=expected(
        "on one core, about 80 s per run: 94 min for the main table (Rotated and Aligned, 7 methods, 5 seeds), "
        "44 min for fixed poses; seconds with --quick"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, one epoch, two seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    p.add_argument("--fixed-methods", nargs="+", default=list(FIXED_METHODS),
                   help="the methods run on rotated_fixed (a subset of --methods)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None, help="training clouds per class")
    p.add_argument("--n-test", type=int, default=None, help="test clouds per class")
    p.add_argument("--channels", type=int, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inner", choices=["adam", "sgd"], default="adam",
                   help="the optimizer of the model's weights (SGD: momentum 0.9, at --lr)")
    p.add_argument("--log-every", type=int, default=None, help="alpha logging period in steps")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png-dir", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="print the tables (and plots) of a saved run")
    cfg = p.parse_args(argv)
    quick = {"epochs": 1, "n_train": 2, "n_test": 2, "log_every": 2, "seeds": [0, 1], "channels": [4, 4],
             "methods": ["vn", "es", "rpp:1e2", "recm"], "variants": ["rotated", "aligned"]}
    full = {"epochs": 10, "n_train": 40, "n_test": 25, "log_every": 10, "seeds": [0, 1, 2, 3, 4],
            "channels": [8, 16, 32], "methods": list(DEFAULT_METHODS), "variants": list(VARIANTS)}
    for k, v in (quick if cfg.quick else full).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.channels = tuple(cfg.channels)
    for m in cfg.methods:
        parse_method(m)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (dataset, method, seed), print the tables, write JSON and figures."""
    cfg = parse_args(argv)
    if cfg.from_json is not None:
        results = json.loads(cfg.from_json.read_text())
        print(tables(results))
        if cfg.png_dir is not None:
            for method in ("recm", "recm:1e-1"):
                for path in plot_alphas(results, cfg.png_dir, method, cfg.from_json.stem):
                    print("wrote", path)
        return results
    torch.set_num_threads(1)
    args = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {
        "command": "python -m benchmarks.pointcloud " + " ".join(shlex.quote(a) for a in args),
        "commit": git_commit(),
        "machine": "CPU, 1 thread (2 shared cores)",
        "config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                   for k, v in vars(cfg).items()},
    }
    t_all = time.perf_counter()
    plan = {v: [m for m in cfg.methods if v != "rotated_fixed" or m in cfg.fixed_methods] for v in cfg.variants}
    total = len(cfg.seeds) * sum(len(ms) for ms in plan.values())
    announce("seconds" if cfg.quick else f"about {total * 80 / 60:.0f} min for {total} runs on one core (80 s each)")
    bar = iter(progress(range(total + 1), total=total, desc="runs"))
    next(bar)
    for variant in cfg.variants:
        train_data, test_data = split_data(variant, cfg)
        methods = plan[variant]
        runs = {m: [] for m in methods}
        for seed in cfg.seeds:
            for method in methods:
                r = run_one(method, variant, seed, train_data, test_data, cfg)
                next(bar, None)
                runs[method].append(r)
                extra = f" overhead={r['recm']['overhead']:+.4f}" if "recm" in r else ""
                extra += f" branch_ratio={r['branch_ratio']:.2e}" if "branch_ratio" in r else ""
                write(f"[{time.perf_counter() - t_all:7.1f}s] {variant:13s} {method:11s} seed={seed} "
                      f"inst={r['inst']:.3f} cls={r['cls']:.3f} ({r['seconds']:.1f}s){extra}")
        entry: dict[str, Any] = {"methods": {
            m: {"inst": [r["inst"] for r in rs], "cls": [r["cls"] for r in rs],
                "seconds": [r["seconds"] for r in rs], "final_train_loss": [r["train_loss"][-1] for r in rs],
                **({"branch_ratio": [r["branch_ratio"] for r in rs]} if "branch_ratio" in rs[0] else {})}
            for m, rs in runs.items()}}
        entry["recm"] = {m: {"runs": [r["recm"] for r in rs], "history": {
            "steps": rs[0]["steps"], "alpha": [r["alpha_history"] for r in rs]}}
            for m, rs in runs.items() if "recm" in rs[0]}
        entry["paired"] = [paired({variant: entry}, variant, a, m) for a in entry["recm"] for m in runs
                           if m not in entry["recm"]]
        results[variant] = entry
        results["total_seconds"] = time.perf_counter() - t_all
        if cfg.json is not None:  # after each dataset, so a long run leaves its finished part behind
            cfg.json.parent.mkdir(parents=True, exist_ok=True)
            cfg.json.write_text(json.dumps(results, indent=1))
            print("wrote", cfg.json, flush=True)
    print(tables(results))
    if cfg.png_dir is not None:
        cfg.png_dir.mkdir(parents=True, exist_ok=True)
        for method in [m for m in cfg.methods if parse_method(m)["kind"] == "recm"]:
            for path in plot_alphas(results, cfg.png_dir, method, cfg.json.stem if cfg.json else "pointcloud"):
                print("wrote", path)
    return results
