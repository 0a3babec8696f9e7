"""Smoke tests of the relaxed EGNN and of the EGNN Table 2 runner (benchmarks/nbody/table2_egnn.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import recm_opt as recm
from benchmarks.models import egnn
from benchmarks.nbody import data as nd
from benchmarks.nbody import table2_egnn as nbody

TOL = 1e-9  # float64 round-off through 4 layers of O(1) activations


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return nd.initial_state(3, torch.Generator().manual_seed(seed))


def _relaxed_model(seed: int) -> egnn.EGNN:
    """A float64 relaxed EGNN whose coordinate updates are not negligible."""
    model = nbody.build_model("egnn_recm", seed).double()
    with torch.no_grad():  # the 0.001-gain init would make the x-update nearly trivial
        for layer in model.layers:
            layer.coord_update.phi_x[-1].weight.mul_(1000.0)
    return model


def _run(model: torch.nn.Module, loc: torch.Tensor, vel: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    g = nd.batch_graphs(loc, vel, q)
    return model(g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"]).reshape(loc.shape)


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@given(seed=st.integers(0, 2**32 - 1))
def test_relaxed_egnn_commutes_with_e3_before_attach(seed: int) -> None:
    """With no optimizer attached, the relaxed EGNN is exactly E(3)-equivariant (alpha = 0, beta = 1)."""
    model = _relaxed_model(seed % 1000)
    loc, vel, q = _batch(seed)
    rot, shift = _rotation(seed), torch.randn(3, 1, 3, generator=torch.Generator().manual_seed(seed + 1),
                                               dtype=torch.float64)
    with torch.no_grad():
        out = _run(model, loc, vel, q)
        out_t = _run(model, loc @ rot.T + shift, vel @ rot.T, q)
    assert (out - loc).abs().max() > 1e-3  # not trivially x -> x
    torch.testing.assert_close(out_t, out @ rot.T + shift, rtol=0, atol=TOL)


def test_relaxed_egnn_equals_plain_egnn_before_attach() -> None:
    """Before RECM is attached, the relaxed model computes the plain EGNN it was copied from."""
    plain, relaxed = nbody.build_model("egnn", 3).double(), nbody.build_model("egnn_recm", 3).double()
    loc, vel, q = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(_run(relaxed, loc, vel, q), _run(plain, loc, vel, q), rtol=0, atol=0)


def test_relaxed_egnn_commutes_with_rotation_at_t0() -> None:
    """Attached but before any step, h = 0 so alpha = 0 and beta = 1: still exactly equivariant."""
    model = _relaxed_model(4)
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters()), model, target=nbody.TARGET,
                             example=nbody.example_graph(model))
    assert len(opt.layers) == 8  # node and coordinate update of 4 layers
    loc, vel, q = _batch(4)
    rot = _rotation(4)
    with torch.no_grad():
        out, out_r = _run(model, loc, vel, q), _run(model, loc @ rot.T, vel @ rot.T, q)
    torch.testing.assert_close(out_r, out @ rot.T, rtol=0, atol=TOL)


def test_candidates_can_break_rotation_symmetry() -> None:
    """The dense candidate sees raw coordinates: it is clearly not rotation-equivariant."""
    torch.manual_seed(0)
    layer = egnn.RelaxedCoordUpdate(8).double()
    with torch.no_grad():
        layer.un_weight.weight.normal_()
    x, v, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), \
        torch.randn(5, 8, dtype=torch.float64)
    rot = _rotation(5)
    out = layer.unconstrained("weight", x, v, h, None, None, None)
    out_r = layer.unconstrained("weight", x @ rot.T, v @ rot.T, h, None, None, None)
    assert (out_r - out @ rot.T).abs().max() > 0.1


def test_quick_run_writes_json_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-epoch run on a tiny split writes every model's block with per-seed lists."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "nbody.json"
    nbody.main(["--epochs", "1", "--seeds", "0", "--n-train", "30", "--n-valid", "20", "--n-test", "20",
                "--batch-size", "10", "--json", str(out), "--png", str(tmp_path / "alpha.png")])
    res = json.loads(out.read_text())
    assert {"linear", "egnn", "egnn_recm", "egnn_es", "command", "machine"} <= set(res)
    assert {"c", "test_mse"} <= set(res["linear"])
    assert len(res["egnn"]["test_mse"]) == 1 and res["egnn"]["epochs"] == 1
    recm_block = res["egnn_recm"]
    assert {"test_mse", "final_alpha", "param_overhead", "alpha_curves"} <= set(recm_block)
    assert len(recm_block["final_alpha"]) == 8
    assert "test_mse" in res["egnn_es"] or res["egnn_es"]["status"] == "not run"
    assert (tmp_path / "alpha.png").stat().st_size > 0


def test_exported_relaxed_egnn_matches_eval_mode() -> None:
    """After RECM steps, the exported (baked, pruned) model computes what the eval-mode model computes."""
    model = nbody.build_model("egnn_recm", 6)
    opt = nbody.make_optimizer("egnn_recm", model, 0, 5e-4, 1e-12)
    loc, vel, q = nd.initial_state(8, torch.Generator().manual_seed(6))
    g = nd.batch_graphs(loc.float(), vel.float(), q.float(), (loc + vel).float())
    args = (g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"])
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(*args), g["y"])
        opt.zero_grad()
        loss.backward()
        opt.step(target=g["y"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(recm.export(model)(*args), model(*args), rtol=0, atol=0)
