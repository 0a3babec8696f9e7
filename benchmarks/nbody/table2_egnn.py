"""Charged 5-body with EGNN, with and without RECM, against the published numbers.

Models (same data, epochs, batches, seeds and equivariant initialisation):

- ``egnn``: the plain EGNN of :mod:`benchmarks.models.egnn` with Adam.
- ``egnn_recm``: the same network with every layer's node- and coordinate-update
  map ``@relaxed`` (candidates on the raw coordinates and velocities), trained
  with ``RECMOptimizer`` at its defaults and the target declared as a per-node
  3-vector ``Vector("n xyz")``.
- ``egnn_es``: the same relaxed network under the triangle-schedule policy of
  :mod:`recm_opt.policies`, with the branch dropped at test. If the policy is not
  importable the model is recorded as not run.

Each run selects the epoch on validation MSE and reports the test MSE of that
epoch (evaluated when the epoch is reached, because RECM's state h lives in
buffers that a parameter snapshot would not restore).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.nbody.table2_egnn --quick --json /tmp/nbody_quick.json
    OMP_NUM_THREADS=1 python -m benchmarks.nbody.table2_egnn --seeds 0 1 2 --epochs 250 \\
        --json docs/results/nbody.json --png docs/results/nbody_alpha.png
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import recm_opt as recm
from benchmarks.models import egnn
from benchmarks.nbody import data as nd
from benchmarks.nbody.train import evaluate as _evaluate
from benchmarks.nbody.train import predict as _predict
from benchmarks.progress import announce, expected, progress, write

MODELS = ("egnn", "egnn_recm", "egnn_es")
TARGET = recm.Vector("n xyz")  # per-node 3-vector target (flattened-node layout)
QUICK = {"seeds": [0], "epochs": 15}
FULL = {"seeds": [0, 1, 2], "epochs": 250}
PUBLISHED = {"SE(3)-Transformer": 0.0244, "Radial Field": 0.0104, "EGNN": 0.0071, "SEGNN": 0.0056,
             "SEGNN+RECM": 0.0037, "linear": 0.0819}


# ----------------------------------------------------------------- optimizers
def es_policy() -> tuple[Any, str]:
    """Returns ``recm_opt.policies.EquivarianceSchedule`` (the triangle schedule), or ``(None, why)``."""
    try:
        from recm_opt.policies import EquivarianceSchedule
    except ImportError as err:
        return None, f"recm_opt.policies.EquivarianceSchedule is not importable ({err})"
    return EquivarianceSchedule, ""


def example_graph(model: nn.Module) -> tuple[Tensor, ...]:
    """Inputs of one graph with one node and no edges: sizes RECM's ``r_theta`` (``example=``)."""
    w = model.embedding.weight
    edge_dim = model.layers[0].message.mlp[0].in_features - 2 * w.shape[0] - 2
    f = {"dtype": w.dtype, "device": w.device}
    idx = {"dtype": torch.long, "device": w.device}
    return (torch.zeros(1, w.shape[1], **f), torch.zeros(1, 3, **f), torch.zeros(1, 3, **f),
            torch.zeros(2, 0, **idx), torch.zeros(0, edge_dim, **f), torch.zeros(1, **idx))


def make_optimizer(name: str, model: nn.Module, total_steps: int, lr: float, wd: float) -> torch.optim.Optimizer:
    """Adam for ``egnn``; Adam wrapped by RECM or by the triangle-schedule policy otherwise."""
    inner = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "egnn":
        return inner
    if name == "egnn_recm":
        return recm.RECMOptimizer(inner, model, target=TARGET, example=example_graph(model))
    cls, why = es_policy()
    if cls is None:
        raise RuntimeError(why)
    # Same tagged layers, one-line swap: alpha follows the triangle over the whole run, 0 at test.
    return cls(inner, model, target=TARGET, total_steps=total_steps)


def build_model(name: str, seed: int) -> nn.Module:
    """An EGNN whose equivariant weights are identical across models for one seed.

    The relaxed model creates extra (candidate) parameters during construction,
    which would shift the RNG stream; copying the plain network's weights makes
    the three models start from the same equivariant network.
    """
    torch.manual_seed(seed)
    plain = egnn.EGNN()
    if name == "egnn":
        return plain
    model = egnn.EGNN(relaxed=True)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    candidates = ("un_weight", "un_bias", "noise_scale")
    assert not unexpected and all(any(c in k for c in candidates) for k in missing), (missing, unexpected)
    return model


# ------------------------------------------------------------------- training
def alpha_snapshot(opt: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    """``{layer: {term: alpha}}`` of every tagged layer (empty for a plain optimizer).

    For the triangle schedule this is the training-time alpha; its report shows the
    deployed alpha, which is 0 by construction.
    """
    if not hasattr(opt, "report"):
        return {}
    rows = opt.report()
    if hasattr(opt, "scheduled_alpha"):
        return {r["name"]: {term: opt.scheduled_alpha(r["name"]) for term in r["alpha"]} for r in rows}
    return {r["name"]: dict(r["alpha"]) for r in rows}


def _record_step(t: int, steps_per_epoch: int) -> bool:
    """Dense alpha records early (where RECM decides), then one per epoch."""
    return t <= 10 or (t <= 300 and t % 10 == 0) or t % steps_per_epoch == 0


def train(name: str, data: dict[str, dict[str, Tensor]], epochs: int, seed: int,
          batch_size: int = 100, lr: float = 5e-4, wd: float = 1e-12, log: Any = None) -> dict[str, Any]:
    """Trains one model and returns its history and test MSE at the best validation epoch."""
    model = build_model(name, seed)
    n_train = data["train"]["loc"].shape[0]
    steps_per_epoch = -(-n_train // batch_size)
    opt = make_optimizer(name, model, epochs * steps_per_epoch, lr, wd)
    relaxed = name != "egnn"
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, Any] = {"val_mse": [], "train_loss": [], "best_val": float("inf"), "alpha_steps": [],
                            "alpha": [], "train_time": 0.0}
    t = 0
    for epoch in progress(range(epochs), desc=f"{name} seed {seed}", unit="epoch", leave=False):
        model.train()
        start, losses = time.perf_counter(), []
        for idx in torch.randperm(n_train, generator=gen).split(batch_size):
            pred, y = _predict(model, data["train"], idx)
            loss = nn.functional.mse_loss(pred, y)
            opt.zero_grad()
            loss.backward()
            opt.step(target=y) if relaxed else opt.step()
            losses.append(loss.item())
            t += 1
            if relaxed and _record_step(t, steps_per_epoch):
                hist["alpha_steps"].append(t)
                hist["alpha"].append(alpha_snapshot(opt))
        hist["train_time"] += time.perf_counter() - start
        hist["train_loss"].append(sum(losses) / len(losses))
        hist["val_mse"].append(_evaluate(model, data["valid"]))
        if hist["val_mse"][-1] < hist["best_val"]:
            hist["best_val"], hist["best_epoch"] = hist["val_mse"][-1], epoch
            hist["test_mse"] = _evaluate(model, data["test"])
            hist["alpha_at_best"] = alpha_snapshot(opt)
        if log is not None and (epoch % 10 == 0 or epoch == epochs - 1):
            line = (f"[{name} seed {seed}] epoch {epoch}: train {hist['train_loss'][-1]:.5f} "
                    f"val {hist['val_mse'][-1]:.5f} best test {hist['test_mse']:.5f} "
                    f"({hist['train_time'] / (epoch + 1):.2f} s/epoch)")
            write(line) if log is sys.stdout else print(line, file=log, flush=True)
    hist["epoch_time"] = hist["train_time"] / epochs
    if relaxed:
        rows = opt.report()
        hist["final_alpha"] = {r["name"]: dict(r["alpha"]) for r in rows}
        hist["final_beta"] = {r["name"]: r["beta"] for r in rows}
        hist["kept"] = {r["name"]: r["kept"] for r in rows if r["kept"]}
        hist["param_overhead"] = recm.parameter_overhead(rows, model)
        # The exported (baked, pruned) model is what inference would ship.
        hist["final_test_mse_exported"] = _evaluate(recm.export(model), data["test"])
    return hist


# -------------------------------------------------------------------- summary
def _per_seed(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in runs]


def summarise(name: str, runs: list[dict[str, Any]], epochs: int, seeds: list[int]) -> dict[str, Any]:
    """The JSON block of one model: per-seed lists plus the alpha curves."""
    out: dict[str, Any] = {
        "seeds": seeds, "epochs": epochs, "test_mse": _per_seed(runs, "test_mse"),
        "best_val_mse": _per_seed(runs, "best_val"), "best_epoch": _per_seed(runs, "best_epoch"),
        "epoch_time_s": _per_seed(runs, "epoch_time"), "val_mse_curve": _per_seed(runs, "val_mse"),
    }
    if name == "egnn":
        return out
    layers = list(runs[0]["final_alpha"])
    terms = list(runs[0]["final_alpha"][layers[0]])
    out["final_alpha"] = {lay: {term: [r["final_alpha"][lay][term] for r in runs] for term in terms}
                          for lay in layers}
    out["final_beta"] = {lay: [r["final_beta"][lay] for r in runs] for lay in layers}
    out["max_abs_final_alpha"] = [max(abs(a) for d in r["final_alpha"].values() for a in d.values()) for r in runs]
    out["all_pruned"] = [not r["kept"] for r in runs]
    out["kept"] = _per_seed(runs, "kept")
    out["param_overhead"] = _per_seed(runs, "param_overhead")
    out["final_test_mse_exported"] = _per_seed(runs, "final_test_mse_exported")
    out["alpha_at_best"] = _per_seed(runs, "alpha_at_best")
    out["alpha_curves"] = [_curve(r) for r in runs]
    return out


def _curve(run: dict[str, Any]) -> dict[str, Any]:
    """One run's alpha snapshots as ``{"step": [..], "alpha": {layer: {term: [..]}}}`` (4 digits)."""
    snaps = run["alpha"]
    alpha = {lay: {term: [float(f"{s[lay][term]:.4g}") for s in snaps] for term in snaps[0][lay]}
             for lay in snaps[0]}
    return {"step": run["alpha_steps"], "alpha": alpha}


def stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def markdown_table(result: dict[str, Any]) -> str:
    """A Table-2-style markdown table: published test MSE beside ours (mean +- std over seeds)."""
    def ours(name: str) -> str:
        block = result.get(name, {})
        if "test_mse" not in block:
            return "not run"
        mean, std = stats(block["test_mse"])
        return f"{mean:.4f} ± {std:.4f} ({len(block['test_mse'])} seeds, {block['epochs']} epochs)"

    rows = [("Linear (x + c v)", PUBLISHED["linear"], f"{result['linear']['test_mse']:.4f} (c = "
             f"{result['linear']['c']:.4f})"),
            ("SE(3)-Transformer", PUBLISHED["SE(3)-Transformer"], "—"),
            ("Radial Field", PUBLISHED["Radial Field"], "—"),
            ("EGNN", PUBLISHED["EGNN"], ours("egnn")),
            ("EGNN + ES (triangle schedule, branch dropped at test)", None, ours("egnn_es")),
            ("EGNN + RECM", None, ours("egnn_recm")),
            ("SEGNN", PUBLISHED["SEGNN"], "—"),
            ("SEGNN + RECM", PUBLISHED["SEGNN+RECM"], "—")]
    lines = ["| Model | Published test MSE | Ours, test MSE |", "|---|---:|---:|"]
    lines += [f"| {m} | {'—' if p is None else f'{p:.4f}'} | {o} |" for m, p, o in rows]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Alpha curves (|alpha| per layer and term, seed 0) and validation MSE per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relaxed = [m for m in ("egnn_recm", "egnn_es") if "alpha_curves" in result.get(m, {})]
    fig, axes = plt.subplots(1, len(relaxed) + 1, figsize=(6 * (len(relaxed) + 1), 4.5))
    axes = list(axes) if len(relaxed) else [axes]
    styles = {"weight": "-", "bias": "--", "noise": ":"}
    for ax, name in zip(axes, relaxed):
        curve = result[name]["alpha_curves"][0]
        for li, layer in enumerate(curve["alpha"]):
            for term, ls in styles.items():
                ys = [max(abs(a), 1e-12) for a in curve["alpha"][layer][term]]
                ax.plot(curve["step"], ys, ls, color=f"C{li}", lw=1, label=f"{layer} {term}" if term == "weight"
                        else None)
        ax.axhline(0.01, color="k", lw=0.8, label="prune eps = 0.01")
        es = name == "egnn_es"  # a triangle reads best on linear axes
        what = "training-time alpha (triangle), 0 at test" if es else "alpha"
        ax.set(xscale="linear" if es else "log", yscale="linear" if es else "log", xlabel="optimizer step",
               ylabel="|alpha| (- weight, -- bias, : noise)", title=f"{name}: {what}, seed {result[name]['seeds'][0]}")
        if not es:  # every ES curve is the same triangle
            ax.legend(fontsize=6, loc="lower right")
    ax = axes[-1]
    for name in MODELS:
        if "val_mse_curve" in result.get(name, {}):
            ax.plot(range(1, len(result[name]["val_mse_curve"][0]) + 1), result[name]["val_mse_curve"][0],
                    label=name)
    ax.axhline(PUBLISHED["EGNN"], color="k", ls="--", lw=0.8, label="EGNN published 0.0071")
    ax.set(yscale="log", xlabel="epoch", ylabel="validation MSE", title="validation MSE, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=expected(
        "about 64 min on one core for the three models (3 seeds, 250 epochs), 1.5 min with --quick"))
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (full default {FULL['seeds']})")
    p.add_argument("--epochs", type=int, help=f"epochs per run (full default {FULL['epochs']})")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--png", type=Path, help="write the alpha curves here")
    p.add_argument("--merge", action="store_true", help="add these models to an existing --json file")
    p.add_argument("--plot-only", action="store_true", help="redraw --png (and print the table) from --json")
    p.add_argument("--n-train", type=int, default=nd.SPLIT_SIZES["train"])
    p.add_argument("--n-valid", type=int, default=nd.SPLIT_SIZES["valid"])
    p.add_argument("--n-test", type=int, default=nd.SPLIT_SIZES["test"])
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.seeds = args.seeds or mode["seeds"]
    args.epochs = args.epochs or mode["epochs"]
    return args


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), python {platform.python_version()}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and returns (and optionally writes) the result dict."""
    args = parse_args(argv)
    if args.plot_only:
        result = json.loads(args.json.read_text())
        plot(result, args.png)
        print(markdown_table(result))
        return result
    # measured: 64 min for 3 models x 3 seeds x 250 epochs on one core
    minutes = 64 * len(args.models) / 3 * len(args.seeds) / 3 * args.epochs / 250
    announce("about 1.5 min" if args.quick else f"about {minutes:.0f} min on one core")
    sizes = {"train": args.n_train, "valid": args.n_valid, "test": args.n_test}
    data = {s: nd.load_split(s, n) for s, n in sizes.items()}
    c = nd.fit_linear(data["train"])
    result: dict[str, Any] = {
        "command": "python -m benchmarks.nbody.table2_egnn " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "splits": sizes, "published": PUBLISHED,
        "linear": {"c": c, "test_mse": nd.linear_test_mse(c, data["test"]),
                   "valid_mse": nd.linear_test_mse(c, data["valid"])},
    }
    print(f"linear: c = {c:.4f}, test MSE {result['linear']['test_mse']:.4f}", flush=True)
    start = time.perf_counter()
    if args.merge and args.json and args.json.exists():  # add models to an earlier run's results
        earlier = json.loads(args.json.read_text())
        result = {**earlier, **{k: v for k, v in result.items() if k in ("linear", "splits")},
                  "command": earlier.get("command", "") + " && " + result["command"]}
    for name in args.models:
        if name == "egnn_es" and es_policy()[0] is None:
            result[name] = {"status": "not run", "reason": es_policy()[1]}
            print(f"{name}: not run ({es_policy()[1]})", flush=True)
            continue
        try:
            runs = [train(name, data, args.epochs, seed, args.batch_size, log=sys.stdout)
                    for seed in progress(args.seeds, desc=name, unit="seed")]
        except Exception as err:  # noqa: BLE001 - a policy with another API must not lose the other results
            if name != "egnn_es":
                raise
            result[name] = {"status": "not run", "reason": f"{type(err).__name__}: {err}"}
            print(f"{name}: failed ({err})", flush=True)
            continue
        result[name] = summarise(name, runs, args.epochs, args.seeds)
        mean, std = stats(result[name]["test_mse"])
        print(f"{name}: test MSE {mean:.5f} +- {std:.5f} over seeds {args.seeds}", flush=True)
        if args.json:  # write partial results so a long run can be inspected
            _write(result, args.json)
    result["wall_time_s"] = result.get("wall_time_s", 0.0) + time.perf_counter() - start
    if args.json:
        _write(result, args.json)
    if args.png:
        plot(result, args.png)
    print(markdown_table(result))
    return result


def _write(result: dict[str, Any], path: Path) -> None:
    """Indented JSON with every list of plain values kept on one line."""
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


if __name__ == "__main__":
    main()
