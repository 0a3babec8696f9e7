"""Laws of the N-body symmetry experiments: physics variants, the equivariance floor, SEGNN, statistics, quick modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import recm_opt as recm
from benchmarks.nbody import data as nd
from benchmarks.nbody import run
from benchmarks.nbody.floor import equivariance_floor
from benchmarks.nbody.train import build_model, paired
from recm_opt.groups import _haar_rotations


def _rot(seed: int) -> torch.Tensor:
    return _haar_rotations(1, torch.Generator().manual_seed(seed))[0]


def _close_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Five particles, two of them 0.05 apart, so the force exceeds the clip (|F| ~ 400 > 100)."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(1, 5, 3, generator=gen, dtype=torch.float64)
    loc[0, 1] = loc[0, 0] + 0.05 * torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=torch.float64),
                                                                  dim=0)
    q = torch.tensor([[[1.0], [1.0], [-1.0], [1.0], [-1.0]]], dtype=torch.float64)
    return loc, q


@given(seed=st.integers(0, 2**32 - 1))
def test_norm_clip_forces_commute_with_rotation(seed: int) -> None:
    """F(R x) = R F(x) when forces are clipped by their norm, even where the clip is active."""
    loc, q = _close_pair(seed)
    rot = _rot(seed)
    f, f_r = nd.forces(loc, q, "norm"), nd.forces(loc @ rot.T, q, "norm")
    assert f.norm(dim=-1).max() == pytest.approx(nd.MAX_FORCE)
    torch.testing.assert_close(f_r, f @ rot.T, rtol=0, atol=1e-9)


def test_component_clip_forces_do_not_commute_with_rotation() -> None:
    """The reference's per-component clip is not rotation-equivariant once it is active."""
    loc, q = _close_pair(1)
    rot = _rot(1)
    f, f_r = nd.forces(loc, q, "component"), nd.forces(loc @ rot.T, q, "component")
    assert (f_r - f @ rot.T).abs().max() > 1.0


def test_field_force_is_charge_times_field_along_z() -> None:
    """Two far-apart opposite charges: the field adds q E z-hat to the (tiny) Coulomb force."""
    loc = torch.tensor([[[0.0, 0, 0], [1000.0, 0, 0]]], dtype=torch.float64)
    q = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    delta = nd.forces(loc, q, "norm", 0.5) - nd.forces(loc, q, "norm")
    torch.testing.assert_close(delta, torch.tensor([[[0, 0, 0.5], [0, 0, -0.5]]], dtype=torch.float64))


def test_bad_clip_is_rejected() -> None:
    """An unknown clip mode raises, naming the argument and the choices."""
    with pytest.raises(ValueError, match="clip must be one of"):
        nd.forces(torch.zeros(1, 2, 3), torch.ones(1, 2, 1), "sphere")


def test_advance_reproduces_the_recorded_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming frame 30 for 10 frames gives frame 40: the floor re-simulates the same dynamics."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path))
    for clip, field in (("component", 0.0), ("norm", 0.3)):
        d = nd.generate_split(6, 3, clip, field)
        out = nd.advance(d["loc"], d["vel"], d["charges"], clip=clip, field=field)
        torch.testing.assert_close(out, d["target"], rtol=0, atol=1e-12)


def test_variants_share_initial_states_and_field_zero_is_norm() -> None:
    """Variants start from the same states; E = 0 is the norm-clip data exactly."""
    seed = nd.split_seed("train", 0)
    a, b = nd.generate_split(4, seed, "norm", 0.0), nd.generate_split(4, seed, "norm", 0.5)
    assert torch.equal(a["charges"], b["charges"]) and not torch.equal(a["target"], b["target"])
    assert nd.variant_tag("norm", 0.0) == "_normclip" and nd.variant_tag() == ""


def test_floor_vanishes_for_symmetric_physics_and_not_for_the_others(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Norm clip: every rotated re-simulation agrees (round-off only); a field gives a floor of order (E t^2/2)^2."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path))
    sym = equivariance_floor(6, 3, "norm")
    assert sym["floor_mse"] < 1e-20 and sym["frac_changed"] == 0.0
    broken = equivariance_floor(6, 3, "norm", 1.0)
    # The field displaces each charge by about E t^2 / 2 = 0.5 along z over one time unit; rotating
    # the input turns that displacement away from z, so the spread is of order 0.5^2 / 3 per coordinate.
    assert 0.01 < broken["floor_mse"] < 0.5 and broken["frac_changed"] == 1.0


def _graph(seed: int, n: int = 3) -> tuple[torch.Tensor, ...]:
    loc, vel, q = nd.initial_state(n, torch.Generator().manual_seed(seed))
    g = nd.batch_graphs(loc, vel, q)
    return g["h"], g["x"], g["v"], g["edge_index"], g["edge_attr"], g["batch"]


@pytest.fixture(scope="module")
def segnns() -> dict[str, torch.nn.Module]:
    """A small float64 SEGNN and its relaxed copy (built once: e3nn compiles each tensor product)."""
    kw = {"hidden": "4x0e+2x1o", "n_layers": 2}
    models = {"plain": build_model("segnn", "plain", 2, **kw).double(),
              "relaxed": build_model("segnn", "recm", 2, **kw).double()}
    with torch.no_grad():  # undo the small head init so the tests see the full map
        for m in models.values():
            m.head2.tp.weight.mul_(100.0)
    return models


@given(seed=st.integers(0, 2**32 - 1))
def test_segnn_commutes_with_e3(segnns: dict[str, torch.nn.Module], seed: int) -> None:
    """SEGNN (and the relaxed SEGNN before RECM is attached) is E(3)-equivariant: f(Rx + t) = R f(x) + t."""
    h, x, v, ei, ea, b = _graph(seed)
    rot = _rot(seed)
    shift = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for model in segnns.values():
        with torch.no_grad():
            out = model(h, x, v, ei, ea, b)
            out_t = model(h, x @ rot.T + shift, v @ rot.T, ei, ea, b)
        assert (out - x).abs().max() > 1e-3
        torch.testing.assert_close(out_t, out @ rot.T + shift, rtol=0, atol=1e-9)


def test_relaxed_segnn_equals_plain_segnn_before_attach(segnns: dict[str, torch.nn.Module]) -> None:
    """The relaxed SEGNN copies the plain weights and computes the same map until RECM is attached."""
    args = _graph(2)
    with torch.no_grad():
        torch.testing.assert_close(segnns["relaxed"](*args), segnns["plain"](*args), rtol=0, atol=0)
    relaxed = build_model("segnn", "recm", 2, hidden="4x0e+2x1o", n_layers=2)
    opt = recm.RECMOptimizer(torch.optim.Adam(relaxed.parameters()), relaxed, target=recm.Vector("n xyz"))
    assert len(opt.layers) == 2


def test_paired_interval_matches_hand_computation() -> None:
    """Differences (1, 2, 3): mean 2, sd 1, 95% half-width t_{0.975,2} / sqrt(3) = 4.3027 / 1.7321."""
    out = paired([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / 3**0.5
    assert out["mean"] == pytest.approx(2.0)
    assert out["ci95"] == pytest.approx([2 - half, 2 + half])
    assert out["within_noise"]  # the half-width 2.48 exceeds the mean 2
    assert not paired([0.0, 0.0, 0.0], [3.0, 4.0, 5.0])["within_noise"]
    with pytest.raises(ValueError, match="paired"):
        paired([1.0], [2.0])


@pytest.mark.parametrize("experiment", run.EXPERIMENTS)
def test_quick_mode_writes_every_block(experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each experiment's quick mode runs end to end and writes its tables' numbers and its command."""
    monkeypatch.setenv("RECM_OPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / f"{experiment}.json"
    run.main([experiment, "--quick", "--json", str(out), "--png", str(tmp_path / "alpha.png")])
    res = json.loads(out.read_text())
    assert res["command"].startswith("OMP_NUM_THREADS=1 python -m benchmarks.nbody.run") and res["git_commit"]
    blocks = res["models"].values() if experiment == "segnn" else [b for v in res["models"].values()
                                                                   for b in v.values()]
    for block in blocks:
        assert len(block["test_at_best"]) == len(block["test_final"]) == 2
    if experiment == "segnn":
        assert set(res["models"]) == {"plain", "recm", "es"} and "ci95" in res["recm_vs_plain"]["test_final"]
    if experiment == "clipping":
        assert set(res["floor"]) == {"component", "norm"} and res["floor"]["norm"]["floor_mse"] < 1e-20
        assert "kept" in res["models"]["egnn/norm"]["recm"]
    if experiment == "field":
        assert set(res["models"]) == {"0", "1"} and (tmp_path / "alpha.png").stat().st_size > 0
