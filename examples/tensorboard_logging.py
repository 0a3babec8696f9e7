"""Log RECM's alpha, beta and |h| per layer to TensorBoard with ``SummaryWriter``.

Trains the demo's ``VectorNet`` on the broken task and writes, every step, the flat
metrics of :func:`recm_opt.monitoring.metrics` (``recm/<layer>/alpha/<term>``,
``recm/<layer>/beta``, ``recm/<layer>/h_norm``) and the loss.

Run: ``python examples/tensorboard_logging.py --logdir outputs/tb`` then ``tensorboard --logdir outputs/tb``.
Needs ``pip install tensorboard``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vector_model import VectorNet, make_task  # noqa: E402

import recm_opt as recm  # noqa: E402
from recm_opt.monitoring import metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--logdir", type=Path, default=Path("outputs/tb"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3), total_steps=args.steps)
    x, y = make_task(args.steps * args.batch, broken=1.0, seed=1)
    with SummaryWriter(str(args.logdir)) as writer:
        for step in range(args.steps):
            xb, yb = x[step * args.batch : (step + 1) * args.batch], y[step * args.batch : (step + 1) * args.batch]
            loss = (model(xb) - yb).pow(2).mean()
            loss.backward()
            opt.step(target=yb)
            opt.zero_grad()
            writer.add_scalar("train/loss", float(loss), step)
            for key, value in metrics(opt).items():
                writer.add_scalar(key, value, step)
    print(f"wrote {args.steps} steps of RECM metrics to {args.logdir.resolve()}")


if __name__ == "__main__":
    main()
