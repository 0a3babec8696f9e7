"""PyTorch Lightning: a RECMOptimizer from configure_optimizers trains under Trainer.

Lightning calls ``optimizer.step(closure)`` itself, and its closure runs
``training_step``, then ``zero_grad``, then ``backward``. The target therefore
reaches RECM through ``observe(y)`` inside ``training_step`` (the pattern that
docs/training-loops.md documents); the captures survive Lightning's
``zero_grad`` because their backward has not run yet.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TinyVectorLinear
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

pl = pytest.importorskip("pytorch_lightning")

STEPS = 4


class LitVectors(pl.LightningModule):
    """The documented pattern: return the wrapper from configure_optimizers, observe(y) in training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = TinyVectorLinear(4, 6, seed=1)
        self.dec = TinyVectorLinear(6, 1, seed=2)
        self.losses: list[float] = []

    def forward(self, z: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(z)))[:, 0]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.optimizers().observe(y)  # pairs this forward's captured inputs with the target
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> RECMOptimizer:
        return RECMOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2), self,
                             target=recm.Vector("b xyz"), a=0.1, example=torch.zeros(1, 4, 3))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 4, 3, generator=g)
    y = x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0])
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice about num_workers etc.
def test_lightning_trainer_trains_with_observe_in_training_step() -> None:
    """Trainer.fit runs STEPS optimizer steps; each advances every layer's h with that step's batch."""
    model = LitVectors()
    before = model.enc.weight.detach().clone()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader())
    assert trainer.global_step == STEPS
    for layer in (model.enc, model.dec):
        mod = layer.recm_modulation
        assert int(mod.t) == STEPS and torch.isfinite(mod.h).all() and mod.h.abs().max() > 0
        assert mod.newest is not None and mod.newest.shape[1] == 8  # the last batch, captured once
    assert not torch.equal(before, model.enc.weight)
    assert all(math.isfinite(v) for v in model.losses) and len(model.losses) == STEPS


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_from_checkpoint_continues_h(tmp_path) -> None:
    """fit(ckpt_path=...) into a fresh module: Lightning restores the model (and its RECM state) before
    configure_optimizers, the optimizer adopts it, and training continues from t = 2 to t = STEPS."""
    def trainer(steps: int, **kw: object) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, **kw)

    torch.manual_seed(0)
    first = LitVectors()
    t = trainer(2, default_root_dir=str(tmp_path), enable_checkpointing=True)
    t.fit(first, loader())
    ckpt = str(tmp_path / "resume.ckpt")
    t.save_checkpoint(ckpt)

    evaluated = LitVectors()  # the model alone, for evaluation: its RECM state comes with it
    evaluated.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    assert torch.equal(evaluated.enc.recm_modulation.h, first.enc.recm_modulation.h)

    torch.manual_seed(1)  # another init: everything comes from the checkpoint
    resumed = LitVectors()
    assert not hasattr(resumed.enc, "recm_modulation")
    trainer(STEPS, enable_checkpointing=False).fit(resumed, loader(), ckpt_path=ckpt)
    assert int(resumed.enc.recm_modulation.t) == STEPS
    opt = resumed.trainer.optimizers[0]
    assert [len(g["params"]) for g in opt.param_groups] == [4, 12]  # the layers' own, then RECM's


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers).*")
def test_second_fit_takes_over_from_the_first_optimizer() -> None:
    """A second trainer.fit on the same module builds a new optimizer, which takes over and continues h."""
    model = LitVectors()
    for expected in (STEPS, 2 * STEPS):
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, loader())
        assert int(model.enc.recm_modulation.t) == expected
