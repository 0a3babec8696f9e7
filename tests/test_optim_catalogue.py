"""Every optimizer class and configuration of PyTorch's own optimizer tests, wrapped by RECM.

``optim_db`` (torch's internal testing catalogue) lists each optimizer with the inputs its
own tests use. For each, on the README's model: 3 steps, a ``weights_only`` checkpoint of
model, optimizer and a StepLR over every group, a fresh model and optimizer loaded from
it, 2 more steps on both: the resumed run equals the uninterrupted one bit for bit, and
the scheduler drove every group of the inner optimizer (RECM's own group follows RECM's
step-size schedule). Skipped: only what needs sparse gradients (or a GPU,
which the CPU inputs never ask for). An optimizer added to torch is covered the day it lands.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import sys
import types
import unittest
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import recm_opt as recm


def _catalogue() -> list[Any]:
    # torch's testing helpers import expecttest (a test-only dependency) for their TestCase base
    # (not installed: a stand-in with unittest's, enough to read the catalogue)
    if "expecttest" not in sys.modules and importlib.util.find_spec("expecttest") is None:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stub
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception:  # an internal module: a torch without it has no catalogue to test
        return []
    return [pytest.param(info, opt_input, id=f"{info.optim_cls.__name__}-{opt_input.desc}")
            for info in optim_db for opt_input in info.optim_inputs_func(device="cpu")]


CASES = _catalogue()


@recm.relaxed(inputs=recm.Vector("b c xyz"), terms={"weight": "un"})
class RelaxedLinear(nn.Module):
    """The README's layer: channel mixing (equivariant) and a dense map on the 3C values."""

    def __init__(self, c_in: int, c_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.eq = nn.Parameter(torch.randn(c_out, c_in, generator=g) / c_in**0.5)
        self.un = nn.Parameter(torch.randn(3 * c_out, 3 * c_in, generator=g) * 1e-2)

    def equivariant(self, z: Tensor) -> Tensor:
        return torch.einsum("oc,bcx->box", self.eq, z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return (z.flatten(1) @ self.un.T).view(len(z), -1, 3)


def _build(info: Any, opt_input: Any, seed: int) -> tuple[nn.Module, recm.RECMOptimizer, Any]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(RelaxedLinear(4, 8, g), RelaxedLinear(8, 1, g), nn.Flatten())
    inner = info.optim_cls(model.parameters(), **copy.deepcopy(opt_input.kwargs))  # a tensor lr is changed in place
    opt = recm.RECMOptimizer(inner, model, group=recm.SO3Generators(), target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3), total_steps=10)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)


def _steps(model: nn.Module, opt: recm.RECMOptimizer, sched: Any, steps: range, closure: bool) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, 3, generator=g)
        y = x.sum(1) + torch.tensor([0.5, 0.0, 0.0])

        def loss_fn(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn, target=y)
        else:
            loss_fn()
            opt.step(target=y)
        sched.step()


def _tensors(model: nn.Module, opt: recm.RECMOptimizer) -> list[Tensor]:
    out = [v for v in model.state_dict().values() if isinstance(v, Tensor)]
    for entry in opt.state_dict()["state"].values():
        out += [v for v in entry.values() if isinstance(v, Tensor)]
    return out


@pytest.mark.skipif(not CASES, reason="torch.testing._internal.common_optimizers is not available")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("info", "opt_input"), CASES or [pytest.param(None, None, id="none")])
def test_catalogue_optimizer_resumes_bit_exactly_under_recm(info: Any, opt_input: Any) -> None:
    """3 steps, weights_only checkpoint, fresh pair, 2 more steps == 5 uninterrupted ones; StepLR drives each group."""
    if info.only_supports_sparse_grads:
        pytest.skip("needs sparse gradients")
    closure = info.step_requires_closure
    ref, ref_opt, ref_sched = _build(info, opt_input, seed=0)
    _steps(ref, ref_opt, ref_sched, range(5), closure)

    model, opt, sched = _build(info, opt_input, seed=0)
    _steps(model, opt, sched, range(3), closure)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model, opt, sched = _build(info, opt_input, seed=1)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    _steps(model, opt, sched, range(3, 5), closure)

    got, want = _tensors(model, opt), _tensors(ref, ref_opt)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    for group in opt.param_groups:
        if not group.get("recm"):  # RECM's own group follows RECM's step-size schedule, whatever the scheduler
            assert float(group["lr"]) == pytest.approx(float(group["initial_lr"]) * 0.5**5)
    assert all(int(layer.recm_modulation.t) == 5 for layer in model if recm.is_relaxed(layer))
