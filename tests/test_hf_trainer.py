"""The Hugging Face Trainer drives RECM: it calls step(), saves a checkpoint and resumes from it exactly.

The Trainer takes the optimizer through ``optimizers=(opt, None)`` and calls ``step()`` itself, so the
targets are paired in a ``compute_loss`` override with ``opt.observe(labels)`` after the forward. Its
checkpoint holds ``model.state_dict()`` (safetensors: every RECM entry is a tensor) and
``optimizer.state_dict()``; ``train(resume_from_checkpoint=...)`` loads the model, whose RECM state
comes with it, then the optimizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TinyNet, batch, example
from torch import Tensor

import recm_opt as recm

transformers = pytest.importorskip("transformers", reason="needs the test extra: pip install '.[test]'")


class RECMTrainer(transformers.Trainer):
    """The recipe of the training-loops page: observe after the forward, in compute_loss."""

    def __init__(self, *args, recm_opt: recm.RECMOptimizer, observe_first: bool = False, **kwargs) -> None:
        super().__init__(*args, optimizers=(recm_opt, None), **kwargs)
        self.recm_opt = recm_opt  # the Trainer wraps the optimizer it is given
        self.observe_first = observe_first

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if self.observe_first:  # the wrong order: no forward is waiting for this target yet
            self.recm_opt.observe(inputs["labels"])
        out = model(inputs["x"])
        if not self.observe_first:
            self.recm_opt.observe(inputs["labels"])
        loss = (out - inputs["labels"]).pow(2).mean()
        return (loss, out) if return_outputs else loss


def _data(n: int = 96) -> list[dict[str, Tensor]]:
    x, y = batch(n, seed=0)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _train(out: Path, *, resume: str | None = None, observe_first: bool = False) -> tuple[TinyNet, RECMTrainer]:
    torch.manual_seed(0)
    model = TinyNet()
    args = transformers.TrainingArguments(
        str(out), max_steps=12, save_steps=6, per_device_train_batch_size=16, use_cpu=True, seed=0,
        remove_unused_columns=False, report_to=[], disable_tqdm=True, logging_steps=100)
    opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                             example=example(model), total_steps=args.max_steps)
    trainer = RECMTrainer(model=model, args=args, train_dataset=_data(), recm_opt=opt, observe_first=observe_first)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_trains_checkpoints_and_resumes_bit_exactly(tmp_path: Path) -> None:
    """12 Trainer steps equal 6 steps, a checkpoint, and a fresh model and optimizer resumed from it for 6 more."""
    whole, trainer = _train(tmp_path / "whole")
    assert int(whole.enc.recm_modulation.t) == 12 and float(whole.enc.recm_modulation.h.norm()) > 0
    assert trainer.recm_opt.report()[0]["t"] == 12
    ckpt = tmp_path / "whole" / "checkpoint-6"
    assert {"model.safetensors", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}

    resumed, _ = _train(tmp_path / "resumed", resume=str(ckpt))
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_observe_before_the_forward_in_compute_loss_says_where_it_goes(tmp_path: Path) -> None:
    """observe() first in compute_loss pairs nothing; the step raises, saying to call it after the forward."""
    with pytest.raises(ValueError, match=r"before the forward it belongs to: call it after the forward \(in a "
                                         r"Hugging Face Trainer's compute_loss"):
        _train(tmp_path, observe_first=True)
