"""Hugging Face Accelerate: save_state / load_state into a freshly built model and optimizer resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TinyNet, batch, example
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

accelerate = pytest.importorskip("accelerate")


def setup(seed: int) -> tuple[object, nn.Module, RECMOptimizer, object]:
    torch.manual_seed(seed)
    model = TinyNet(seed=seed)
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"), a=0.1,
                        example=example(model))
    acc = accelerate.Accelerator(cpu=True)
    prepared, wrapped = acc.prepare(model, opt)
    return acc, prepared, opt, wrapped


def train(acc: object, model: nn.Module, opt: RECMOptimizer, wrapped: object, steps: range) -> None:
    for step in steps:
        x, y = batch(16, seed=step)
        with opt.pair(y):  # the RECMOptimizer itself: Accelerate wraps it
            loss = (model(x) - y).pow(2).mean()
        acc.backward(loss)  # type: ignore[attr-defined]
        wrapped.step()  # type: ignore[attr-defined]
        wrapped.zero_grad()  # type: ignore[attr-defined]


def state(model: nn.Module) -> list[Tensor]:
    return [v.clone() for v in model.state_dict().values()]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_save_state_and_load_state_into_a_fresh_model_and_optimizer(tmp_path: Path) -> None:
    """Two steps, save_state; a fresh model and optimizer load_state and continue exactly like the first."""
    acc, model, opt, wrapped = setup(0)
    train(acc, model, opt, wrapped, range(2))
    acc.save_state(str(tmp_path))  # type: ignore[attr-defined]

    acc2, model2, opt2, wrapped2 = setup(5)  # another init: everything must come from the checkpoint
    acc2.load_state(str(tmp_path))  # type: ignore[attr-defined]
    assert int(model2.enc.recm_modulation.t) == 2
    assert all(torch.equal(a, b) for a, b in zip(state(model2), state(model)))

    train(acc, model, opt, wrapped, range(2, 4))
    train(acc2, model2, opt2, wrapped2, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(state(model2), state(model)))
