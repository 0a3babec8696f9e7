"""Training, evaluation and paired statistics shared by the N-body experiments.

One run trains one (architecture, method, data variant, seed). Methods:

- ``plain``: the equivariant network with Adam.
- ``recm``: the same network with its update maps ``@relaxed``, trained with
  ``RECMOptimizer(Adam, model, target=Vector("n xyz"), total_steps=...)`` at the library defaults.
- ``es``: the relaxed network under the library's ``EquivarianceSchedule`` (alpha
  follows a triangle over the whole run, the branch is dropped in evaluation).

For one seed every method starts from the same equivariant weights (the relaxed
network copies the plain one) and sees the same shuffling. Each epoch the
validation MSE is measured; the test MSE is measured at every new best validation
epoch (RECM's state lives in buffers a weight snapshot would not restore) and at
the final epoch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

import recm_opt as recm
from benchmarks import stats
from benchmarks.models.egnn import EGNN, _segment_mean
from benchmarks.models.segnn import SEGNN
from benchmarks.nbody import data as nd

TARGET = recm.Vector("n xyz")  # per-node 3-vector target (flattened-node layout)
ARCHS = ("egnn", "segnn", "gnn")
METHODS = ("plain", "recm", "es")


class PlainGNN(nn.Module):
    """A non-equivariant message-passing baseline on raw coordinates.

    Node inputs ``[x - centre, v, ||v||, q]``, edge inputs ``[x_i - x_j, ||x_i - x_j||^2, q_i q_j]``,
    ``n_layers`` residual MLP message-passing layers and a linear read-out of the position
    increment. Centring keeps it translation-equivariant; nothing ties it to rotations.
    """

    def __init__(self, hidden: int = 64, n_layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, hidden)
        self.msg = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden + 5, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                               nn.SiLU()) for _ in range(n_layers))
        self.upd = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                 for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(hidden + 6, hidden), nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, h: Tensor, x: Tensor, v: Tensor, edge_index: Tensor, edge_attr: Tensor,
                batch: Tensor) -> Tensor:
        """Predicts positions (N,3); ``h`` must be ``[||v||, q]`` (N,2)."""
        n_graphs = int(batch.max()) + 1 if batch.numel() else 0
        centre = _segment_mean(x, batch, n_graphs)[batch]
        x = x - centre
        row, col = edge_index
        rel = x[row] - x[col]
        e = torch.cat([rel, (rel**2).sum(1, keepdim=True), edge_attr], 1)
        f = self.embed(torch.cat([x, v, h], 1))
        for msg, upd in zip(self.msg, self.upd):
            m = msg(torch.cat([f[row], f[col], e], 1))
            f = f + upd(torch.cat([f, _segment_mean(m, row, f.shape[0])], 1))
        return x + centre + self.head(torch.cat([f, x, v], 1))


def build_model(arch: str, method: str, seed: int, charge_feature: bool = False, **kw: Any) -> nn.Module:
    """A network whose equivariant weights are the same for every method at one seed.

    Args:
        arch: ``"egnn"``, ``"segnn"`` or ``"gnn"`` (the non-equivariant baseline; plain only).
        method: ``"plain"``, ``"recm"`` or ``"es"``.
        seed: Initialisation seed.
        charge_feature: Give each node its charge as an input scalar.
        **kw: Architecture options (``hidden``, ``n_layers``).
    """
    if arch not in ARCHS or method not in METHODS or (arch == "gnn" and method != "plain"):
        raise ValueError(f"build_model: no model for arch={arch!r}, method={method!r}")
    torch.manual_seed(seed)
    if arch == "gnn":
        return PlainGNN(**kw)
    cls = EGNN if arch == "egnn" else SEGNN
    key = "in_node" if arch == "egnn" else "in_scalars"
    kw = {key: 2 if charge_feature else 1, **kw}
    plain = cls(**kw)
    if method == "plain":
        return plain
    model = cls(relaxed=True, **kw)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    if unexpected or not all(any(c in k for c in ("un_weight", "un_bias", "noise_scale")) for k in missing):
        raise RuntimeError(f"relaxed {arch} does not extend the plain one: {missing}, {unexpected}")
    return model


def make_optimizer(method: str, model: nn.Module, total_steps: int, lr: float,
                   wd: float, example: tuple[Tensor, ...] | None = None,
                   es_reg_weight: float = 0.0) -> torch.optim.Optimizer:
    """Adam, RECM around Adam, or the library's triangle schedule around Adam.

    ``example`` is one batch of model inputs; RECM sizes each layer's ``r_theta`` from it.
    ES runs schedule-only here (``es_reg_weight=0``): the library's Lie-derivative
    regulariser acts on ``Vector`` inputs only, and SEGNN's are ``Irreps`` (a labelled departure).
    """
    inner = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if method == "plain":
        return inner
    if method == "recm":
        return recm.RECMOptimizer(inner, model, target=TARGET, example=example, total_steps=total_steps)
    return recm.EquivarianceSchedule(inner, model, target=TARGET, total_steps=total_steps, example=example,
                                     reg_weight=es_reg_weight)


def example_inputs(model: nn.Module, data: dict[str, Tensor], charge_feature: bool = False) -> tuple[Tensor, ...]:
    """The model inputs of the first training simulation (the ``example=`` batch)."""
    dtype = next(model.parameters()).dtype
    g = nd.batch_graphs(*(data[k][:1].to(dtype) for k in ("loc", "vel", "charges", "target")),
                        charge_feature=charge_feature)
    return g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"]


def predict(model: nn.Module, data: dict[str, Tensor], idx: Tensor,
            charge_feature: bool = False) -> tuple[Tensor, Tensor]:
    """Runs the model on simulations ``idx``; returns (prediction, target), flattened nodes."""
    dtype = next(model.parameters()).dtype
    g = nd.batch_graphs(*(data[k][idx].to(dtype) for k in ("loc", "vel", "charges", "target")),
                        charge_feature=charge_feature)
    return model(g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"]), g["y"]


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, Tensor], charge_feature: bool = False,
             batch_size: int = 500) -> float:
    """MSE (mean over all coordinates, as in EGNN) on one split, in eval mode."""
    model.eval()
    n = data["loc"].shape[0]
    total = 0.0
    for idx in torch.arange(n).split(batch_size):
        pred, y = predict(model, data, idx, charge_feature)
        total += float(((pred - y) ** 2).sum())
    return total / (n * data["loc"].shape[1] * data["loc"].shape[2])


def alpha_snapshot(opt: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    """``{layer: {term: alpha}}`` (the training-time alpha for the schedule; empty for Adam)."""
    if not hasattr(opt, "report"):
        return {}
    rows = opt.report()
    if hasattr(opt, "scheduled_alpha"):
        return {r["name"]: {t: opt.scheduled_alpha(r["name"]) for t in r["alpha"]} for r in rows}
    return {r["name"]: {t: float(a) for t, a in r["alpha"].items()} for r in rows}


def train_run(arch: str, method: str, data: dict[str, dict[str, Tensor]], epochs: int, seed: int,
              batch_size: int = 100, lr: float = 5e-4, wd: float = 1e-12, charge_feature: bool = False,
              model_kw: dict[str, Any] | None = None, log: Any = None) -> dict[str, Any]:
    """Trains one model; returns its curves, test MSE at the best validation and final epoch, and alphas."""
    model = build_model(arch, method, seed, charge_feature, **(model_kw or {}))
    n_train = data["train"]["loc"].shape[0]
    steps_per_epoch = -(-n_train // batch_size)
    opt = make_optimizer(method, model, epochs * steps_per_epoch, lr, wd,
                         example=example_inputs(model, data["train"], charge_feature))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"val_mse": [], "train_loss": [], "best_val": math.inf, "alpha_epochs": []}
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for idx in torch.randperm(n_train, generator=gen).split(batch_size):
            pred, y = predict(model, data["train"], idx, charge_feature)
            loss = nn.functional.mse_loss(pred, y)
            opt.zero_grad()
            loss.backward()
            opt.step(target=y) if method != "plain" else opt.step()
            losses.append(loss.item())
        out["train_loss"].append(sum(losses) / len(losses))
        out["val_mse"].append(evaluate(model, data["valid"], charge_feature))
        if method != "plain":
            out["alpha_epochs"].append(alpha_snapshot(opt))
        if out["val_mse"][-1] < out["best_val"]:
            out["best_val"], out["best_epoch"] = out["val_mse"][-1], epoch
            out["test_at_best"] = evaluate(model, data["test"], charge_feature)
        if log is not None and (epoch % 10 == 0 or epoch == epochs - 1):
            print(f"[{arch}/{method} seed {seed}] epoch {epoch}: train {out['train_loss'][-1]:.5f} "
                  f"val {out['val_mse'][-1]:.5f} test@best {out['test_at_best']:.5f} "
                  f"({(time.perf_counter() - start) / (epoch + 1):.2f} s/epoch)", file=log, flush=True)
    out["test_final"] = evaluate(model, data["test"], charge_feature)
    out["val_final"] = out["val_mse"][-1]
    out["wall_s"] = time.perf_counter() - start
    if method != "plain":
        rows = opt.report()
        out["final_alpha"] = {r["name"]: {t: float(a) for t, a in r["alpha"].items()} for r in rows}
        out["kept"] = {r["name"]: list(r["kept"]) for r in rows if r["kept"]}
        out["max_abs_alpha"] = max(abs(a) for d in out["final_alpha"].values() for a in d.values())
        out["param_overhead"] = recm.parameter_overhead(rows, model)
    return out


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired difference ``b - a`` over seeds: mean, 95% t-interval, and whether it is within noise.

    Args:
        a: Baseline values, one per seed.
        b: Compared values, same seeds in the same order.

    Returns:
        ``{"n", "mean", "ci95": [lo, hi], "rel_mean", "within_noise"}``; ``rel_mean`` is the mean
        difference relative to the mean of ``a``.
    """
    d = stats.paired(a, b)
    n = len(a)
    return {"n": n, "mean": d.mean, "ci95": [d.lo, d.hi], "rel_mean": d.mean / (sum(a) / n) if sum(a) else None,
            "within_noise": d.within_noise}


def mean_sd(values: list[float]) -> list[float]:
    """``[mean, sample sd]`` (sd 0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return [float(t.mean()), float(t.std()) if len(values) > 1 else 0.0]
