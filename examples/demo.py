"""Demo: RECM on one synthetic task in two versions, exactly symmetric and broken.

Trains ``VectorNet`` (three relaxed vector layers) with ``RECMOptimizer`` and its
defaults, which derive from the run length (``total_steps``), with Adam lr 1e-3 for the
weights and batches of 64. Expected: on the symmetric
version every term ends pruned and the exported model is exactly
equivariant; on the broken version at least one layer keeps alpha > 0.01.

Run: ``make demo`` (or ``python examples/demo.py --steps 3000``). About 1.5 min on one CPU core.

The demo runs torch on one thread (``--threads``): its model is small, and torch's
default of one thread per core thrashes when the cores are shared. With one other busy
process on a 2-core machine a step took 357 ms at 2 threads and 17.9 ms at 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vector_model import VectorNet, make_task  # noqa: E402

import recm_opt as recm  # noqa: E402
from recm_opt.monitoring import metrics, plot_history  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # without tqdm (the progress extra): a line every tenth of the run
    def tqdm(it, desc="", **_):  # type: ignore[no-redef]
        items = list(it)
        for i, item in enumerate(items):
            if i % max(1, len(items) // 10) == 0:
                print(f"{desc}: {i}/{len(items)}", flush=True)
            yield item


def train(
    broken: float, steps: int, batch: int = 64, seed: int = 0
) -> tuple[torch.nn.Module, recm.RECMOptimizer, tuple[list[int], list[dict[str, float]]]]:
    """Train one run; return the model, its optimizer and the flat RECM metrics logged every 10 steps."""
    torch.manual_seed(seed)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3), total_steps=steps)
    x, y = make_task(steps * batch, broken, seed=seed + 1)
    logged_steps: list[int] = []
    history: list[dict[str, float]] = []
    label = "symmetric" if broken == 0 else f"broken={broken}"
    for step in tqdm(range(steps), desc=label, mininterval=1.0):
        xb, yb = x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]
        loss = (model(xb) - yb).pow(2).mean()
        loss.backward()
        opt.step(target=yb)
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            logged_steps.append(step)
            history.append(metrics(opt))  # {"recm/<layer>/alpha/<term>": ..., ".../beta": ..., ".../h_norm": ...}
    return model, opt, (logged_steps, history)


def plot(name: str, logged: tuple[list[int], list[dict[str, float]]], path: Path) -> bool:
    """Save alpha and beta over steps per layer (paper Figure 2 style); False without matplotlib."""
    try:
        plot_history(*logged, path, title=f"{name} task")
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--broken", type=float, default=1.0, help="symmetry-breaking strength of the broken task")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for demo_alpha_<task>.png")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: more threads slow this small model down on busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"training 2 tasks x {args.steps} steps on {args.threads} thread(s); about "
          f"{args.steps / 2000:.1f} min on one free core", flush=True)
    verdicts = []
    start = time.perf_counter()
    for broken in (0.0, args.broken):
        name = "symmetric" if broken == 0 else "broken"
        model, opt, logged = train(broken, args.steps)
        figure = args.out / f"demo_alpha_{name}.png"
        if plot(name, logged, figure):
            print(f"saved alpha and beta over steps to {figure.resolve()}")
        rows = opt.report()
        print(f"\n== {name} task (broken={broken}) ==")
        print(recm.format_report(rows))
        print(f"inference-parameter overhead vs equivariant-only: {recm.parameter_overhead(rows, model):+.2f}")
        kept = [r["name"] for r in rows if r["kept"]]
        verdicts.append((name, kept))
    sym_kept, broken_kept = verdicts[0][1], verdicts[1][1]
    print("\nsymmetric:", "every alpha pruned" if not sym_kept else f"layers kept relaxation: {sym_kept}")
    print("broken:   ", f"layers kept relaxation: {broken_kept}" if broken_kept else "every alpha pruned")
    ok = not sym_kept and bool(broken_kept)
    print(f"trained both tasks in {time.perf_counter() - start:.0f} s")
    print("RESULT:", "as expected" if ok else "NOT as expected")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
