"""Distributed checkpointing round-trips the RECM state.

``torch.distributed.checkpoint.state_dict`` keys the optimizer state by parameter
FQN and keeps only ``{state, param_groups}``; RECM's state rides in the state entry
of each layer's ``w_beta`` (``recm_*`` keys), so it survives. On an optimizer
without state, ``get_optimizer_state_dict`` first runs ``step()`` with zero
gradients and lr = 0: that step must change nothing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tiny import TinyNet, example, train_steps
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer


def build(seed: int = 0) -> tuple[TinyNet, RECMOptimizer]:
    model = TinyNet(seed)
    # AdamW with weight decay: a step at lr = 0 must still move nothing.
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, RECMOptimizer(inner, model, target=recm.Vector("b xyz"), a=0.1, example=example(model),
                                total_steps=1000)




def recm_state(model: TinyNet) -> list[Tensor]:
    out = []
    for layer in (model.enc, model.dec):
        mod = layer.recm_modulation
        out += [mod.h.clone(), mod.t.clone(), mod.gamma_t.clone()]
        out += [mod.newest.clone()] if mod.newest is not None else []
    return out


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_zero_gradient_initialisation_step_changes_nothing() -> None:
    """get_optimizer_state_dict on a fresh optimizer steps with zero grads: weights and RECM state stay put."""
    model, opt = build()
    before, state = params(model), recm_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "layer did not run" warning from the dummy step either
        osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(params(model), before))
    assert all(torch.equal(a, b) for a, b in zip(recm_state(model), state))
    assert opt.skipped_steps == 0
    assert "enc.recm_modulation.w_beta" in osd["state"]
    assert osd["state"]["enc.recm_modulation.w_beta"]["recm_layer"] == "enc"
    # The model trains normally afterwards.
    train_steps(model, opt, range(2))
    assert int(model.enc.recm_modulation.t) == 2


def test_get_set_optimizer_state_dict_round_trips_recm_state() -> None:
    """The model's dict carries h, t, gamma; the optimizer's the newest sample; resumed training matches bit for bit."""
    model, opt = build()
    train_steps(model, opt, range(3))
    # Through bytes, as a checkpoint would: the dicts alias the live state, which keeps training below.
    buf = io.BytesIO()
    torch.save({"model": get_model_state_dict(model), "opt": get_optimizer_state_dict(model, opt)}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    msd, osd = ckpt["model"], ckpt["opt"]
    entry = osd["state"]["dec.recm_modulation.w_beta"]
    assert {"recm_layer", "recm_newest"} <= set(entry) and entry["recm_layer"] == "dec"
    assert {"dec.recm_modulation.h", "dec.recm_modulation.t", "dec.recm_modulation.gamma_t"} <= set(msd)
    assert {"recm_exp_avg", "recm_exp_avg_sq", "recm_step"} <= set(entry)  # RECM's own moments of w_beta

    other, other_opt = build(seed=5)
    set_model_state_dict(other, msd)
    set_optimizer_state_dict(other, other_opt, osd)
    assert all(torch.equal(a, b) for a, b in zip(recm_state(other), recm_state(model)))

    train_steps(model, opt, range(3, 5))
    train_steps(other, other_opt, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(params(other), params(model)))
    assert all(torch.equal(a, b) for a, b in zip(recm_state(other), recm_state(model)))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single process: no process group
def test_dcp_save_and_load_files_resume_bit_exact(tmp_path: Path) -> None:
    """dcp.save, then dcp.load into a freshly built model and optimizer and set_state_dict, resumes exactly.

    ``dcp.load`` fills the template's tensors in place, so each needs its saved shape. The
    fresh optimizer's template gets its inner state from DCP's zero-gradient step, and the
    newest sample, whose shape follows the batch, is a tuple that loads by replacement.
    """
    model, opt = build()
    train_steps(model, opt, range(3))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))

    other, other_opt = build(seed=5)  # straight after construction: no step taken
    msd, osd = get_state_dict(other, other_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert all(torch.equal(a, b) for a, b in zip(recm_state(other), recm_state(model)))

    train_steps(model, opt, range(3, 5))
    train_steps(other, other_opt, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(params(other), params(model)))
    assert all(torch.equal(a, b) for a, b in zip(recm_state(other), recm_state(model)))
