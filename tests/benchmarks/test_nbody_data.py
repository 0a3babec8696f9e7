"""Tests for the charged N-body data set and the plain EGNN."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.models import egnn
from benchmarks.nbody import data as nd
from benchmarks.nbody.train import train_run

N_TRAIN, N_TEST = 300, 200
# Anchor window for 300 train / 200 test sims. Refitting c on 2000 random
# 300/200 subsets of the full 3000/2000 splits gave MSE mean 0.084, sd 0.008,
# range [0.062, 0.112] with a heavy right tail (close encounters), so the
# window is roughly mean -3 sd .. +4 sd.
ANCHOR_LO, ANCHOR_HI = 0.06, 0.115


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points RECM_OPT_CACHE at a fresh directory for this module."""
    root = tmp_path_factory.mktemp("recm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECM_OPT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def small(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Small train/test splits generated into the temporary cache."""
    return {"train": nd.load_split("train", N_TRAIN), "test": nd.load_split("test", N_TEST)}


def test_initial_state() -> None:
    gen = torch.Generator().manual_seed(0)
    loc, vel, charges = nd.initial_state(64, gen)
    assert loc.shape == vel.shape == (64, 5, 3)
    torch.testing.assert_close(vel.norm(dim=-1), torch.full((64, 5), 0.5, dtype=torch.float64))
    assert set(charges.unique().tolist()) == {-1.0, 1.0}


def test_forces_pair() -> None:
    # Two opposite charges at distance 2 on the x axis attract with 1/r^2 = 0.25.
    loc = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]], dtype=torch.float64)
    charges = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    expected = torch.tensor([[[0.25, 0, 0], [-0.25, 0, 0]]], dtype=torch.float64)
    torch.testing.assert_close(nd.forces(loc, charges), expected)


def test_frame_count() -> None:
    loc, vel, charges = nd.initial_state(2, torch.Generator().manual_seed(1))
    locs, vels = nd.simulate(loc, vel, charges)
    assert locs.shape == vels.shape == (2, nd.N_FRAMES, 5, 3) == (2, 49, 5, 3)


def test_determinism_and_cache(small: dict, cache: Path) -> None:
    again = nd.generate_split(N_TRAIN, nd.split_seed("train", 0))
    for key, value in small["train"].items():
        assert torch.equal(value, again[key]), key
    assert (cache / "nbody" / f"train_{N_TRAIN}_0_v{nd.CACHE_VERSION}.pt").exists()
    assert not list((cache / "nbody").glob("*.tmp"))
    loaded = nd.load_split("train", N_TRAIN)
    assert all(torch.equal(loaded[k], small["train"][k]) for k in loaded)


def test_splits_differ(small: dict) -> None:
    assert len({nd.split_seed(s, 0) for s in ("train", "valid", "test")}) == 3
    assert nd.split_seed("train", 0) != nd.split_seed("train", 1)
    n = min(N_TRAIN, N_TEST)
    assert not torch.equal(small["train"]["loc"][:n], small["test"]["loc"][:n])


def test_linear_anchor(small: dict) -> None:
    c = nd.fit_linear(small["train"])
    mse = nd.linear_test_mse(c, small["test"])
    assert ANCHOR_LO <= mse <= ANCHOR_HI, mse


def test_batch_graphs_layout() -> None:
    b, n = 3, 5
    loc, vel, q = nd.initial_state(b, torch.Generator().manual_seed(2))
    g = nd.batch_graphs(loc, vel, q, loc)
    assert g["edge_index"].shape == (2, b * n * (n - 1))
    assert (g["edge_index"][0] != g["edge_index"][1]).all()
    # Edges never cross graphs.
    assert torch.equal(g["batch"][g["edge_index"][0]], g["batch"][g["edge_index"][1]])
    i, j = g["edge_index"][:, -1]
    assert g["edge_attr"][-1, 0] == q.reshape(-1)[i] * q.reshape(-1)[j]


def _model_and_batch(seed: int = 0) -> tuple[egnn.EGNN, dict[str, torch.Tensor]]:
    """A float64 EGNN with non-negligible coordinate updates and a 4-graph batch."""
    torch.manual_seed(seed)
    model = egnn.EGNN().double()
    with torch.no_grad():  # the 0.001-gain init would make the x-update nearly trivial
        for layer in model.layers:
            layer.coord_update.phi_x[-1].weight.mul_(1000.0)
    loc, vel, q = nd.initial_state(4, torch.Generator().manual_seed(seed))
    return model, {"loc": loc, "vel": vel, "charges": q}


def _run(model: egnn.EGNN, loc: torch.Tensor, vel: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    g = nd.batch_graphs(loc, vel, q)
    out = model(g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"])
    return out.reshape(loc.shape)


@torch.no_grad()
def test_egnn_e3_equivariance() -> None:
    model, d = _model_and_batch()
    rot, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # O(3), may reflect
    shift = torch.randn(4, 1, 3, dtype=torch.float64)  # a different shift per graph
    out = _run(model, d["loc"], d["vel"], d["charges"])
    out_t = _run(model, d["loc"] @ rot.T + shift, d["vel"] @ rot.T, d["charges"])
    assert (out - d["loc"]).abs().max() > 1e-3  # the map is not trivially x -> x
    torch.testing.assert_close(out_t, out @ rot.T + shift, rtol=0, atol=1e-9)


@torch.no_grad()
def test_egnn_permutation_equivariance() -> None:
    model, d = _model_and_batch(1)
    perm = torch.randperm(5)
    out = _run(model, d["loc"], d["vel"], d["charges"])
    out_p = _run(model, d["loc"][:, perm], d["vel"][:, perm], d["charges"][:, perm])
    torch.testing.assert_close(out_p, out[:, perm], rtol=0, atol=1e-9)


def test_train_run_smoke(small: dict) -> None:
    """With validation = test, the test MSE at the best epoch is the best validation MSE."""
    data = {"train": small["train"], "valid": small["test"], "test": small["test"]}
    hist = train_run("egnn", "plain", data, epochs=1, seed=0)
    assert len(hist["val_mse"]) == 1 and hist["test_at_best"] == pytest.approx(hist["val_mse"][0])
    assert hist["test_final"] == pytest.approx(hist["val_mse"][0])
