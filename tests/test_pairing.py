"""Each capture is paired with the target of its own forward; a training-loop mistake is an error.

Patterns: ``step(target=y)`` after one forward, ``observe(y)`` after each forward,
``with opt.pair(y):`` around it. Captures whose backward never ran (a forward that
raised, evaluation forwards in training mode, another model's forward through a
shared layer) are dropped and counted, and at most a few wait per layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import TinyNet, TinyVectorLinear, batch, example, train_steps
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer


def build(model: nn.Module | None = None, **kw: object) -> tuple[nn.Module, RECMOptimizer]:
    torch.manual_seed(0)
    model = TinyNet() if model is None else model
    kw.setdefault("target", recm.Vector("b xyz"))
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, a=0.1, example=example(model),
                        **kw)  # type: ignore[arg-type]
    return model, opt


def state(model: nn.Module) -> list[Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for m in model.modules():
        if recm.is_relaxed(m):
            mod = m.recm_modulation
            out += [mod.h.clone(), mod.t.clone()] + ([mod.newest.clone()] if mod.newest is not None else [])
    return out


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).pow(2).mean()


def accumulate(model: nn.Module, opt: RECMOptimizer, pattern: str, steps: int = 2) -> None:
    """Two micro-batches per step, each paired by ``pattern``."""
    for step in range(steps):
        for micro in range(2):
            x, y = batch(8, seed=10 * step + micro)
            if pattern == "pair":
                with opt.pair(y):
                    out = loss(model, x, y)
                out.backward()
            else:
                loss(model, x, y).backward()
                opt.observe(y)
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------- patterns
def test_accumulation_with_one_target_for_several_forwards_is_an_error_that_changes_nothing() -> None:
    """Two micro-batches, then step(target=y_last): ValueError naming the layers and 2 forwards; nothing moved."""
    model, opt = build()
    before = state(model)
    for micro in range(2):
        x, y = batch(8, seed=micro)
        loss(model, x, y).backward()
    with pytest.raises(ValueError, match=r"one target was paired with 2 forwards of layers \['dec', 'enc'\]"):
        opt.step(target=y)
    assert same(state(model), before)


def test_backward_without_any_target_is_an_error_naming_layers_and_forwards() -> None:
    """Forwards with a backward but no target: the step names the layers and how many forwards are unpaired."""
    model, opt = build()
    for micro in range(3):
        x, y = batch(8, seed=micro)
        loss(model, x, y).backward()
    with pytest.raises(ValueError, match=r"layers \['dec', 'enc'\] ran 3 training forward\(s\) with a backward"):
        opt.step()


def test_pair_context_and_observe_give_the_same_run() -> None:
    """Accumulation with `with opt.pair(y):` equals accumulation with observe(y) after each forward, bit for bit."""
    results = []
    for pattern in ("pair", "observe"):
        model, opt = build()
        accumulate(model, opt, pattern)
        results.append(state(model))
    assert same(*results)
    model, _ = build()
    assert int(model.enc.recm_modulation.t) == 0


def test_micro_batches_each_reach_h() -> None:
    """With two paired micro-batches per step, h sees both: newest holds 2 x 8 units."""
    model, opt = build()
    accumulate(model, opt, "observe", steps=1)
    assert model.enc.recm_modulation.newest.shape[1] == 16


# ------------------------------------------------------------------- captures that never get a backward
def reference(steps: int = 2) -> list[Tensor]:
    model, opt = build()
    train_steps(model, opt, range(steps))
    return state(model)


def test_failed_forward_is_dropped_and_counted() -> None:
    """A forward that raises after the tagged layers ran is never paired: h is that of the run without it."""

    class Failing(TinyNet):
        fail = False

        def forward(self, z: Tensor) -> Tensor:
            out = super().forward(z)
            if self.fail:
                raise RuntimeError("data loader glitch")
            return out

    model, opt = build(Failing())
    for step in range(2):
        model.fail = True
        with pytest.raises(RuntimeError):
            model(batch(8, seed=100 + step)[0])
        model.fail = False
        x, y = batch(16, seed=step)
        loss(model, x, y).backward()
        opt.step(target=y)
        opt.zero_grad()
    assert same(state(model), reference())
    assert [row["dropped"] for row in opt.report()] == [2, 2]


def test_evaluation_forwards_in_training_mode_are_dropped_and_bounded() -> None:
    """MC-dropout style forwards (train mode, grad on, no backward): memory stays bounded, h is unaffected."""
    from recm_opt._capture import _MAX_UNBACKED

    model, opt = build()
    for step in range(2):
        for i in range(40):
            model(batch(8, seed=1000 + i)[0])  # an evaluation loop that forgot no_grad and eval()
        assert len(opt._book.records) <= 2 * _MAX_UNBACKED
        x, y = batch(16, seed=step)
        loss(model, x, y).backward()
        opt.step(target=y)
        opt.zero_grad()
    assert same(state(model), reference())
    assert all(row["dropped"] == 80 for row in opt.report())


def test_foreign_models_forward_through_a_shared_layer_is_dropped() -> None:
    """Another model that reuses a tagged layer (no backward) never feeds this model's h."""
    model, opt = build()
    other = nn.Sequential(model.enc)  # shares the layer
    for step in range(2):
        x, y = batch(16, seed=step)
        out = loss(model, x, y)
        other(batch(8, seed=50 + step)[0])  # e.g. a feature extractor, no backward
        out.backward()
        opt.step(target=y)
        opt.zero_grad()
    assert same(state(model), reference())


# ------------------------------------------------------------------- the default target
def test_undeclared_vector_target_is_rejected_at_the_first_step_with_the_declaration() -> None:
    """Leaving target= out on a vector task: the first step fails, showing the declarations to add; nothing moved."""
    model, opt = build(target=recm.optimizer._UNDECLARED)
    before = state(model)
    x, y = batch(8)
    loss(model, x, y).backward()
    with pytest.raises(ValueError, match=r'never declared.*\(8, 3\).*target=recm\.Vector\("b xyz"\).*'
                                         r'recm\.Invariant\("b f0", f0=3\)'):
        opt.step(target=y)
    assert same(state(model), before)


def test_undeclared_target_accepts_one_label_per_sample() -> None:
    """The default target takes class labels (one number per unit) as invariant."""
    model = TinyNet()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, example=example(model))
    x, _ = batch(8)
    labels = torch.arange(8) % 3
    (model(x).sum(1) - labels).pow(2).mean().backward()
    opt.step(target=labels)
    newest = model.enc.recm_modulation.newest
    assert newest.shape == (3, 8, 4 * 3 + 1)
    torch.testing.assert_close(newest[1:, :, -1], newest[0, :, -1].expand(2, -1))  # labels do not rotate


# ------------------------------------------------------------------- faults and edges
def test_ten_consecutive_skipped_steps_warn_with_the_count() -> None:
    """A run of non-finite gradients warns once it reaches 10 skipped steps, saying how many."""
    model, opt = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            x, y = batch(8, seed=step)
            loss(model, x, y).backward()
            model.enc.weight.grad.fill_(float("nan"))
            opt.step(target=y)
            opt.zero_grad()
    msgs = [str(w.message) for w in caught if "consecutive" in str(w.message)]
    assert msgs == ["10 consecutive steps were skipped because a gradient was NaN/Inf; nothing is training "
                    "(check the loss, the learning rate or the AMP loss scale)"]
    assert opt.skipped_steps == 12


def test_zero_size_batch_leaves_nothing_pending() -> None:
    """A batch of 0 samples is not captured: nothing waits for a target and the step changes no h."""
    model = _Masked()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"))
    z = torch.randn(0, 3)
    model(z, torch.ones(0)).pow(2).sum().backward()
    assert not opt._book.records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not run": nothing was captured
        opt.step(target=z)
    assert int(model.recm_modulation.t) == 0 and not opt._book.records


@recm.relaxed(inputs={"z": recm.Vector("b xyz"), "mask": recm.Invariant("b")}, terms={"weight": "un"})
class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Parameter(torch.zeros(3, 3))

    def equivariant(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return z if mask is None else z * mask[:, None]

    def unconstrained(self, term: str, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return z @ self.un.T


def test_optional_input_that_comes_and_goes_fails_before_any_weight_moves() -> None:
    """A declared input missing in a training forward: ValueError in that forward, naming layer and input."""
    model = _Masked()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"))
    before = state(model)
    with pytest.raises(ValueError, match=r"layer '_Masked', input 'mask': a declared input must be a tensor"):
        model(torch.randn(4, 3))
    assert same(state(model), before) and not opt._book.records


def test_lbfgs_gets_its_closure_and_captures_its_first_evaluation_once() -> None:
    """LBFGS evaluates the closure itself; the wrapper passes it on, and only the first evaluation is captured."""
    model = TinyNet()
    opt = RECMOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model,
                        target=recm.Vector("b xyz"), a=0.1, example=example(model))
    x, y = batch(16)
    calls = []

    def closure() -> Tensor:
        opt.zero_grad()
        out = loss(model, x, y)
        out.backward()
        calls.append(float(out))
        return out

    first = opt.step(closure, target=y)
    assert len(calls) > 1 and float(first) == calls[0]
    assert int(model.enc.recm_modulation.t) == 1 and model.enc.recm_modulation.newest.shape[1] == 16


def test_torch_func_per_sample_gradients_do_not_break_the_next_step() -> None:
    """torch.func.vmap(grad(...)) through the model is not captured; the next step equals one without it."""
    model, opt = build()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        return (torch.func.functional_call(model, p, (xi[None],)) - yi[None]).pow(2).mean()

    x, y = batch(4, seed=7)
    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    assert grads["enc.weight"].shape[0] == 4
    train_steps(model, opt, range(2))
    assert same(state(model), reference())


def test_malformed_einops_pattern_fails_at_declaration() -> None:
    """An unbalanced pattern raises at declaration, with einops' message."""
    with pytest.raises(ValueError, match=r"'b \(c xyz' is not a valid einops pattern: Imbalanced parentheses"):
        recm.Vector("b (c xyz")


@pytest.mark.parametrize(("fn", "message"), [
    (lambda g, x: x[:, :1], r"must return the features' shape \(2, 3\), got \(2, 1\)"),
    (lambda g, x: x + 1, r"not a group action: fn\(identity, x\) != x"),
    (lambda g, x: x / 0 * g.sum(), r"non-finite values"),
])
def test_custom_action_is_checked_at_first_use_naming_the_layer(fn: object, message: str) -> None:
    """A Custom action with the wrong shape, no identity or non-finite output fails at the first forward."""

    @recm.relaxed(inputs=recm.Custom(fn, "b f", f=3), terms={"weight": "un"})  # type: ignore[arg-type]
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.un = nn.Parameter(torch.zeros(3, 3))

        def equivariant(self, z: Tensor) -> Tensor:
            return z

        def unconstrained(self, term: str, z: Tensor) -> Tensor:
            return z @ self.un.T

    model = Layer()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=None)  # hooks live with opt
    with pytest.raises(ValueError, match=r"layer 'Layer', input 'z': Custom action .*" + message):
        model(torch.ones(5, 3))
    del opt


def test_equivariant_may_name_its_instance_argument_anything() -> None:
    """``def equivariant(layer, z)`` declares the input ``z``, not ``layer``."""

    @recm.relaxed(inputs=recm.Vector("b xyz"), terms={"weight": "un"})
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.un = nn.Parameter(torch.zeros(3, 3))

        def equivariant(layer, z: Tensor) -> Tensor:  # noqa: N805
            return z

        def unconstrained(layer, term: str, z: Tensor) -> Tensor:  # noqa: N805
            return z @ layer.un.T

    assert list(recm.get_relaxation(Layer).inputs) == ["z"]
    model = Layer()
    opt = RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=None)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert int(model.recm_modulation.t) == 1


def test_shared_tagged_layer_used_twice_in_one_forward_is_one_pairing() -> None:
    """A layer applied twice in one forward gives two captures of one backward: both paired with the one target."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = TinyVectorLinear(4, 4, seed=1)

        def forward(self, z: Tensor) -> Tensor:
            return self.enc(torch.tanh(self.enc(z)))[:, 0]

    model, opt = build(Twice())
    x, y = batch(8)
    loss(model, x, y).backward()
    opt.step(target=y)
    assert model.enc.recm_modulation.newest.shape[1] == 16
