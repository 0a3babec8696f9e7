"""The tuning-free benchmark: its quick mode, and its symmetric set task is exactly permutation-equivariant."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.tuning_free import run, tasks


def test_quick_mode_writes_json_with_defaults_grid_and_pairs(tmp_path: Path) -> None:
    """--quick runs the defaults, two grid cells and the best cell on the vector tasks, both inner optimizers."""
    out = tmp_path / "tf.json"
    result = run.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.tuning_free") and saved["commit"]
    rows = {(r["task"], r["inner"]): r for r in saved["summary"]}
    assert set(rows) == {(t, i) for t in ("vector-symmetric", "vector-broken") for i in ("adamw", "sgd")}
    for r in rows.values():
        assert r["best_cell"] in r["grid"] and len(r["grid"]) == 2
        assert r["default_mse"]["n"] == 1 and r["log_mse_default_minus_best"] is not None
    defaults = [x for x in result["runs"] if x["arm"] == "default"]
    assert all(x["a"] == run.run_defaults_for(60).a and x["lr"] == run.run_defaults_for(60).lr for x in defaults)


def test_symmetric_set_task_is_permutation_equivariant() -> None:
    """Permuting the elements of x permutes y the same way (broken = 0), and not with broken = 1."""
    x, y = tasks.make_set_task(64, 0.0, seed=3)
    perm = torch.randperm(tasks.N_SET, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    x2 = torch.randn(64, tasks.N_SET, tasks.F_SET, generator=g)
    assert torch.equal(x, x2)
    u = torch.tensor([1.0, -0.5, 0.25, 0.0])
    v = torch.tensor([0.0, 0.5, 0.0, -1.0])
    xp = x[:, perm]
    yp = torch.tanh(xp @ u) + (xp.mean(1) @ v)[:, None]
    torch.testing.assert_close(yp, y[:, perm])
    _, yb = tasks.make_set_task(64, 1.0, seed=3)
    assert not torch.allclose((yb - y)[:, perm], yb - y)
