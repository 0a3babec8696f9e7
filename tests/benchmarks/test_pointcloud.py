"""The point-cloud experiment: its augmentations, statistics and quick modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import recm_opt as recm
from benchmarks.pointcloud import experiment, generating_sets


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the data cache out of the user's home directory."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path / "cache"))


def test_augmentation_without_rotation_keeps_each_clouds_axes() -> None:
    """Aligned: x -> (x * s + t) with per-axis s, shifts and dropped points copied from point 0; no rotation."""
    points = torch.randn(6, 50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = experiment.augment(points, torch.Generator().manual_seed(1), rotate=False)
    assert out.shape == points.shape
    # Per cloud and axis the map is affine with a positive slope: the order of coordinates is kept.
    kept = (out != out[:, :1]).all(-1)  # points not replaced by point 0
    for b in range(6):
        idx = kept[b].nonzero().flatten()
        for a in range(3):
            xs, ys = points[b, idx, a], out[b, idx, a]
            assert torch.equal(xs.argsort(), ys.argsort())


def test_augmentation_with_rotation_is_an_isotropic_law() -> None:
    """Rotated: the image of a fixed direction has second moment I/3 (Haar), whatever the per-axis scaling."""
    n = 4000
    points = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64).expand(n, 2, 3).contiguous()
    out = experiment.augment(points, torch.Generator().manual_seed(2), rotate=True)
    u = out[:, 1] - out[:, 0]
    u = u[u.norm(dim=1) > 0]
    u = u / u.norm(dim=1, keepdim=True)
    second = (u[:, :, None] * u[:, None, :]).mean(0)
    assert (second - torch.eye(3, dtype=torch.float64) / 3).abs().max() < 5 * math.sqrt(1 / len(u))


def test_t_interval_matches_the_textbook_value() -> None:
    """Diffs 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.303: half-width 4.303 / sqrt(3)."""
    mean, lo, hi = experiment.t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert (hi - lo) / 2 == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)


def test_method_names_parse_and_build_their_policy() -> None:
    """Each method name builds its optimizer: the baselines' policies, with their options."""
    kinds = {"vn": torch.optim.Adam, "es": recm.EquivarianceSchedule, "rpp:1e2:dec": recm.ResidualPathwayPrior,
             "recm:1e-1": recm.RECMOptimizer}
    for name, cls in kinds.items():
        _, opt = experiment.build(name, (4, 4), 10, 1e-3)
        assert type(opt) is cls
    _, rpp = experiment.build("rpp:1e2:dec", (4, 4), 10, 1e-3)
    assert rpp.residual_prior == 100.0 and rpp.decoupled
    with pytest.raises(ValueError, match="rpp:<w>"):
        experiment.parse_method("rpp")


def test_quick_mode_writes_its_command_commit_and_paired_differences(tmp_path: Path) -> None:
    out = tmp_path / "pc.json"
    result = experiment.main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.pointcloud --quick")
    assert saved["commit"] and saved["config"]["seeds"] == [0, 1]
    for v in ("rotated", "aligned"):
        assert set(result[v]["methods"]) == {"vn", "es", "rpp:1e2", "recm"}
        assert {(p["a"], p["b"]) for p in result[v]["paired"]} == {("recm", m) for m in ("vn", "es", "rpp:1e2")}
        assert result[v]["recm"]["recm"]["runs"][0]["export_max_abs_err"] < 1e-5


def test_generating_set_quick_mode(tmp_path: Path) -> None:
    """Every choice of C_G runs; the sets have the advertised sizes and are rotations."""
    result = generating_sets.main(["--quick", "--json", str(tmp_path / "gs.json")])
    assert result["sizes"] == {"pair": 2, "four": 4, "eight": 8, "z_only": 1, "cube": 2}
    assert set(result["rotated"]) == set(generating_sets.CHOICES)
    cube = generating_sets.generating_set("cube").generators()
    assert torch.allclose(torch.linalg.matrix_power(cube[0], 4), torch.eye(3, dtype=cube.dtype), atol=1e-12)
