"""FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo ranks on CPU train a sharded model with RECM.

Every parameter of the model, the tagged layers' included, is a DTensor sharded over the two
ranks; the modulations that RECMOptimizer adds afterwards are plain tensors that it keeps
identical on every rank (their gradients and each layer's ``l_theta`` are averaged over the
ranks, as under DDP). The test checks that the ranks hold the same state; that the sharded run
equals one process on the concatenated batch to float32 rounding; that ``dcp.save`` / ``dcp.load``
restore a freshly built sharded model and optimizer exactly, after which the ranks keep agreeing;
and that the gathered full state dict loads into a plain model whose export gives the sharded
model's eval output.

One limit, shared with DDP: distributed checkpointing keeps one copy of each entry that is not
sharded, so every rank resumes with the coordinator's newest sample (the next step's gradient
path into ``r_theta``), and a resumed run is not bit-exact with the uninterrupted one.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from tiny import TinyNet, example, spawn_ranks
from torch import Tensor, nn

import recm_opt as recm

WORLD, STEPS, PER_RANK = 2, 4, 16


def data(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``; rank r takes the r-th slice."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(WORLD * PER_RANK, 4, 3, generator=g)
    return x, x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0])


def build(sharded: bool, scale: float = 1.0) -> tuple[nn.Module, recm.RECMOptimizer]:
    """TinyNet (its unconstrained weights times ``scale``), sharded by fully_shard or not, and its optimizer."""
    model = TinyNet()
    with torch.no_grad():
        for layer in (model.enc, model.dec):
            layer.un.mul_(scale)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.enc, mesh=mesh)
        fully_shard(model.dec, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                             example=example(TinyNet()), total_steps=2 * STEPS)
    return model, opt


def train(model: nn.Module, opt: recm.RECMOptimizer, steps: range, rank: int | None) -> None:
    for step in steps:
        x, y = data(step)
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()


def full(model: nn.Module) -> dict[str, Tensor]:
    """The model's whole state (sharded parameters gathered), as plain tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.clone() for k, v in state.items()}


def _flat(state: dict) -> dict[str, Tensor]:
    """The optimizer state's tensors (the newest sample's one-tuple left out), keyed by parameter and name."""
    return {f"{p}/{k}": v for p, entry in state.items() for k, v in entry.items() if isinstance(v, Tensor)}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, opt = build(sharded=True)
        train(model, opt, range(1), rank)
        result: dict[str, object] = {"names": list(opt.layers), "one": full(model)}
        train(model, opt, range(1, STEPS), rank)
        result["state"] = full(model)
        msd, osd = get_state_dict(model, opt)
        result["saved_inner_tmp"] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
                                     for k, v in _flat(osd["state"]).items()}
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "dcp"))
        train(model, opt, range(STEPS, 2 * STEPS), rank)
        result["continued"] = full(model)

        fresh, fresh_opt = build(sharded=True)  # straight after construction
        msd, osd = get_state_dict(fresh, fresh_opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(out, "dcp"))
        set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        result["loaded"] = full(fresh)
        result["loaded_inner"] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
                                  for k, v in _flat(get_state_dict(fresh, fresh_opt)[1]["state"]).items()}
        result["saved_inner"] = result.pop("saved_inner_tmp")
        train(fresh, fresh_opt, range(STEPS, 2 * STEPS), rank)
        result["resumed"] = full(fresh)

        big, _ = build(sharded=True, scale=1e3)  # construction projects the sharded weights onto their ball
        result["projected"] = full(big)

        x, _ = data(99)
        model.eval()
        with torch.no_grad():
            result["eval_out"] = model(x).clone()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_ddp.py: skip the interpreter's teardown of gloo's threads


WATCHDOG_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed (FSDP2)")
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2"), "FSDP2", WATCHDOG_S)


@pytest.mark.slow
def test_ranks_agree_and_h_moved(ranks: list[dict]) -> None:
    """Both ranks hold the same whole state (gathered parameters, h, t), under the plain layer names."""
    a, b = ranks
    assert a["names"] == b["names"] == ["enc", "dec"]
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert int(a["state"]["enc.recm_modulation.t"]) == STEPS
    assert float(a["state"]["enc.recm_modulation.h"].norm()) > 0


@pytest.mark.slow
def test_sharded_run_matches_one_process_on_the_whole_batch(ranks: list[dict]) -> None:
    """Two sharded ranks of 16 samples equal one unsharded process on all 32 (weights, h, every RECM entry), to
    float32 rounding, after one step and after 2 * STEPS (measured: 1.8e-6 at most)."""
    for steps, key in ((1, "one"), (2 * STEPS, "continued")):
        model, opt = build(sharded=False)
        train(model, opt, range(steps), rank=None)
        single = model.state_dict()
        assert ranks[0][key].keys() == single.keys()
        assert float(single["enc.recm_modulation.h"].norm()) > 0
        for name, value in ranks[0][key].items():
            torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name, steps=steps: f"{steps} steps, {name}: {m}")


@pytest.mark.slow
def test_projection_of_sharded_weights_uses_their_whole_norm(ranks: list[dict]) -> None:
    """Unconstrained weights 1000x outside their ball, sharded: projected as one process projects them."""
    model, _ = build(sharded=False, scale=1e3)
    for key in ("enc.un", "dec.un"):
        assert 0.99 < float(model.state_dict()[key].norm()) <= 1.0
        for rank in ranks:
            torch.testing.assert_close(rank["projected"][key], model.state_dict()[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_dcp_restores_a_fresh_sharded_model_and_optimizer_exactly(ranks: list[dict]) -> None:
    """dcp.load into a freshly built sharded pair restores the model (h, t, gathered weights) and the inner state
    exactly; the ranks keep agreeing in the steps after it."""
    for rank in ranks:
        for key, value in rank["state"].items():
            assert torch.equal(value, rank["loaded"][key]), key
        assert rank["saved_inner"].keys() == rank["loaded_inner"].keys()
        for key, value in rank["saved_inner"].items():
            assert torch.equal(value, rank["loaded_inner"][key]), key
    a, b = ranks
    for key in a["resumed"]:
        assert torch.equal(a["resumed"][key], b["resumed"][key]), key
    assert int(a["resumed"]["enc.recm_modulation.t"]) == 2 * STEPS


@pytest.mark.slow
def test_gathered_state_exports_the_sharded_models_eval_output(ranks: list[dict]) -> None:
    """The gathered full state dict loads into a plain model; its export gives the sharded model's eval output."""
    plain = TinyNet()
    plain.load_state_dict(ranks[0]["continued"])
    exported = recm.export(plain.eval())
    x, _ = data(99)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), ranks[0]["eval_out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain(x), ranks[0]["eval_out"], rtol=1e-5, atol=1e-6)
    assert int(plain.enc.recm_modulation.t) == 2 * STEPS  # the RECM state travelled with the gathered model
