"""DDP: two gloo ranks on CPU agree exactly and match one process on the whole batch.

The test starts its own two processes (``torch.multiprocessing.spawn``). DDP averages
the model's gradients; RECMOptimizer averages, with the same collective API,
what DDP cannot see: the modulation parameters' gradients (they are added after
DDP wrapped the model) and each layer's ``l_theta`` (one ``all_reduce`` for all
layers). Every rank therefore commits the same h, and with equal per-rank batches
the step equals a single-process step on the concatenated batch.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from tiny import TinyNet, example, spawn_ranks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

WORLD, STEPS, PER_RANK = 2, 5, 16


def data(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step`` (WORLD * PER_RANK samples); rank r takes the r-th slice."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(WORLD * PER_RANK, 4, 3, generator=g, dtype=torch.float64)
    return x, x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)


def train(model: nn.Module, rank: int | None) -> RECMOptimizer:
    """STEPS steps on the rank's slice (rank None: the whole batch, in one process)."""
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                        target=recm.Vector("b xyz"), a=0.1, example=example(model), total_steps=STEPS)
    for step in range(STEPS):
        x, y = data(step)
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()
    return opt


def result(model: TinyNet, opt: RECMOptimizer) -> dict[str, object]:
    return {
        "names": list(opt.layers),
        "params": [p.detach().clone() for p in model.parameters()],
        "h": [model.enc.recm_modulation.h.clone(), model.dec.recm_modulation.h.clone()],
        "t": [int(model.enc.recm_modulation.t), int(model.dec.recm_modulation.t)],
    }


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    # A timeout turns a stuck rendezvous or collective (seen once on a heavily loaded machine) into an error.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = TinyNet().double()
        ddp = DistributedDataParallel(model)  # wrap first, then hand the wrapped model to RECMOptimizer
        opt = train(ddp, rank)
        torch.save(result(model, opt), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing down DDP's reducer: its destructor joins gloo's worker thread while holding the
    # GIL, and that thread can wait for the GIL to free a tensor (a teardown deadlock seen under load, with
    # both ranks' results already saved).
    os._exit(0)


WATCHDOG_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp"), "DDP", WATCHDOG_S)


@pytest.mark.slow
def test_ranks_hold_identical_parameters_and_h(ranks: list[dict]) -> None:
    """After N steps every rank has bit-identical parameters and h, under the unprefixed layer names."""
    a, b = ranks
    assert a["names"] == b["names"] == ["enc", "dec"]  # no "module." prefix
    assert a["t"] == b["t"] == [STEPS, STEPS]
    for x, y in zip(a["params"] + a["h"], b["params"] + b["h"]):
        assert torch.equal(x, y)
    assert all(h.abs().max() > 0 for h in a["h"])


@pytest.mark.slow
def test_ddp_matches_one_process_on_the_concatenated_batch(ranks: list[dict]) -> None:
    """Two ranks of 16 samples equal one process on all 32, up to float64 summation order.

    In float64: RECM's own Adam step divides by the gradient's running RMS, so the ulps of a
    gradient entry near zero become a visible difference in float32.
    """
    model = TinyNet().double()
    single = result(model, train(model, rank=None))
    # Same sums in another order (2 x 16 vs 32 terms, then the all-reduce): a few float64 ulps
    # per step, grown over STEPS steps. A wrong average (e.g. summing instead of averaging
    # ranks) shows up at the 1e-1 level.
    for x, y in zip(ranks[0]["params"], single["params"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    for x, y in zip(ranks[0]["h"], single["h"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
