"""Symmetry-gap sweep: RECM's final |alpha| against the data's symmetry gap (Theorem 4.2 made visible).

A synthetic regression family whose input-target symmetry gap is set by one
parameter ``eps >= 0`` (``examples/vector_model.py::make_task`` with ``broken = eps``):
inputs are 4 isotropic Gaussian 3-vectors, targets are the SO(3)-equivariant
``mean_c |x_c| x_c`` plus ``eps * (x_0 . e_x) e_x + eps * (0, 0.5, 0)``. At ``eps = 0``
the joint law of (x, y) is exactly rotation invariant.

For each ``eps`` the three-layer ``VectorNet`` is trained with ``RECMOptimizer`` and its
defaults (m = 16; Adam lr 1e-3, batch 64, fresh samples every step; the committed
``docs/results/symmetry_gap.json`` was made before RECM stepped its own parameters, at
a = 1e-3 with the modulation stepped by that Adam). Recorded
per layer ``l``, with ``z_l`` the layer's input in a training-mode forward (every term
live, as the optimizer sees it) on held-out inputs:

- the final ``|alpha|`` of each term (committed state) and its maximum over terms;
- ``B_l``: the Lipschitz bound of ``r_theta`` (``recm.lipschitz_bound``);
- ``C_l``: the coupling estimate ``recm.coupling_gap`` for ``p`` the law of ``(z_l, y)``.
  Its expectation is an upper bound on ``W1(p, p_G)``, since the input law is rotation
  invariant and ``z_l``, ``y`` are functions of the input (the noise term is drawn
  identically for ``x`` and ``g^-1 x``, which is still a coupling); the value is a
  Monte-Carlo estimate of it over 8 Haar rotations (``--n-elements``), about 5-6 % off
  (one standard deviation), not a certificate. Exactly 0 when the data and the layers
  below are symmetric;
- ``W1_l``: the plug-in estimate ``recm.symmetry_gap((z_l, y), SO3, reps)`` against
  Haar-sampled rotations, kept for comparison: on a finite sample it stays far from 0
  even at eps = 0, so a bound built on it cannot fail (a vacuous check);
- the bounds ``2 sqrt(m) B_l C_l`` (coupling, estimated) and ``2 sqrt(m) B_l W1_l`` (plug-in).
  The JSON key ``certified_bound_holds`` counts, per eps and seed, the layers within the
  first (its name predates the wording "estimated").

Theorem 4.2 bounds ``|alpha*|`` at the fixed point ``h* = E_p[l_theta]`` of the final
``theta``; the committed ``h_t`` averages ``l`` over earlier thetas and finite samples, so a
finite-time ``|alpha|`` above the coupling bound measures how far the run is from the
fixed point (at eps = 0, layer 0: the sampling noise of ``h_t``).

A second experiment (``convergence``) shows the two estimators on the data alone (layer
0: ``z = x``) as the sample size n grows.

Usage::

    python -m benchmarks.symmetry_gap --quick                                 # about 15 s
    python -m benchmarks.symmetry_gap --json docs/results/symmetry_gap.json   # about 5 min (292 s) on one core
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import recm_opt as recm
from examples.vector_model import VectorNet, make_task
from recm_opt.diagnostics import alpha_bound

from ..pointcloud.experiment import git_commit
from ..progress import announce, expected, progress, write

ROOT = Path(__file__).resolve().parents[2]
DURATION = "about 5 min on one core for the full sweep (292 s), about 15 s with --quick"

TERMS = ("weight", "bias", "noise")
EPS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def train(eps: float, steps: int, batch: int, seed: int) -> tuple[VectorNet, recm.RECMOptimizer]:
    """Train ``VectorNet`` with RECM's defaults on fresh samples of the eps-task."""
    torch.manual_seed(seed)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3), total_steps=steps)
    x, y = make_task(steps * batch, eps, seed=seed + 1)
    for step in range(steps):
        xb, yb = x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]
        (model(xb) - yb).pow(2).mean().backward()
        opt.step(target=yb)
        opt.zero_grad()
    return model, opt


def target(x: Tensor, eps: float) -> Tensor:
    """The task's target as a function of its input (the formula of ``make_task``)."""
    y = (x.norm(dim=-1, keepdim=True) * x).sum(1) / x.shape[1]
    if eps:
        axis = torch.tensor([1.0, 0.0, 0.0], dtype=x.dtype)
        y = y + eps * ((x[:, 0] @ axis)[:, None] * axis + torch.tensor([0.0, 0.5, 0.0], dtype=x.dtype))
    return y


@torch.no_grad()
def layer_inputs(model: VectorNet, x: Tensor, noise_seed: int = 0) -> list[Tensor]:
    """The input ``z_l`` of every tagged layer on ``x`` in a training-mode forward (no grad: nothing captured).

    The noise terms draw from a fixed seed, so two calls on inputs of the same shape draw the same noise.
    """
    model.train()
    seen: list[Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for layer in model.layers]
    state = torch.random.get_rng_state()
    torch.manual_seed(noise_seed)
    try:
        model(x)
    finally:
        torch.random.set_rng_state(state)
        for h in hooks:
            h.remove()
    return seen


ZREP, YREP = recm.Vector("b c xyz"), recm.Vector("b xyz")


def measure(model: VectorNet, opt: recm.RECMOptimizer, eps: float, n_eval: int, n_elements: int,
            max_points: int, seed: int) -> dict[str, Any]:
    """Final |alpha|, B, the coupling and plug-in gaps and both bounds, per layer."""
    x, y = make_task(n_eval, eps, seed=10_000 + seed)
    assert torch.allclose(target(x, eps), y), "target() must be make_task's formula"
    group, m = recm.SO3Generators(), model.layers[0].recm_modulation.h.numel()
    rows = {r["name"]: r for r in opt.report()}
    keys = ("names", "alpha_terms", "alpha", "lipschitz", "coupling", "bound_coupling", "w1", "bound")
    out: dict[str, list] = {k: [] for k in keys}
    for l, (name, layer, z) in enumerate(zip(opt.layers, model.layers, layer_inputs(model, x))):
        row = rows[name]
        B = recm.lipschitz_bound(layer)
        w1 = recm.symmetry_gap((z, y), group, (ZREP, YREP), n_elements=n_elements, max_points=max_points,
                               generator=torch.Generator().manual_seed(seed))
        coupling = recm.coupling_gap(lambda v, l=l: (layer_inputs(model, v)[l], target(v, eps)), x, group, ZREP,
                                     (ZREP, YREP), n_elements=n_elements,
                                     generator=torch.Generator().manual_seed(seed))
        out["names"].append(name)
        out["alpha_terms"].append({t: row["alpha"][t] for t in TERMS})
        out["alpha"].append(max(abs(v) for v in row["alpha"].values()))
        out["lipschitz"].append(B)
        out["coupling"].append(coupling)
        out["bound_coupling"].append(alpha_bound(B, coupling, m))
        out["w1"].append(w1)
        out["bound"].append(alpha_bound(B, w1, m))
    model.eval()
    return out


def convergence(eps_values: list[float], sizes: list[int], n_elements: int, repeats: int) -> dict[str, Any]:
    """Plug-in W1 and coupling estimate of the data's gap (z = x) against the sample size n (mean over repeats)."""
    group = recm.SO3Generators()
    out: dict[str, Any] = {"eps": eps_values, "n": sizes, "n_elements": n_elements, "repeats": repeats,
                           "plugin": [], "coupling": []}
    for eps in eps_values:
        plug, coup = [], []
        for n in sizes:
            ps, cs = [], []
            for r in range(repeats):
                x, y = make_task(n, eps, seed=50_000 + 97 * r + n)
                gen = torch.Generator().manual_seed(r)
                ps.append(recm.symmetry_gap((x, y), group, (ZREP, YREP), n_elements=n_elements,
                                            max_points=(n_elements + 1) * n, generator=gen))
                cs.append(recm.coupling_gap(lambda v, eps=eps: (v, target(v, eps)), x, group, ZREP, (ZREP, YREP),
                                            n_elements=n_elements, generator=torch.Generator().manual_seed(r)))
            plug.append(sum(ps) / repeats)
            coup.append(sum(cs) / repeats)
        out["plugin"].append(plug)
        out["coupling"].append(coup)
    return out


def population_gap_upper(eps: float, n: int = 200_000) -> float:
    """Upper bound on the population gap ``W1(p, p_G)`` of the data (x, y), exact in eps.

    ``q``, the law of ``(x, y_sym(x))``, is rotation invariant, and the coupling
    ``(x, y) ~ (x, y_sym(x))`` gives ``W1(p, q) <= eps E||f(x)||`` for the breaking term
    ``f(x) = (x_0 . e_x) e_x + (0, 0.5, 0)``. Averaging over the group is a W1
    contraction and ``q_G = q``, so ``W1(p, p_G) <= 2 W1(p, q) <= 2 eps E||f(x)||``
    (the expectation by Monte Carlo). Unlike the plug-in estimate, it is 0 at eps = 0.
    """
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    return 2.0 * eps * float(torch.sqrt(x0**2 + 0.25).mean())


def add_population_bound(result: dict[str, Any]) -> None:
    """Add the first layer's population gap bound and its alpha bound (per eps, mean over seeds)."""
    m = result["state_dim"]
    result["w1_population_upper"] = [population_gap_upper(e) for e in result["eps"]]
    result["bound_population"] = [
        sum(alpha_bound(s[i]["lipschitz"][0], w, m) for s in result["per_seed"]) / len(result["per_seed"])
        for i, w in enumerate(result["w1_population_upper"])
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: final |alpha| per layer and eps with the estimated coupling bound (dashed); middle: the gap estimates of
    layer 0 (coupling, plug-in, population bound); right: both estimators against the sample size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = result["eps"]
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.3))
    names = result["layers"]
    for j, name in enumerate(names):
        for s, seed_runs in enumerate(result["per_seed"]):
            ax.plot(eps, [r["alpha"][j] for r in seed_runs], "o-", color=f"C{j}", lw=1.2, ms=4,
                    label=f"|alpha| {name}" if s == 0 else None)
            ax.plot(eps, [r["bound_coupling"][j] for r in seed_runs], "--", color=f"C{j}", lw=1,
                    label=f"2 sqrt(m) B C (estimated) {name}" if s == 0 else None)
    ax.axhline(0.01, color="k", ls=":", lw=0.8, label="prune threshold 0.01")
    for s, seed_runs in enumerate(result["per_seed"]):
        ax2.plot(eps, [r["coupling"][0] for r in seed_runs], "o-", color="C0", ms=4,
                 label="coupling estimate (of an upper bound)" if s == 0 else None)
        ax2.plot(eps, [r["w1"][0] for r in seed_runs], "s--", color="C3", ms=4,
                 label="plug-in W1 (n_eval samples)" if s == 0 else None)
    ax2.plot(eps, result["w1_population_upper"], ":", color="k", lw=1.5, label="population bound 2 eps E|f|")
    for a in (ax, ax2):
        a.set_xscale("symlog", linthresh=0.01)
        a.set_xlim(0, max(eps) * 1.2)
        a.set_xlabel("eps (symmetry-breaking strength)")
        a.set_yscale("symlog", linthresh=1e-4)
        a.set_ylim(0, None)
    ax.set_ylabel("final max_i |alpha_i|  /  bound")
    ax.set_title("RECM alpha vs its coupling bound (estimated)")
    ax.legend(fontsize=6, ncol=2)
    ax2.set_ylabel("W1(p, p_G) estimate, layer 0 = data")
    ax2.set_title("gap estimates of the data")
    ax2.legend(fontsize=7)
    conv = result.get("convergence")
    if conv:
        for k, e in enumerate(conv["eps"]):
            ax3.plot(conv["n"], conv["coupling"][k], "o-", color=f"C{k}", label=f"coupling, eps={e:g}")
            ax3.plot(conv["n"], conv["plugin"][k], "s--", color=f"C{k}", label=f"plug-in W1, eps={e:g}")
        ax3.set_xscale("log")
        ax3.set_yscale("symlog", linthresh=1e-3)
        ax3.set_xlabel("sample size n")
        ax3.set_title(f"estimators vs n ({conv['n_elements']} rotations, mean of {conv['repeats']})")
        ax3.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """Per eps and layer: final |alpha| (max over seeds) against the estimated coupling and plug-in bounds."""
    lines = ["| eps | layer | max abs(alpha) | coupling C | 2 sqrt(m) B C | within coupling bound | plug-in W1 | "
             "2 sqrt(m) B W1 |", "|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(result["eps"]):
        for j, name in enumerate(result["layers"]):
            runs = [s[i] for s in result["per_seed"]]
            alpha = max(r["alpha"][j] for r in runs)
            c = sum(r["coupling"][j] for r in runs) / len(runs)
            bc = min(r["bound_coupling"][j] for r in runs)
            held = sum(r["alpha"][j] <= r["bound_coupling"][j] for r in runs)
            w1 = sum(r["w1"][j] for r in runs) / len(runs)
            bw = sum(r["bound"][j] for r in runs) / len(runs)
            lines.append(f"| {e:g} | {name} | {alpha:.2e} | {c:.3g} | {bc:.3g} | {held}/{len(runs)} | {w1:.3g} | "
                         f"{bw:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep and the convergence study, print a table, optionally write JSON and the plot."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                epilog=expected(DURATION))
    p.add_argument("--quick", action="store_true", help="150 steps, one seed, 3 eps values, a tiny convergence study")
    p.add_argument("--eps", type=float, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=None, help="held-out samples for both estimators")
    p.add_argument("--n-elements", type=int, default=8, help="Haar rotations per estimate")
    p.add_argument("--max-points", type=int, default=2048, help="atoms of the plug-in's symmetrised measure")
    p.add_argument("--json", nargs="?", type=Path, const=ROOT / "docs/results/symmetry_gap.json", default=None)
    p.add_argument("--png", type=Path, default=None, help="plot path (default: next to --json)")
    p.add_argument("--from-json", type=Path, default=None, help="table and plot of a saved run, no training")
    cfg = p.parse_args(argv)
    if cfg.from_json is not None:
        result = json.loads(cfg.from_json.read_text())
        print(table(result))
        plot(result, cfg.png or cfg.from_json.with_suffix(".png"))
        return result
    cfg.eps = cfg.eps or ([0.0, 0.1, 1.0] if cfg.quick else list(EPS))
    cfg.steps = cfg.steps or (150 if cfg.quick else 3000)
    cfg.seeds = cfg.seeds or ([0] if cfg.quick else [0, 1])
    cfg.n_eval = cfg.n_eval or (128 if cfg.quick else 1024)
    torch.set_num_threads(1)
    announce("about 15 s" if cfg.quick else "about 5 min on one core (292 s)")
    commit = git_commit()  # the code that runs, recorded before the run
    t0 = time.perf_counter()
    per_seed: list[list[dict[str, Any]]] = []
    bar = iter(progress(range(len(cfg.seeds) * len(cfg.eps)), desc="trainings", unit="run"))
    for seed in cfg.seeds:
        runs = []
        for eps in cfg.eps:
            next(bar, None)
            model, opt = train(eps, cfg.steps, cfg.batch, seed)
            r = measure(model, opt, eps, cfg.n_eval, cfg.n_elements, cfg.max_points, seed)
            runs.append(r)
            write(f"[{time.perf_counter() - t0:6.1f}s] seed={seed} eps={eps:<5g} |alpha|=" +
                  " ".join(f"{a:.2e}" for a in r["alpha"]) + "  C=" + " ".join(f"{c:.3g}" for c in r["coupling"]) +
                  "  bound=" + " ".join(f"{b:.2e}" for b in r["bound_coupling"]) +
                  "  plug-in W1=" + " ".join(f"{w:.3f}" for w in r["w1"]))
        per_seed.append(runs)
    next(bar, None)
    conv = (convergence([0.0, 0.3], [16, 64], 4, 2) if cfg.quick
            else convergence([0.0, 0.3], [32, 128, 512], 4, 3))
    names = per_seed[0][0]["names"]
    argv_used = argv if argv is not None else sys.argv[1:]
    result = {
        "eps": cfg.eps,
        "layers": names,
        "per_seed": per_seed,
        "certified_bound_holds": [[sum(a <= b for a, b in zip(s[i]["alpha"], s[i]["bound_coupling"]))
                                   for s in per_seed] for i in range(len(cfg.eps))],
        "convergence": conv,
        "state_dim": 16,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "command": "python -m benchmarks.symmetry_gap " + " ".join(shlex.quote(a) for a in argv_used),
        "commit": commit,
        "machine": "CPU, 1 thread (2 shared cores)",
        "seconds": time.perf_counter() - t0,
    }
    add_population_bound(result)
    print(table(result))
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(result, indent=1))
        print("wrote", cfg.json)
    png = cfg.png or (cfg.json.with_suffix(".png") if cfg.json is not None else None)
    if png is not None:
        plot(result, png)
        print("wrote", png)
    return result
