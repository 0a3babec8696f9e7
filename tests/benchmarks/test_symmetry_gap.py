"""The symmetry-gap sweep's quick mode: the certified gap is 0 on symmetric data and the plug-in one is not."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.symmetry_gap import sweep


def test_quick_sweep_certified_gap_vanishes_and_grows_while_the_plugin_does_not(tmp_path: Path) -> None:
    out = tmp_path / "sg.json"
    result = sweep.main(["--quick", "--json", str(out), "--png", str(tmp_path / "sg.png")])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.symmetry_gap --quick") and saved["commit"]
    layer0 = [runs["coupling"][0] for runs in result["per_seed"][0]]  # the data's own gap (z = x), eps = 0, 0.1, 1
    assert layer0[0] < 1e-5  # float32 rounding of an exactly symmetric pair
    assert layer0[0] < layer0[1] < layer0[2]
    # The plug-in estimate on 128 samples sits far above the true gap (0) at eps = 0: a bound on it cannot fail.
    assert result["per_seed"][0][0]["w1"][0] > 1.0
    conv = result["convergence"]
    assert max(conv["coupling"][0]) < 1e-5 and min(conv["plugin"][0]) > 0.5
    assert (tmp_path / "sg.png").exists()
