"""Symmetry-gap sweep: RECM's final |alpha| against the data's symmetry gap (Theorem 4.2 made visible).

A synthetic regression family whose input-target symmetry gap is set by one
parameter ``eps >= 0`` (``examples/vector_model.py::make_task`` with ``broken = eps``):
inputs are 4 isotropic Gaussian 3-vectors, targets are the SO(3)-equivariant
``mean_c |x_c| x_c`` plus ``eps * (x_0 . e_x) e_x + eps * (0, 0.5, 0)``. At ``eps = 0``
the joint law of (x, y) is exactly rotation invariant.

For each ``eps`` the three-layer ``VectorNet`` is trained with ``RECMOptimizer`` and its
defaults (a = 1e-3, m = 16; Adam lr 1e-3, batch 64, fresh samples every step, as in
``examples/demo.py``). Recorded per layer ``l``:

- the final ``|alpha|`` of each term (committed state) and its maximum over terms;
- ``B_l``: the Lipschitz bound of ``r_theta`` (``recm.lipschitz_bound``);
- ``W1_l``: the library's symmetry-gap estimate ``recm.symmetry_gap((z_l, y), SO3, reps)``
  on a held-out sample of the layer's input ``z_l`` and the target, against its average
  over Haar-sampled rotations (``W1(p, p_G)``, plug-in);
- the bound ``2 sqrt(m) B_l W1_l`` (``recm.diagnostics.alpha_bound``).

The bound is Theorem 4.2's statement for the fixed point ``h* = E_p[l_theta]`` at the
final ``theta``; the committed ``h_t`` averages ``l`` over earlier thetas, so the check
compares the final ``|alpha|`` with the bound of the final ``r_theta``.

Usage::

    python benchmarks/symmetry_gap.py --quick
    python benchmarks/symmetry_gap.py --json            # writes docs/results/symmetry_gap.{json,png}
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from vector_model import VectorNet, make_task  # noqa: E402

import recm_opt as recm  # noqa: E402
from recm_opt.diagnostics import alpha_bound  # noqa: E402

TERMS = ("weight", "bias", "noise")
EPS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def train(eps: float, steps: int, batch: int, seed: int) -> tuple[VectorNet, recm.RECMOptimizer]:
    """Train ``VectorNet`` with RECM's defaults on fresh samples of the eps-task."""
    torch.manual_seed(seed)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3))
    x, y = make_task(steps * batch, eps, seed=seed + 1)
    for step in range(steps):
        xb, yb = x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]
        (model(xb) - yb).pow(2).mean().backward()
        opt.step(target=yb)
        opt.zero_grad()
    return model, opt


@torch.no_grad()
def layer_inputs(model: VectorNet, x: Tensor) -> list[Tensor]:
    """The input ``z_l`` of every tagged layer on ``x`` (eval mode: nothing is captured)."""
    model.eval()
    seen: list[Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for layer in model.layers]
    model(x)
    for h in hooks:
        h.remove()
    model.train()
    return seen


def measure(model: VectorNet, opt: recm.RECMOptimizer, eps: float, n_eval: int, n_elements: int,
            max_points: int, seed: int) -> dict[str, Any]:
    """Final |alpha|, B, W1 and the bound per layer."""
    x, y = make_task(n_eval, eps, seed=10_000 + seed)
    group, m = recm.SO3Generators(), model.layers[0].recm_modulation.h.numel()
    rows = {r["name"]: r for r in opt.report()}
    out: dict[str, list] = {k: [] for k in ("names", "alpha_terms", "alpha", "lipschitz", "w1", "bound",
                                             "w1_newest_generators", "bound_newest_generators")}
    for name, layer, z in zip(opt.layers, model.layers, layer_inputs(model, x)):
        row = rows[name]
        B = recm.lipschitz_bound(layer)
        gen = torch.Generator().manual_seed(seed)
        w1 = recm.symmetry_gap((z, y), group, (recm.Vector("b c xyz"), recm.Vector("b xyz")),
                               n_elements=n_elements, max_points=max_points, generator=gen)
        out["names"].append(name)
        out["alpha_terms"].append({t: row["alpha"][t] for t in TERMS})
        out["alpha"].append(max(abs(v) for v in row["alpha"].values()))
        out["lipschitz"].append(B)
        out["w1"].append(w1)
        out["bound"].append(alpha_bound(B, w1, m))
        out["w1_newest_generators"].append(row.get("gap_w1"))
        out["bound_newest_generators"].append(row.get("alpha_bound"))
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
    """|alpha| per layer against eps with each layer's bound overlaid (dashed), and W1 against eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = result["eps"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = result["layers"]
    for j, name in enumerate(names):
        for s, seed_runs in enumerate(result["per_seed"]):
            ax.plot(eps, [r["alpha"][j] for r in seed_runs], "o-", color=f"C{j}", lw=1.2, ms=4,
                    label=f"|alpha| {name}" if s == 0 else None)
            ax.plot(eps, [r["bound"][j] for r in seed_runs], "--", color=f"C{j}", lw=1,
                    label=f"2 sqrt(m) B W1 {name}" if s == 0 else None)
            ax2.plot(eps, [r["w1"][j] for r in seed_runs], "o-", color=f"C{j}", ms=4,
                     label=name if s == 0 else None)
    if "bound_population" in result:
        ax.plot(eps, result["bound_population"], ":", color="C0", lw=1.5,
                label=f"{names[0]}: 2 sqrt(m) B (2 eps E|f|) (population)")
        ax2.plot(eps, result["w1_population_upper"], ":", color="C0", lw=1.5,
                 label=f"{names[0]}: population upper bound 2 eps E|f|")
    ax.axhline(0.01, color="k", ls=":", lw=0.8, label="prune threshold 0.01")
    for a in (ax, ax2):
        a.set_xscale("symlog", linthresh=0.01)
        a.set_xlim(0, max(eps) * 1.2)
        a.set_xlabel("eps (symmetry-breaking strength)")
    ax.set_yscale("symlog", linthresh=1e-4)  # eps = 0's population bound is exactly 0
    ax.set_ylim(0, None)
    ax.set_ylabel("final max_i |alpha_i|  /  bound")
    ax.set_title("RECM alpha vs symmetry gap (defaults, a=1e-3)")
    ax.legend(fontsize=6, ncol=2)
    ax2.set_ylabel("W1(p, p_G) of (z_l, y)")
    ax2.set_title("library symmetry-gap estimate per layer input")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep, print a table, optionally write JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="600 steps, one seed, 6 eps values")
    p.add_argument("--eps", type=float, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=1024, help="held-out samples for W1")
    p.add_argument("--n-elements", type=int, default=8, help="Haar rotations in the symmetrised measure")
    p.add_argument("--max-points", type=int, default=2048, help="atoms of the symmetrised measure")
    p.add_argument("--json", nargs="?", type=Path, const=ROOT / "docs/results/symmetry_gap.json", default=None)
    p.add_argument("--png", type=Path, default=None, help="plot path (default: next to --json)")
    p.add_argument("--from-json", type=Path, default=None, help="re-derive the plot of a saved run, no training")
    cfg = p.parse_args(argv)
    if cfg.from_json is not None:
        result = json.loads(cfg.from_json.read_text())
        add_population_bound(result)
        cfg.from_json.write_text(json.dumps(result, indent=1))
        plot(result, cfg.png or cfg.from_json.with_suffix(".png"))
        return result
    cfg.eps = cfg.eps or (list(EPS[:6]) if cfg.quick else list(EPS))
    cfg.steps = cfg.steps or (600 if cfg.quick else 3000)
    cfg.seeds = cfg.seeds or ([0] if cfg.quick else [0, 1])
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    per_seed: list[list[dict[str, Any]]] = []
    for seed in cfg.seeds:
        runs = []
        for eps in cfg.eps:
            model, opt = train(eps, cfg.steps, cfg.batch, seed)
            r = measure(model, opt, eps, cfg.n_eval, cfg.n_elements, cfg.max_points, seed)
            runs.append(r)
            held = all(a <= b for a, b in zip(r["alpha"], r["bound"]))
            print(f"[{time.perf_counter() - t0:6.1f}s] seed={seed} eps={eps:<5g} |alpha|=" +
                  " ".join(f"{a:.2e}" for a in r["alpha"]) + "  W1=" + " ".join(f"{w:.3f}" for w in r["w1"]) +
                  "  bound=" + " ".join(f"{b:.2f}" for b in r["bound"]) + f"  holds={held}", flush=True)
        per_seed.append(runs)
    names = per_seed[0][0]["names"]
    argv_used = argv if argv is not None else sys.argv[1:]
    result = {
        "eps": cfg.eps,
        # alpha[i][l]: final max_i |alpha_i| of layer l at eps[i], mean over seeds.
        "alpha": [[sum(s[i]["alpha"][l] for s in per_seed) / len(per_seed) for l in range(len(names))]
                  for i in range(len(cfg.eps))],
        # w1[i] and bound[i]: the first layer's (its input is the data x itself), mean over seeds.
        "w1": [sum(s[i]["w1"][0] for s in per_seed) / len(per_seed) for i in range(len(cfg.eps))],
        "bound": [sum(s[i]["bound"][0] for s in per_seed) / len(per_seed) for i in range(len(cfg.eps))],
        "layers": names,
        "per_seed": per_seed,
        "bound_holds": all(a <= b for s in per_seed for r in s for a, b in zip(r["alpha"], r["bound"])),
        "state_dim": 16,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "command": "python benchmarks/symmetry_gap.py " + " ".join(shlex.quote(a) for a in argv_used),
        "seconds": time.perf_counter() - t0,
    }
    add_population_bound(result)
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(result, indent=1))
        print("wrote", cfg.json)
    png = cfg.png or (cfg.json.with_suffix(".png") if cfg.json is not None else None)
    if png is not None:
        plot(result, png)
        print("wrote", png)
    return result


if __name__ == "__main__":
    main()
