"""torch.compile: tagged layers train, names are stable, no recompiles per step.

The CPU tests use the ``aot_eager`` backend: it runs Dynamo's tracing, guards and
AOTAutograd exactly as the default backend does, without paying for C++ code
generation (inductor on this tiny model costs tens of seconds per graph on one
core). ``benchmarks/overhead/gpu_checks.py`` repeats the recompile check with inductor on a GPU.
"""

from __future__ import annotations

import io

import pytest
import torch
from tiny import TinyNet, example, train_steps
from torch import Tensor, nn
from torch._dynamo.utils import counters

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

BACKEND = "aot_eager"


def build(model: nn.Module) -> RECMOptimizer:
    return RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"), a=0.1,
                         example=example(model))




def recm_state(model: TinyNet) -> list[Tensor]:
    return [t.clone() for layer in (model.enc, model.dec)
            for t in (layer.recm_modulation.h, layer.recm_modulation.t, layer.recm_modulation.newest)]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.slow
def test_compiled_model_trains_without_recompiles_per_step() -> None:
    """A compiled model with tagged layers trains; after warm-up, further steps compile nothing new."""
    model = TinyNet()
    compiled = torch.compile(model, backend=BACKEND)
    opt = build(compiled)
    assert list(opt.layers) == ["enc", "dec"]  # no "_orig_mod." prefix
    train_steps(compiled, opt, range(2))  # step 1 adds h's newest term to the graph: one expected recompile
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps(compiled, opt, range(2, 8))
    assert counters["stats"]["unique_graphs"] == graphs
    assert int(model.enc.recm_modulation.t) == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.enc.recm_modulation.h.abs().max() > 0


@pytest.mark.slow
def test_checkpoint_moves_between_compiled_and_plain_models() -> None:
    """Optimizer state saved from a compiled model loads into a plain one (and back) with equal RECM state."""
    model = TinyNet()
    compiled = torch.compile(model, backend=BACKEND)
    opt = build(compiled)
    train_steps(compiled, opt, range(3))
    buf = io.BytesIO()
    # The uncompiled module's state dict has the plain names; the compiled wrapper's would add "_orig_mod.".
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    plain = TinyNet()
    plain_opt = build(plain)
    assert list(plain_opt.layers) == list(opt.layers)
    plain.load_state_dict(ckpt["model"])
    plain_opt.load_state_dict(ckpt["opt"])
    assert all(torch.equal(a, b) for a, b in zip(recm_state(plain), recm_state(model)))
    train_steps(plain, plain_opt, range(3, 5))

    # ... and back: the plain run's checkpoint resumes a freshly compiled model.
    again = TinyNet()
    again_opt = build(torch.compile(again, backend=BACKEND))
    again.load_state_dict(plain.state_dict())
    again_opt.load_state_dict(plain_opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(recm_state(again), recm_state(plain)))
    assert int(again.dec.recm_modulation.t) == 5
