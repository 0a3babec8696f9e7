"""The cheap tasks of the tuning-free benchmark: two layouts, each symmetric and broken.

* ``vector``: the demo's ``VectorNet`` (three relaxed vector layers, SO(3)) on
  ``examples/vector_model.py::make_task``; ``broken = 0`` is exactly rotation-equivariant.
* ``set``: three relaxed DeepSets layers on sets of ``N = 5`` elements with ``F = 4`` features
  (``(B, N, F)``, the permutation group S_5 through its generating set), per-element targets
  ``(B, N)``. Symmetric: ``y_i = tanh(x_i . u) + (mean_j x_j) . v`` (permutation-equivariant);
  broken adds ``0.5 * position_i`` with ``position = (-2, -1, 0, 1, 2)``, which no
  permutation-equivariant map can produce from exchangeable inputs.

Every batch is fresh (a new i.i.d. sample), so the symmetric tasks have a symmetric training
distribution: the premise of "every term pruned".
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import recm_opt as recm

ROOT = Path(__file__).resolve().parents[2]
N_SET, F_SET = 5, 4


def vector_model() -> Any:
    """``examples/vector_model.py`` as a module."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    return importlib.import_module("vector_model")


@recm.relaxed(inputs=recm.Permutation("b set f", axis="set"), terms={"weight": "un"})
class RelaxedSetLinear(nn.Module):
    """DeepSets layer ``x W_1 + mean(x) W_2 + b`` with a dense map over all ``N F`` values as its relaxation."""

    def __init__(self, f_in: int, f_out: int, n: int = N_SET) -> None:
        super().__init__()
        self.own = nn.Linear(f_in, f_out)
        self.pool = nn.Linear(f_in, f_out, bias=False)
        self.un = nn.Parameter(torch.zeros(n * f_out, n * f_in))
        self.n, self.f_out = n, f_out

    def equivariant(self, z: Tensor) -> Tensor:  # noqa: D102
        return self.own(z) + self.pool(z.mean(1, keepdim=True))

    def unconstrained(self, term: str, z: Tensor) -> Tensor:  # noqa: D102
        return (z.flatten(1) @ self.un.T).view(len(z), self.n, self.f_out)


class SetNet(nn.Module):
    """Three relaxed set layers with GELU between them: ``(B, N, F) -> (B, N)``."""

    def __init__(self, f_in: int = F_SET, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([RelaxedSetLinear(f_in, hidden), RelaxedSetLinear(hidden, hidden),
                                     RelaxedSetLinear(hidden, 1)])

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        for i, layer in enumerate(self.layers):
            z = layer(z)
            if i < len(self.layers) - 1:
                z = nn.functional.gelu(z)
        return z[..., 0]


def make_set_task(n: int, broken: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, N, F)`` and per-element targets ``(n, N)`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_SET, F_SET, generator=g)
    u = torch.tensor([1.0, -0.5, 0.25, 0.0])
    v = torch.tensor([0.0, 0.5, 0.0, -1.0])
    y = torch.tanh(x @ u) + (x.mean(1) @ v)[:, None]
    if broken:
        y = y + broken * 0.5 * torch.arange(-(N_SET // 2), N_SET // 2 + 1, dtype=torch.float32)
    return x, y


def fit(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int, batch: int) -> None:
    """``steps`` MSE steps on consecutive batches of ``(x, y)``, each paired with its target."""
    for step in range(steps):
        xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        (model(xb) - yb).pow(2).mean().backward()
        opt.step(target=yb)
        opt.zero_grad()


TASKS = {
    "vector-symmetric": ("vector", 0.0),
    "vector-broken": ("vector", 1.0),
    "set-symmetric": ("set", 0.0),
    "set-broken": ("set", 1.0),
}


def build(task: str, inner_name: str, seed: int, steps: int, **settings: Any) -> tuple[nn.Module, Any, Any]:
    """Model, RECM optimizer (told the run length) and a ``sample(n, seed)`` function for one task."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    layout, broken = TASKS[task]
    if layout == "vector":
        vm = vector_model()
        model: nn.Module = vm.VectorNet()
        kw: dict[str, Any] = {"group": recm.SO3Generators(), "target": recm.Vector("b xyz"),
                              "example": torch.zeros(1, 4, 3)}

        def sample(n: int, s: int) -> tuple[Tensor, Tensor]:
            return vm.make_task(n, broken, seed=s)
    else:
        model = SetNet()
        kw = {"group": recm.PermutationGenerators(N_SET), "target": recm.Permutation("b set", axis="set", set=N_SET),
              "example": torch.zeros(1, N_SET, F_SET)}

        def sample(n: int, s: int) -> tuple[Tensor, Tensor]:
            return make_set_task(n, broken, seed=s)
    if inner_name == "adamw":
        inner: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    opt = recm.RECMOptimizer(inner, model, total_steps=steps, seed=seed, **kw, **settings)
    return model, opt, sample
