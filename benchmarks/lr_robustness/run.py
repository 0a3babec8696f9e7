"""Pruning against the modulation group's learning rate: designs of r_theta and of the pruning rule.

On exactly symmetric data every relaxation term should be pruned (``|alpha| < 0.01``)
whatever the learning rate of RECM's own param group; on the broken version of the
same task relaxation must stay as useful as with today's unconstrained ``r_theta``.
This script trains the demo's ``VectorNet`` (three relaxed vector layers, batch 64)
on both versions of ``examples/vector_model.py::make_task`` (``broken = 0`` and
``broken = 1``) for a grid of

- modulation-group lr in {1e-4, 1e-3, 1e-2, 3e-2} (model lr fixed: AdamW 1e-3,
  SGD 1e-2 with momentum 0.9),
- inner optimizer AdamW and SGD(momentum=0.9),
- seeds 0, 1, 2,

and several training variants:

- ``unbounded``: today's r_theta (weights free) and unconstrained weights of
  Frobenius norm <= 1;
- ``sn1``: r_theta's two weight matrices projected to spectral norm <= 1 after every
  step, so B = ||W2|| * Lip(GELU) * ||W1|| <= 1.129 is certified;
- ``sn1_r8``: as ``sn1``, with the alpha amplitude carried by the unconstrained
  weights instead (Frobenius radius 8);
- ``sf_r8``: a scale-free r_theta: both weights rescaled to spectral norm exactly 1
  after every step (B = 1.129 exactly, the scale of r_theta is no free parameter),
  radius 8;
- ``odd_gelu``: ``unbounded`` with ``alpha = sign(x) GELU(|x|)``, ``x = w_alpha . h``
  (odd, monotone, ``|s(x)| <= |x|``: no stationary point at GELU's minimum).

Each trained model is then judged by pruning rules that need no retraining:

- ``eps``: today's rule, ``|alpha| < 0.01``;
- ``z3`` / ``z4`` (per term): ``eps``, or ``|w_alpha . h| < z * se`` with
  ``se^2 = w_alpha^T V w_alpha``, where ``V_t = (1 - gamma_t)^2 V_{t-1} +
  gamma_t^2 l_t l_t^T`` is the realised quadratic variation of the martingale
  ``h_t = (1 - gamma_t) h_{t-1} + gamma_t l_t`` under the null hypothesis
  E[l_theta] = 0;
- ``h3`` / ``h4`` / ``h5`` (per layer): ``eps``, or ``||h||^2 < c^2 tr V``: the layer's
  state is no larger than c times its own sampling noise. On symmetric data
  ``E ||h||^2 = E tr V`` whatever r_theta's scale; with the noise weights summing to one
  the tail of ``||h||^2 / tr V`` is at most that of a chi-square with one degree of
  freedom, so c = 4 or 5 are 4- and 5-sigma tests.

Per run it records the final alpha, ``x = w_alpha . h`` and ``se`` of every term, the
peak ``|alpha|`` over training, B and the spectral norms of r_theta, the mean training
loss over the last 10 % of steps and the test MSE (4096 fresh samples, eval mode) with
each pruning rule. The summary gives, per design (variant x rule) and cell
(optimizer, lr): symmetric runs with every term pruned and the largest ``|alpha|``;
broken runs' test MSE relative to ``unbounded`` + ``eps`` on the same seed; and how
many terms of the broken runs ended at GELU's minimum (alpha < -0.16).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.lr_robustness.run --jobs 2
    python -m benchmarks.lr_robustness.run --quick        # < 20 s, writes outputs/lr_robustness_quick.json

Runs are cached one JSON line each (``outputs/lr_robustness_runs.jsonl``), so an
interrupted grid resumes; ``--summarise`` rebuilds the summary from the cache alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import recm_opt as recm
from benchmarks.progress import announce, expected, progress, write
from benchmarks.stats import t_interval
from recm_opt.modulation import Modulation

ROOT = Path(__file__).resolve().parents[2]
GELU_MIN = -0.16997  # min_x GELU(x), at x = -0.7518
PRUNE_EPS = 0.01
RULES = ("eps", "z3", "z4", "h3", "h4", "h5", "hc3", "hc4", "hc5")


@dataclass(frozen=True)
class Variant:
    """A training variant: r_theta's spectral-norm handling, the weight radius and the alpha map."""

    sn: float | None = None  # spectral-norm radius of r_theta's weights (None: free)
    sn_mode: str = "project"  # "project": scale down to the radius; "normalise": scale to exactly the radius
    radius: float = 1.0  # Frobenius radius of every unconstrained term's parameters
    alpha: str = "gelu"  # "gelu" or "odd" (sign(x) GELU(|x|))


VARIANTS: dict[str, Variant] = {
    "unbounded": Variant(),
    "sn1_r8": Variant(sn=1.0, radius=8.0),
    "sn1": Variant(sn=1.0),
    "odd_gelu": Variant(alpha="odd"),
    "sf_r8": Variant(sn=1.0, sn_mode="normalise", radius=8.0),
}


def _vector_model() -> ModuleType:
    """``examples/vector_model.py`` as a module (examples/ is not a package)."""
    name = "recm_examples_vector_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "vector_model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _OddGeluModulation(Modulation):
    """``alpha = sign(x) GELU(|x|)`` with ``x = w_alpha h``: odd and monotone, ``|s(x)| <= |x|``."""

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:  # noqa: D102
        h = self.state_value(with_grad)
        x = self.w_alpha @ h
        return torch.sign(x) * nn.functional.gelu(x.abs()), self.beta_fn(self.w_beta @ h)


def build_vector_net(opt_name: str, lr: float, seed: int, **options: Any) -> tuple[nn.Module, recm.RECMOptimizer]:
    """The demo's VectorNet (seeded) with RECM around AdamW (lr 1e-3) or SGD with momentum 0.9 (lr 1e-2).

    ``lr`` is RECM's group's learning rate; ``options`` go to ``RECMOptimizer``. One torch thread.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = _vector_model().VectorNet()
    if opt_name == "adamw":
        inner: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    opt = recm.RECMOptimizer(inner, model, target=recm.Vector("b xyz"), lr=lr, seed=seed,
                             example=torch.zeros(1, 4, 3), **options)
    return model, opt


def _modulations(model: nn.Module) -> list[tuple[str, Modulation]]:
    return [(name, m.recm_modulation) for name, m in model.named_modules() if hasattr(m, "recm_modulation")]


def _r_weights(mod: Modulation) -> list[Tensor]:
    ws = [mod.r_theta[0].weight, mod.r_theta[2].weight]
    return [w for w in ws if not isinstance(w, nn.parameter.UninitializedParameter)]


@torch.no_grad()
def _spectral_(mods: Iterable[Modulation], radius: float, mode: str) -> None:
    for mod in mods:
        for w in _r_weights(mod):
            s = torch.linalg.matrix_norm(w.double(), 2)
            if mode == "normalise" or s > radius:
                w.mul_((radius / s).to(w.dtype))


def _install(opt: recm.RECMOptimizer, mods: list[Modulation], variant: Variant) -> None:
    """Apply ``variant`` to a freshly built optimizer (experiment-only plumbing)."""
    if variant.sn is not None:
        original = opt._project

        def project() -> None:  # runs after the inner step, before h is committed
            original()
            _spectral_(mods, variant.sn, variant.sn_mode)

        opt._project = project  # type: ignore[method-assign]
    if variant.alpha == "odd":
        for mod in mods:
            mod.__class__ = _OddGeluModulation
            mod.__dict__.pop("_standard_r", None)


class NoiseTracker:
    """Realised quadratic variation of every layer's h: ``V_t = (1 - g)^2 V_{t-1} + (g l_t)(g l_t)^T``.

    Under the null hypothesis ``E[l_theta] = 0`` (exactly symmetric data) the increments
    ``g l_t`` of ``h`` have conditional mean zero whatever theta does, so ``h_t`` is a
    martingale and ``E ||h_t||^2 = E tr V_t``: ``||h||^2 / tr V`` is of order 1 on
    symmetric data, whatever the scale of r_theta, and grows like t on broken data.
    """

    def __init__(self, mods: list[Modulation], a: float, b: float) -> None:
        self.mods, self.a, self.b = mods, a, b
        self.v = [torch.zeros(m.h.numel(), m.h.numel(), dtype=torch.float64) for m in mods]
        self.vc = [0.0 for _ in mods]  # centred: tr of the quadratic variation of g (l_t - mean_{k<t} l_k)
        self.prev: list[tuple[Tensor, int]] = []

    def before(self) -> None:  # noqa: D102
        self.prev = [(m.h.detach().double().clone(), int(m.t)) for m in self.mods]

    def after(self) -> None:  # noqa: D102
        for i, (m, (h0, t0)) in enumerate(zip(self.mods, self.prev)):
            if int(m.t) == t0:  # no commit this step
                continue
            g = float(m.gamma_t)
            d = m.h.detach().double() - (1 - g) * h0  # = g * l_t
            self.v[i] = (1 - g) ** 2 * self.v[i] + torch.outer(d, d)
            # h_{t-1} = (1 - lambda_{t-1}) mean_{k<t} l_k (h_0 = 0): the mean so far, known before l_t
            mean = h0 * (self.b + self.a * t0) / (self.a * t0) if t0 > 0 else torch.zeros_like(h0)
            self.vc[i] = (1 - g) ** 2 * self.vc[i] + float((d - g * mean).pow(2).sum())

    def terms(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer: ``x = w_alpha h`` (K,) and its standard error ``sqrt(w^T V w)`` (K,)."""
        out = []
        for m, v in zip(self.mods, self.v):
            w, h = m.w_alpha.detach().double(), m.h.detach().double()
            out.append((w @ h, torch.einsum("ki,ij,kj->k", w, v, w).clamp(min=0).sqrt()))
        return out

    def ratios(self) -> list[float]:
        """Per layer: ``||h||^2 / tr V``, the state's squared size against its own sampling noise."""
        return [float(m.h.detach().double().pow(2).sum() / v.trace().clamp(min=1e-300))
                for m, v in zip(self.mods, self.v)]

    def centred_ratios(self) -> list[float]:
        """As :meth:`ratios`, with each increment centred on the mean of the earlier ones (``V_c``)."""
        return [float(m.h.detach().double().pow(2).sum()) / max(vc, 1e-300) for m, vc in zip(self.mods, self.vc)]


def _live(mod: Modulation, x: Tensor, se: Tensor, ratio: float, centred: float, rule: str) -> tuple[bool, ...]:
    with torch.no_grad():
        alpha = mod.coefficients()[0].double()
    keep = alpha.abs() >= PRUNE_EPS
    if rule.startswith("z"):  # per term: |w_alpha . h| against its standard error
        keep &= x.abs() >= float(rule[1:]) * se
    if rule.startswith("hc"):  # per layer, centred increments
        keep &= centred >= float(rule[2:]) ** 2
    elif rule.startswith("h"):  # per layer: ||h|| against its own sampling noise sqrt(tr V)
        keep &= ratio >= float(rule[1:]) ** 2
    return tuple(bool(k) for k in keep)


@torch.no_grad()
def _test_mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    out = float((model(x) - y).pow(2).mean())
    model.train()
    return out


def run_one(task: str, variant_name: str, opt_name: str, lr: float, seed: int, steps: int,
            batch: int = 64) -> dict[str, Any]:
    """Train one configuration and return its record (see the module docstring)."""
    vm = _vector_model()
    variant = VARIANTS[variant_name]
    broken = 0.0 if task == "symmetric" else 1.0
    # prune_z=0: the optimizer's own live flags are the "eps" rule; the other rules are judged here
    model, opt = build_vector_net(opt_name, lr, seed, weight_radius=variant.radius, prune_z=0.0)
    names, mods = zip(*_modulations(model))
    mods = list(mods)
    _install(opt, mods, variant)
    tracker = NoiseTracker(mods, opt.a, opt.b)
    x, y = vm.make_task(steps * batch, broken, seed=seed + 1)
    xt, yt = vm.make_task(4096, broken, seed=10_000 + seed)
    peak = [torch.zeros(len(m.terms), dtype=torch.float64) for m in mods]
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        loss = (model(xb) - yb).pow(2).mean()
        loss.backward()
        tracker.before()
        opt.step(target=yb)
        tracker.after()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            with torch.no_grad():
                for i, m in enumerate(mods):
                    peak[i] = torch.maximum(peak[i], m.coefficients()[0].detach().double().abs())
    wall = time.perf_counter() - t0
    stats, ratios, centred = tracker.terms(), tracker.ratios(), tracker.centred_ratios()
    mse = {"none": None, "eps": _test_mse(model, xt, yt)}  # eps: the optimizer's own live flags
    saved = [m.live for m in mods]
    for rule in ("none", *RULES[1:]):
        for m, (xs, se), ratio, c in zip(mods, stats, ratios, centred):
            m.live = (True,) * len(m.terms) if rule == "none" else _live(m, xs, se, ratio, c, rule)
        mse[rule] = _test_mse(model, xt, yt)
    for m, live in zip(mods, saved):
        m.live = live
    terms = []
    for name, m, (xs, se), pk, ratio, c in zip(names, mods, stats, peak, ratios, centred):
        with torch.no_grad():
            alpha = m.coefficients()[0].double()
        for k, term in enumerate(m.terms):
            terms.append({"layer": name, "term": term, "alpha": float(alpha[k]), "x": float(xs[k]),
                          "se": float(se[k]), "layer_ratio": ratio, "layer_ratio_centred": c,
                          "peak_abs_alpha": float(pk[k])})
    tail = max(1, steps // 10)
    return {
        "task": task, "variant": variant_name, "opt": opt_name, "lr": lr, "seed": seed, "steps": steps,
        "train_loss_tail": sum(losses[-tail:]) / tail, "test_mse": mse, "terms": terms,
        "B": [m.lipschitz_bound() for m in mods],
        "spectral_norms": [[float(torch.linalg.matrix_norm(w.detach().double(), 2)) for w in _r_weights(m)]
                           for m in mods],
        "wall_s": wall,
    }


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["task"], rec["variant"], rec["opt"], rec["lr"], rec["seed"], rec["steps"])


def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


# ----------------------------------------------------------------------------- summary
def _pruned(term: dict[str, Any], rule: str) -> bool:
    if abs(term["alpha"]) < PRUNE_EPS:
        return True
    if rule.startswith("hc"):
        return term["layer_ratio_centred"] < float(rule[2:]) ** 2
    if rule.startswith("h"):
        return term["layer_ratio"] < float(rule[1:]) ** 2
    return rule.startswith("z") and abs(term["x"]) < float(rule[1:]) * term["se"]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per design (variant x rule) and cell (opt, lr): the two targets and the GELU-minimum count."""
    base = {(r["opt"], r["lr"], r["seed"]): r["test_mse"]["eps"]
            for r in records if r["variant"] == "unbounded" and r["task"] == "broken"}
    designs: dict[str, Any] = {}
    for variant in VARIANTS:
        runs = [r for r in records if r["variant"] == variant]
        if not runs:
            continue
        for rule in RULES:
            if any(rule not in r["test_mse"] for r in runs):  # a rule added after these runs were made
                continue
            cells = {}
            sym_ok = broken_ok = True
            complete = True
            for opt in ("adamw", "sgd"):
                for lr in sorted({r["lr"] for r in runs}):
                    sym = [r for r in runs if r["task"] == "symmetric" and r["opt"] == opt and r["lr"] == lr]
                    brk = [r for r in runs if r["task"] == "broken" and r["opt"] == opt and r["lr"] == lr]
                    if not sym and not brk:
                        continue
                    all_pruned = [all(_pruned(t, rule) for t in r["terms"]) for r in sym]
                    ratios = [r["test_mse"][rule] / base[(opt, lr, r["seed"])] for r in brk
                              if (opt, lr, r["seed"]) in base]
                    mean_ratio = (sum(r["test_mse"][rule] for r in brk if (opt, lr, r["seed"]) in base)
                                  / sum(base[(opt, lr, r["seed"])] for r in brk if (opt, lr, r["seed"]) in base)
                                  if ratios else None)
                    cells[f"{opt} lr={lr:g}"] = {
                        "symmetric_max_layer_ratio": max((t["layer_ratio"] for r in sym for t in r["terms"]),
                                                         default=None),
                        "symmetric_all_pruned": f"{sum(all_pruned)}/{len(all_pruned)}",
                        "symmetric_max_abs_alpha": max((abs(t["alpha"]) for r in sym for t in r["terms"]),
                                                       default=None),
                        "symmetric_peak_abs_alpha": max((t["peak_abs_alpha"] for r in sym for t in r["terms"]),
                                                        default=None),
                        "broken_test_mse": [r["test_mse"][rule] for r in sorted(brk, key=lambda r: r["seed"])],
                        "broken_mse_ratio_to_unbounded_eps": mean_ratio,
                        "broken_terms_at_gelu_min": sum(t["alpha"] < GELU_MIN + 0.01 for r in brk
                                                        for t in r["terms"]),
                        "broken_terms": sum(len(r["terms"]) for r in brk),
                        "symmetric_max_B": max((b for r in sym for b in r["B"]), default=None),
                        "broken_min_layer_ratio": min((t["layer_ratio"] for r in brk for t in r["terms"]
                                                       if "layer_ratio" in t), default=None),
                        "symmetric_max_layer_ratio_centred": max((t.get("layer_ratio_centred", 0.0) for r in sym
                                                                  for t in r["terms"]), default=None),
                        "broken_min_layer_ratio_centred": min((t["layer_ratio_centred"] for r in brk
                                                               for t in r["terms"] if "layer_ratio_centred" in t),
                                                              default=None),
                    }
                    sym_ok &= bool(all_pruned) and all(all_pruned) and len(all_pruned) >= 3
                    broken_ok &= mean_ratio is not None and mean_ratio <= 1.05
                    complete &= len(sym) >= 3 and len(brk) >= 3
            designs[f"{variant}+{rule}"] = {
                "variant": asdict(VARIANTS[variant]), "rule": rule, "cells": cells,
                "meets_symmetric_target": sym_ok, "meets_broken_target": broken_ok, "complete_grid": complete,
            }
    return designs


def paired(records: list[dict[str, Any]], variant: str, rule: str = "eps",
           reference: str = "unbounded") -> dict[str, Any]:
    """Broken task: ``log(test MSE of variant / test MSE of reference)`` paired by (lr, seed), per optimizer.

    Mean with a 95 % t-interval; exp of the bounds is the geometric-mean ratio's interval.
    """
    out = {}
    for opt in ("adamw", "sgd"):
        ref = {(r["lr"], r["seed"]): r["test_mse"]["eps"] for r in records
               if r["variant"] == reference and r["task"] == "broken" and r["opt"] == opt}
        diffs = [math.log(r["test_mse"][rule] / ref[(r["lr"], r["seed"])]) for r in records
                 if r["variant"] == variant and r["task"] == "broken" and r["opt"] == opt
                 and (r["lr"], r["seed"]) in ref]
        if len(diffs) < 2:
            continue
        d = t_interval(diffs)
        out[opt] = {"pairs": len(diffs), "mean_log_ratio": d.mean, "ci95": [d.lo, d.hi],
                    "ratio": math.exp(d.mean), "ratio_ci95": [math.exp(d.lo), math.exp(d.hi)],
                    "within_noise": d.within_noise}
    return out


def gelu_minimum(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Broken runs with GELU's alpha: how many terms and runs end at GELU's minimum (alpha < -0.16)."""
    out = {}
    for opt in ("adamw", "sgd"):
        runs = [r for r in records if r["variant"] == "unbounded" and r["task"] == "broken" and r["opt"] == opt]
        at_min = [r for r in runs if any(t["alpha"] < GELU_MIN + 0.01 for t in r["terms"])]
        out[opt] = {"runs": len(runs), "runs_with_a_term_at_min": len(at_min),
                    "terms": sum(len(r["terms"]) for r in runs),
                    "terms_at_min": sum(t["alpha"] < GELU_MIN + 0.01 for r in runs for t in r["terms"])}
    return out


def main(argv: list[str] | None = None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=expected(
        "about 18 s per run and process (2000 steps of the demo's VectorNet; the default grid is 192 runs, about "
        "30 min with --jobs 2), under 20 s with --quick; runs already in --cache are not redone"))
    p.add_argument("--quick", action="store_true", help="a smoke run (< 20 s): 150 steps, 2 cells, 1 seed")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    p.add_argument("--opts", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    p.add_argument("--variants", nargs="+", default=["unbounded", "odd_gelu", "sn1_r8", "sn1"],
                   choices=list(VARIANTS))
    p.add_argument("--tasks", nargs="+", default=["symmetric", "broken"], choices=["symmetric", "broken"])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "lr_robustness_runs.jsonl")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summarise", action="store_true", help="only rebuild the summary from the cache")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs, args.opts = 150, 1, [1e-3, 3e-2], ["adamw"]
        args.variants = ["unbounded", "sn1_r8"]
        args.cache = ROOT / "outputs" / "lr_robustness_quick_runs.jsonl"
    out = args.out or (ROOT / "outputs" / "lr_robustness_quick.json" if args.quick
                       else ROOT / "docs" / "results" / "lr_robustness.json")
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            rec = json.loads(line)
            done[_key(rec)] = rec
    jobs = [(task, v, o, lr, s, args.steps) for v in args.variants for o in args.opts for lr in args.lrs
            for s in range(args.seeds) for task in args.tasks]
    todo = [j for j in jobs if j not in done] if not args.summarise else []
    if todo:
        announce("under 20 s" if args.quick else f"about {len(todo) * 18 / max(1, args.jobs) / 60:.0f} min for "
                 f"{len(todo)} runs on {args.jobs} process(es)")
    t0 = time.perf_counter()
    if todo:
        with args.cache.open("a") as f:
            if args.jobs > 1:
                import multiprocessing as mp

                with mp.get_context("forkserver").Pool(args.jobs) as pool:
                    results: Iterable[dict[str, Any]] = pool.imap_unordered(_job, todo)
                    for rec in progress(results, total=len(todo)):
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                        done[_key(rec)] = rec
                        write(f"[{time.perf_counter() - t0:6.0f}s] {_key(rec)} mse={rec['test_mse']['eps']:.4f}")
            else:
                for j in progress(todo):
                    rec = _job(j)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done[_key(rec)] = rec
                    print(f"[{time.perf_counter() - t0:6.0f}s] {_key(rec)} mse={rec['test_mse']['eps']:.4f}",
                          flush=True)
    records = [done[j] for j in jobs if j in done] if not args.summarise else \
        [r for r in done.values() if r["steps"] == args.steps]
    result = {
        "command": "python -m benchmarks.lr_robustness.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s) per run, shared 2-core host",
        "torch": torch.__version__,
        "task": "examples/vector_model.py VectorNet, make_task broken=0 (symmetric) and broken=1, batch 64",
        "steps": args.steps, "prune_eps": PRUNE_EPS,
        "designs": summarise(records),
        "gelu_minimum": gelu_minimum(records),
        "odd_gelu_vs_gelu_broken": paired(records, "odd_gelu") if any(r["variant"] == "odd_gelu" for r in records)
        else None,
        "runs": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                              else o) + "\n")
    for name, d in result["designs"].items():
        print(f"{name:22s} symmetric target: {d['meets_symmetric_target']!s:5s} broken target: "
              f"{d['meets_broken_target']!s:5s} complete: {d['complete_grid']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
