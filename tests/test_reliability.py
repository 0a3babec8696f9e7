"""RECMOptimizer never corrupts state.

Resume is bit-exact and checkpoints are ``weights_only``-loadable; bf16 autocast
trains; eval forwards, ``AveragedModel`` copies, ``update_bn`` and activation
checkpointing never touch the captured statistics; NaN/Inf batches and all-zero
steps change nothing; a killed run resumes from its last checkpoint; and bad
configurations fail with errors that name what is wrong.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TinyVectorLinear, batch, example
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.checkpoint import checkpoint

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

ROOT = Path(__file__).resolve().parents[1]


class HygieneNet(nn.Module):
    """Two tagged layers, a BatchNorm (so update_bn has work) and optional activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.enc = TinyVectorLinear(4, 6, seed=1)
        self.dec = TinyVectorLinear(6, 1, seed=2)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, z: Tensor) -> Tensor:
        z = torch.tanh(self.enc(self.bn(z)))
        if self.reentrant is None:
            return self.dec(z)[:, 0]
        return checkpoint(self.dec, z, use_reentrant=self.reentrant)[:, 0]


def wrap(model: nn.Module, inner: torch.optim.Optimizer, **kw: Any) -> RECMOptimizer:
    return RECMOptimizer(inner, model, target=recm.Vector("b xyz"), a=0.1, example=example(model),
                         total_steps=kw.pop("total_steps", 1000), **kw)


def modulations(model: nn.Module) -> list[nn.Module]:
    return [m.recm_modulation for m in model.modules() if recm.is_relaxed(m)]


def snapshot(model: nn.Module) -> list[Tensor]:
    """Every parameter and every piece of RECM state (h, t, gamma_t, newest sample)."""
    out = [p.detach().clone() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)]
    for mod in modulations(model):
        out += [mod.h.clone(), mod.t.clone(), mod.gamma_t.clone()]
        out += [mod.newest.clone()] if mod.newest is not None else []
    return out


def assert_identical(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y)


# ------------------------------------------------------------------- 1. resume is bit-exact
VECTOR_NET_STEPS = 4


def _vector_net(seed: int = 0) -> tuple[nn.Module, RECMOptimizer]:
    from vector_model import VectorNet

    torch.manual_seed(seed)
    model = VectorNet()
    return model, RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                                target=recm.Vector("b xyz"), a=0.1, example=torch.zeros(1, 4, 3))


def _train(model: nn.Module, opt: RECMOptimizer, steps: range) -> None:
    from vector_model import make_task

    for step in steps:
        x, y = make_task(32, broken=1.0, seed=step)
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()


def _checkpoint(model: nn.Module, opt: RECMOptimizer) -> bytes:
    buf = io.BytesIO()
    # The noise term of VectorNet draws from the global RNG: a resumable loop saves it too.
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    return buf.getvalue()


def test_resume_is_bit_exact_and_weights_only_loadable() -> None:
    """N steps, save, load into a fresh model and optimizer, N steps == 2N uninterrupted steps, bit for bit."""
    n = VECTOR_NET_STEPS
    model, opt = _vector_net()
    _train(model, opt, range(2 * n))
    expected = snapshot(model)

    model, opt = _vector_net()
    _train(model, opt, range(n))
    blob = _checkpoint(model, opt)
    del model, opt
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    model, opt = _vector_net(seed=123)  # a different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    assert [int(m.t) for m in modulations(model)] == [n] * 3
    _train(model, opt, range(n, 2 * n))
    assert_identical(snapshot(model), expected)


def test_plain_adamw_checkpoint_loads_inner_state_and_keeps_the_models_recm_state() -> None:
    """A checkpoint of the bare inner optimizer loads its state, warning once; RECM's state is the model's."""
    torch.manual_seed(0)
    plain = HygieneNet()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for i in range(2):
        x, y = batch(seed=i)
        (plain(x) - y).pow(2).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad()
    ckpt = torch.load(io.BytesIO(_checkpoint_plain(plain, plain_opt)), weights_only=True)

    model = HygieneNet()
    model.load_state_dict(ckpt["model"])  # before the wrapper adds its modulations: strict load works
    opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    _step(model, opt, batch(seed=5))  # some RECM state, which lives in the model
    hs = [mod.h.clone() for mod in modulations(model)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(ckpt["opt"])
    assert len(caught) == 1 and "no RECM param group" in str(caught[0].message)
    for mod, h in zip(modulations(model), hs):
        assert int(mod.t) == 1 and torch.equal(mod.h, h) and mod.newest is None
    # The inner state of the model's own parameters is the plain run's.
    wrapped = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        if plain_opt.state[p]:
            assert torch.equal(opt.state[wrapped[name]]["exp_avg"], plain_opt.state[p]["exp_avg"])
    assert not any(opt.state[p] for mod in modulations(model) for p in mod.parameters())
    _step(model, opt, batch(seed=6))
    assert [int(m.t) for m in modulations(model)] == [2, 2]


def _checkpoint_plain(model: nn.Module, opt: torch.optim.Optimizer) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def _step(model: nn.Module, opt: RECMOptimizer, xy: tuple[Tensor, Tensor]) -> None:
    x, y = xy
    (model(x) - y).pow(2).mean().backward()
    opt.step(target=y)
    opt.zero_grad()


# ------------------------------------------------------------------- 2. AMP on CPU
def test_bf16_autocast_trains_on_cpu() -> None:
    """Under CPU bf16 autocast the wrapper steps, h advances and stays finite, parameters stay float32."""
    model = HygieneNet()
    opt = wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    for i in range(4):
        x, y = batch(seed=i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        (out.float() - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()
    for mod in modulations(model):
        assert int(mod.t) == 4 and torch.isfinite(mod.h).all() and mod.h.any() and mod.h.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------- 3. hook hygiene
def _hygiene_run(extra: str | None, reentrant: bool | None = None) -> tuple[list[Tensor], list[int]]:
    """Three steps; before each, run the ``extra`` forward(s) that must not be captured."""
    torch.manual_seed(0)
    model = HygieneNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    swa = None
    for i in range(3):
        x, y = batch(seed=i)
        if extra == "swa" and swa is None:
            # Deep copies are taken after the first step (the reference has the same warm-up step).
            _step(model, opt, batch(seed=10))
            swa = AveragedModel(model)
        if extra == "eval":
            model.eval()
            model(x)
            model.train()
        elif swa is not None:
            swa(x)  # a training-mode forward of the deep copy, with autograd on
            swa.update_parameters(model)
        elif extra == "update_bn":
            state = {k: v.clone() for k, v in model.bn.state_dict().items()}
            update_bn([x, x], model)
            model.bn.load_state_dict(state)  # keep the BN statistics of the reference run
        model.reentrant = reentrant
        (model(x) - y).pow(2).mean().backward()
        model.reentrant = None
        opt.observe(y)
        opt.step()
        opt.zero_grad()
    units = [mod.newest.shape[1] for mod in modulations(model)]
    return snapshot(model), units


def _reference_with_warmup() -> tuple[list[Tensor], list[int]]:
    torch.manual_seed(0)
    model = HygieneNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    _step(model, opt, batch(seed=10))
    for i in range(3):
        _step(model, opt, batch(seed=i))
    return snapshot(model), [mod.newest.shape[1] for mod in modulations(model)]


@pytest.mark.parametrize(
    ("extra", "reentrant"),
    [("eval", None), ("swa", None), ("update_bn", None), (None, False), (None, True)],
    ids=["eval", "averaged-model", "update_bn", "checkpoint", "checkpoint-reentrant"],
)
def test_extra_forwards_never_change_captured_statistics(extra: str | None, reentrant: bool | None) -> None:
    """Eval, AveragedModel, update_bn and checkpoint recomputation leave h, t and the newest sample as they were."""
    reference, ref_units = _reference_with_warmup() if extra == "swa" else _hygiene_run(None)
    state, units = _hygiene_run(extra, reentrant)
    assert units == ref_units == [16, 16]  # one batch of 16 units per step, never counted twice
    if reentrant:
        # The recomputed backward sums the same gradient terms in another order (ulps, in w_beta's
        # gradient); the captured inputs themselves are the same tensors. RECM's own Adam step
        # divides by the gradient's running RMS, which carries those ulps into the next steps' values:
        # float32 ulps (1.2e-7) of values of order 1, absolute.
        for a, b in zip(state, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2 * torch.finfo(torch.float32).eps)
    else:
        assert_identical(state, reference)


# ------------------------------------------------------------------- 4. faults
# A dropped sample leaves the layer with no capture for that step, which the h update reports
# with its generic "did not run in training mode" warning.
@pytest.mark.filterwarnings("ignore:layer .* did not run in training mode")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_batch_never_reaches_h(bad: float) -> None:
    """A NaN/Inf input batch skips the whole step (counted); a NaN/Inf target is dropped (counted per layer)."""
    model = HygieneNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.05))
    _step(model, opt, batch(seed=0))
    before = snapshot(model)

    x, y = batch(seed=1)
    x[3, 1, 2] = bad
    _step(model, opt, (x, y))
    assert opt.skipped_steps == 1
    assert [row["skipped"] for row in opt.report()] == [1, 1]  # the bad sample reached both layers' captures
    assert_identical(snapshot(model), before)

    # Finite gradients, non-finite statistics: the sample is dropped, the weights still train.
    hs = [mod.h.clone() for mod in modulations(model)]
    x, y = batch(seed=2)
    (model(x) - y).pow(2).mean().backward()
    y_bad = y.clone()
    y_bad[0, 0] = bad
    opt.step(target=y_bad)
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert [row["skipped"] for row in opt.report()] == [2, 2]
    for mod, h in zip(modulations(model), hs):
        assert int(mod.t) == 1 and torch.equal(mod.h, h)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.enc.weight, before[2]), "the finite gradients should still have been applied"


@pytest.mark.parametrize(
    ("steps", "radius"),
    [(0, 1.0), (3, 1.0), (0, 0.02), (3, 0.02)],
    ids=["fresh", "after-training", "fresh-at-weight-bound", "after-training-at-weight-bound"],
)
def test_all_zero_gradient_step_without_captures_changes_nothing(steps: int, radius: float) -> None:
    """Zero gradients and no captured inputs: parameters and RECM state stay bit-identical, no warning.

    With a small ``weight_radius`` every step projects the unconstrained weights, so this
    also checks that the projection is idempotent in floating point.
    """
    model = HygieneNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.5), weight_radius=radius)
    if radius < 1:  # the initial unconstrained weights (norm ~0.15) were projected onto the bound
        for layer in (model.enc, model.dec):
            assert float(layer.un.detach().norm()) == pytest.approx(radius, rel=1e-3)
    for i in range(steps):
        _step(model, opt, batch(seed=i))
    before = snapshot(model)
    for p in model.parameters():
        if not isinstance(p, nn.parameter.UninitializedParameter):
            p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert_identical(snapshot(model), before)


KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {examples!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_reliability import _vector_net, _checkpoint
from vector_model import make_task
model, opt = _vector_net()
for step in range({steps}):
    x, y = make_task(32, broken=1.0, seed=step)
    (model(x) - y).pow(2).mean().backward()
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # dies between backward and step: step {kill_at} is lost
    opt.step(target=y)
    opt.zero_grad()
    tmp = {path!r} + ".tmp"
    with open(tmp, "wb") as f:  # write, then rename: a kill mid-save leaves the last checkpoint intact
        f.write(_checkpoint(model, opt))
    os.replace(tmp, {path!r})
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL between two steps loses only the steps after the last checkpoint; the resumed run is bit-exact."""
    n, kill_at = 2 * VECTOR_NET_STEPS, VECTOR_NET_STEPS + 1
    path = str(tmp_path / "ckpt.pt")
    script = KILLED_RUN.format(examples=str(ROOT / "examples"), tests=str(ROOT / "tests"), steps=n,
                               kill_at=kill_at, path=path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not os.path.exists(path + ".tmp")

    ckpt = torch.load(path, weights_only=True)
    model, opt = _vector_net(seed=7)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    assert [int(m.t) for m in modulations(model)] == [kill_at] * 3  # steps 0..kill_at-1 survived
    _train(model, opt, range(kill_at, n))

    ref_model, ref_opt = _vector_net()
    _train(ref_model, ref_opt, range(n))
    assert_identical(snapshot(model), snapshot(ref_model))


# ------------------------------------------------------------------- 5. bad configuration
def test_params_missing_from_inner_optimizer_are_named() -> None:
    """A tagged layer whose parameters the inner optimizer does not hold is rejected, naming both."""
    model = HygieneNet()
    inner = torch.optim.SGD([model.enc.weight, model.enc.un, model.dec.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"layer 'dec'.*\['un'\].*not in the inner optimizer"):
        wrap(model, inner)
    assert not any(hasattr(m, "recm_modulation") for m in model.modules()), "a failed construction changed the model"


def test_second_optimizer_takes_over_with_a_warning_naming_the_old_one() -> None:
    """A second RECMOptimizer for the same model takes over (warning names the old one); the old one is detached."""
    model = HygieneNet()
    old = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _step(model, old, batch(seed=0))
    with pytest.warns(UserWarning, match=rf"RECMOptimizer\(SGD.*id {id(old):#x}.*takes over"):
        new = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _step(model, new, batch(seed=1))
    assert [int(mod.t) for mod in modulations(model)] == [2, 2]  # the state went on with the model
    with pytest.raises(RuntimeError, match="detached"):
        old.step()
    assert sum(isinstance(h, type(next(iter(model.enc._forward_pre_hooks.values()))))
               for h in model.enc._forward_pre_hooks.values()) == 1


@recm.relaxed(inputs=recm.Permutation("b set f", axis="set"), terms={"weight": "un"})
class SetLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Linear(2, 2)

    def equivariant(self, z: Tensor) -> Tensor:
        return z

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return self.un(z)


def test_group_that_cannot_act_on_the_input_is_rejected_at_construction() -> None:
    """A permutation group cannot rotate 3-vectors: the error names the layer, its input and the group."""
    model = HygieneNet()
    with pytest.raises(ValueError, match=r"layer 'enc', input 'z'.*PermutationGenerators\(3\)"):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, group=recm.PermutationGenerators(3),
                      target=recm.Vector("b xyz"))
    assert not hasattr(model.enc, "recm_modulation")


def test_input_that_does_not_match_the_representation_is_named() -> None:
    """A forward whose input does not fit the declared pattern fails in that forward, naming the layer."""
    model = HygieneNet()
    opt = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))  # hooks capture while the optimizer lives
    with pytest.raises(ValueError, match=r"layer 'enc', input 'z'.*'b c xyz'.*\(8, 4, 2\)"):
        model.enc(torch.randn(8, 4, 2))
    del opt


def test_permuted_axis_that_does_not_match_the_group_is_named() -> None:
    """A set axis of size 4 under S_3: the first training forward names the layer and the group."""
    model = SetLayer()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, group=recm.PermutationGenerators(3),
                        example=torch.zeros(1, 3, 2))
    model(torch.randn(5, 3, 2))  # size 3 fits
    assert len(opt.layers) == 1
    with pytest.raises(ValueError, match=r"layer 'SetLayer', input 'z'.*PermutationGenerators\(3\)"):
        model(torch.randn(5, 4, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": 0.0}, r"a must be > 0, got 0.0"),
        ({"a": -1e-3}, r"a must be > 0, got -0.001"),
        ({"a": float("nan")}, r"a must be > 0, got nan"),
        ({"b": 0.0}, r"b must be > 0, got 0.0"),
        ({"b": -2.0}, r"b must be > 0, got -2.0"),
        ({"state_dim": 0}, r"state_dim must be an int >= 1, got 0"),
        ({"prune_eps": 1.0}, r"prune_eps must be in \[0, 1\), got 1.0"),
        ({"prune_eps": -0.01}, r"prune_eps must be in \[0, 1\), got -0.01"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    """a <= 0, b <= 0, state_dim < 1 and prune_eps outside [0, 1) each raise a ValueError with the value."""
    model = HygieneNet()
    with pytest.raises(ValueError, match=message):
        RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)
    assert not hasattr(model.enc, "recm_modulation")
