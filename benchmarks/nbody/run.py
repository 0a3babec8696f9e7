"""N-body symmetry experiments: SEGNN with RECM and ES, clipped vs symmetric physics, a field-broken system.

Experiments (each writes one JSON holding every number its docs use):

- ``segnn``: SEGNN, SEGNN + RECM and SEGNN + ES (the library's ``EquivarianceSchedule``)
  on the reference data (per-component force clip), next to the published Table 2.
- ``clipping``: EGNN and SEGNN, each plain and with RECM, on the reference data and on
  the variant that clips forces by their norm (rotation-equivariant physics). Also
  measures each variant's equivariance floor and reports the final alphas and kept terms.
- ``field``: charges in a uniform field E along z, E in ``--fields``; EGNN, EGNN + RECM and
  a non-equivariant GNN on coordinates, all with the charge as a node input; norm clip
  so E = 0 is exactly symmetric.

Every comparison uses the same seeds for each method; the JSON holds per-seed values,
paired differences with 95% t-intervals, and the test MSE at the best-validation
epoch and at the final epoch. Finished runs are cached (``$RECM_OPT_CACHE/nbody_runs``),
so an experiment re-run with the same settings only assembles.

Usage::

    python -m benchmarks.nbody.run segnn --quick --json /tmp/segnn.json
    OMP_NUM_THREADS=1 python -m benchmarks.nbody.run segnn --json docs/results/nbody_segnn.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.nbody import data as nd
from benchmarks.nbody.floor import equivariance_floor
from benchmarks.nbody.train import mean_sd, paired, train_run
from benchmarks.progress import announce, expected, progress

EXPERIMENTS = ("segnn", "clipping", "field")
PUBLISHED = {"EGNN": 0.0071, "SEGNN": 0.0056, "SEGNN+ES": 0.0049, "SEGNN+RECM": 0.0037, "linear": 0.0819}
PUBLISHED_BUDGET = ("3000/2000/2000 train/valid/test simulations, SEGNN 4 layers, 64 hidden features, lmax 1, "
                    "batch 100, lr 5e-4, weight decay 1e-12, up to 1000 epochs (SEGNN reference set-up)")
FULL = {"seeds": [0, 1, 2, 3, 4], "epochs": 40, "n_train": 500, "n_valid": 300, "n_test": 500, "batch_size": 50,
        "lr": 1e-3, "fields": [0.0, 0.1, 1.0], "floor_sims": 500, "floor_rot": 8,
        "egnn": {"hidden": 32, "n_layers": 4}, "segnn": {"hidden": "16x0e+8x1o", "n_layers": 4},
        "gnn": {"hidden": 32, "n_layers": 4}}
QUICK = {**FULL, "seeds": [0, 1], "epochs": 2, "n_train": 20, "n_valid": 10, "n_test": 10, "batch_size": 10,
         "fields": [0.0, 1.0], "floor_sims": 8, "floor_rot": 3,
         "egnn": {"hidden": 8, "n_layers": 2}, "segnn": {"hidden": "4x0e+2x1o", "n_layers": 2},
         "gnn": {"hidden": 8, "n_layers": 2}}


def _runs_dir() -> Path:
    return nd.cache_dir().parent / "nbody_runs"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), python {platform.python_version()}"


class Runner:
    """Loads data variants once and runs (or loads from the run cache) single training runs."""

    def __init__(self, cfg: dict[str, Any], log: Any = sys.stdout, total: int | None = None) -> None:
        self.cfg, self.log, self._data = cfg, log, {}
        self._bar = iter(progress(range(total + 1), total=total, desc="runs")) if total else None
        if self._bar is not None:
            next(self._bar)

    def data(self, clip: str, field: float) -> dict[str, dict[str, torch.Tensor]]:
        key = (clip, field)
        if key not in self._data:
            self._data[key] = {s: nd.load_split(s, self.cfg[f"n_{s}"], 0, clip, field)
                               for s in ("train", "valid", "test")}
        return self._data[key]

    def run(self, arch: str, method: str, clip: str, field: float, seed: int, charge: bool) -> dict[str, Any]:
        c = self.cfg
        spec = {"arch": arch, "method": method, "clip": clip, "field": field, "seed": seed, "charge": charge,
                **{k: c[k] for k in ("epochs", "n_train", "n_valid", "n_test", "batch_size", "lr")},
                "model": c[arch]}
        if method == "recm":  # runs cached before RECM stepped its own parameters are not reused
            spec["recm_update"] = "own-adam, defaults from the run length"
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        path = _runs_dir() / f"{arch}_{method}_{digest}.json"
        if path.exists():
            if self._bar is not None:
                next(self._bar, None)
            return json.loads(path.read_text())
        res = train_run(arch, method, self.data(clip, field), c["epochs"], seed, c["batch_size"], c["lr"],
                        charge_feature=charge, model_kw=c[arch], log=self.log)
        res["spec"] = spec
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
        if self._bar is not None:
            next(self._bar, None)
        return res


def _alpha_curve(run: dict[str, Any]) -> dict[str, list[float]]:
    """Per epoch, the largest |alpha| over layers, per term."""
    snaps = run["alpha_epochs"]
    terms = list(next(iter(snaps[0].values())))
    return {t: [float(f"{max(abs(s[lay][t]) for lay in s):.4g}") for s in snaps] for t in terms}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed lists and mean/sd of one (arch, method, variant) over seeds."""
    out: dict[str, Any] = {
        "test_at_best": [r["test_at_best"] for r in runs], "test_final": [r["test_final"] for r in runs],
        "best_val": [r["best_val"] for r in runs], "val_final": [r["val_final"] for r in runs],
        "best_epoch": [r["best_epoch"] for r in runs], "wall_s": [round(r["wall_s"], 1) for r in runs],
        "val_curve_seed0": [float(f"{v:.5g}") for v in runs[0]["val_mse"]],
    }
    for key in ("test_at_best", "test_final", "best_val", "val_final"):
        out[f"{key}_mean_sd"] = mean_sd(out[key])
    if "final_alpha" in runs[0]:
        out["final_alpha"] = [r["final_alpha"] for r in runs]
        out["kept"] = [r["kept"] for r in runs]
        out["n_kept_terms"] = [sum(len(v) for v in r["kept"].values()) for r in runs]
        out["max_abs_alpha"] = [r["max_abs_alpha"] for r in runs]
        out["param_overhead"] = [r["param_overhead"] for r in runs]
        out["alpha_curve"] = [_alpha_curve(r) for r in runs]
    return out


def compare(blocks: dict[str, Any], base: str, other: str) -> dict[str, Any]:
    """Paired differences ``other - base`` at the best-validation and at the final epoch."""
    return {when: paired(blocks[base][when], blocks[other][when]) for when in ("test_at_best", "test_final")}


def exp_segnn(r: Runner, cfg: dict[str, Any]) -> dict[str, Any]:
    """SEGNN vs SEGNN + RECM vs SEGNN + ES on the reference data."""
    blocks = {m: summarise([r.run("segnn", m, "component", 0.0, s, False) for s in cfg["seeds"]])
              for m in ("plain", "recm", "es")}
    train = r.data("component", 0.0)["train"]
    c = nd.fit_linear(train)
    return {"models": blocks, "recm_vs_plain": compare(blocks, "plain", "recm"),
            "es_vs_plain": compare(blocks, "plain", "es"), "recm_vs_es": compare(blocks, "es", "recm"),
            "linear_test_mse": nd.linear_test_mse(c, r.data("component", 0.0)["test"]),
            "published": PUBLISHED, "published_budget": PUBLISHED_BUDGET}


def exp_clipping(r: Runner, cfg: dict[str, Any], archs: list[str], clips: list[str]) -> dict[str, Any]:
    """EGNN/SEGNN, plain and RECM, on per-component vs norm clipping, with each variant's floor."""
    out: dict[str, Any] = {"floor": {}, "models": {}, "recm_vs_plain": {}}
    for clip in clips:
        out["floor"][clip] = equivariance_floor(cfg["floor_sims"], cfg["floor_rot"], clip)
        for arch in archs:
            key = f"{arch}/{clip}"
            blocks = {m: summarise([r.run(arch, m, clip, 0.0, s, False) for s in cfg["seeds"]])
                      for m in ("plain", "recm")}
            out["models"][key] = blocks
            out["recm_vs_plain"][key] = compare(blocks, "plain", "recm")
    return out


def exp_field(r: Runner, cfg: dict[str, Any]) -> dict[str, Any]:
    """EGNN, EGNN + RECM and the non-equivariant GNN over field strengths (norm clip, charge as input)."""
    out: dict[str, Any] = {"floor": {}, "models": {}, "recm_vs_egnn": {}, "gnn_vs_egnn": {}, "gnn_vs_recm": {}}
    models = cfg.get("models", ["egnn", "egnn_recm", "gnn"])
    for field in cfg["fields"]:
        key = f"{field:g}"
        if cfg.get("floor", True):
            out["floor"][key] = equivariance_floor(cfg["floor_sims"], cfg["floor_rot"], "norm", field)
        blocks = {name: summarise([r.run(arch, m, "norm", field, s, True) for s in cfg["seeds"]])
                  for name, arch, m in (("egnn", "egnn", "plain"), ("egnn_recm", "egnn", "recm"),
                                        ("gnn", "gnn", "plain")) if name in models}
        out["models"][key] = blocks
        for name, base, other in (("recm_vs_egnn", "egnn", "egnn_recm"), ("gnn_vs_egnn", "egnn", "gnn"),
                                  ("gnn_vs_recm", "egnn_recm", "gnn")):
            if base in blocks and other in blocks:
                out[name][key] = compare(blocks, base, other)
    return out


def plot_field(result: dict[str, Any], path: Path) -> None:
    """Alpha over training (largest |alpha| over layers, per term, mean over seeds) per field strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(result["models"])
    fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 3.8), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], fields):
        curves = result["models"][key]["egnn_recm"]["alpha_curve"]
        for term, ls in (("weight", "-"), ("bias", "--"), ("noise", ":")):
            ys = torch.tensor([c[term] for c in curves]).mean(0).clamp(min=1e-6)
            ax.plot(range(1, len(ys) + 1), ys, ls, label=term)
        ax.axhline(0.01, color="k", lw=0.8, label="prune eps 0.01")
        ax.set(yscale="log", xlabel="epoch", title=f"EGNN + RECM, field E = {key}")
    axes[0][0].set_ylabel("max over layers |alpha| (mean of seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Indented JSON with every list of plain values kept on one line."""
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs one experiment and returns (and optionally writes) its result dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=expected(
        "on one core, 5 seeds: segnn about 41 min, clipping --archs egnn about 19 min, clipping --archs segnn "
        "--clips norm about 14 min, field about 26 min; --quick under a minute; cached runs are not redone"))
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a test runs it)")
    p.add_argument("--archs", nargs="+", default=["egnn", "segnn"], help="clipping: architectures to run")
    p.add_argument("--clips", nargs="+", default=list(nd.CLIPS), help="clipping: force clips to run")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--png", type=Path, help="field: write the alpha-over-training figure here")
    p.add_argument("--fields", nargs="+", type=float, help="field: the field strengths (default 0, 0.1, 1)")
    p.add_argument("--models", nargs="+", choices=["egnn", "egnn_recm", "gnn"], help="field: the models to run")
    p.add_argument("--no-floor", action="store_true", help="field: skip the equivariance-floor measurement")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.fields:
        cfg["fields"] = args.fields
    if args.models:
        cfg["models"] = args.models
    if args.no_floor:
        cfg["floor"] = False
    seeds = len(cfg["seeds"])
    field_models = len(cfg.get("models", ("egnn", "egnn_recm", "gnn")))
    total = {"segnn": 3 * seeds, "clipping": 2 * seeds * len(args.archs) * len(args.clips),
             "field": field_models * seeds * len(cfg["fields"])}[args.experiment]
    announce("under a minute" if args.quick else {"segnn": "about 41 min", "field": "about 26 min"}.get(
        args.experiment, f"about {19 * total / 20:.0f} min (EGNN; SEGNN takes about twice as long per run)")
        + " on one core, less for runs already cached")
    start = time.perf_counter()
    runner = Runner(cfg, total=total)
    if args.experiment == "segnn":
        result = exp_segnn(runner, cfg)
    elif args.experiment == "clipping":
        result = exp_clipping(runner, cfg, args.archs, args.clips)
    else:
        result = exp_field(runner, cfg)
    argv_used = sys.argv[1:] if argv is None else argv
    result = {"command": "OMP_NUM_THREADS=1 python -m benchmarks.nbody.run " + " ".join(argv_used),
              "git_commit": _git_commit(), "machine": machine() + " (2 shared cores, other jobs running)",
              "config": cfg, "wall_s_this_invocation": round(time.perf_counter() - start, 1), **result}
    if args.json:
        write_json(result, args.json)
    if args.png and args.experiment == "field":
        plot_field(result, args.png)
    return result


if __name__ == "__main__":
    main()
