"""The batched step (foreach / stacked across layers) equals the per-layer reference loop, in float64."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import rng, seeds
from torch import Tensor, nn
from vector_model import RelaxedVectorLinear

import recm_opt as recm
from recm_opt.modulation import (
    Modulation,
    _foreach_commit,
    _foreach_project_norm_,
    _stacked_alpha,
    _stacked_r_theta,
    project_norm_,
)
from recm_opt.optimizer import _all_units, _unravel

# float64 throughout: bmm against linear, and a batched sum against a loop, differ by a few ulps.
TOL = 1e-12


def _modulations(seed: int, n: int, d: int, terms: int = 3) -> list[Modulation]:
    g = rng(seed)
    mods = [Modulation(tuple(f"t{i}" for i in range(terms)), seed=seed + j, in_features=d).double() for j in range(n)]
    for mod in mods:
        with torch.no_grad():
            mod.h.copy_(torch.randn(mod.h.shape, generator=g, dtype=torch.float64))
            mod.w_alpha.copy_(torch.randn(mod.w_alpha.shape, generator=g, dtype=torch.float64))
            mod.t.fill_(int(torch.randint(0, 50, (), generator=g)))
            mod.gamma_t.fill_(0.1)
    return mods


@given(seed=seeds(), n=st.integers(1, 6), rows=st.booleans(), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_foreach_projection_equals_per_tensor_projection(seed: int, n: int, rows: bool, scale: float) -> None:
    """Batched projections leave every tensor (or row) exactly where project_norm_ puts it."""
    g = rng(seed)
    shapes = [(int(torch.randint(1, 4, (), generator=g)), 5) if rows else
              tuple(int(s) for s in torch.randint(1, 5, (int(torch.randint(0, 3, (), generator=g)),), generator=g))
              for _ in range(n)]
    xs = [scale * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ref = [x.clone() for x in xs]
    for x in ref:
        project_norm_([x], 1.0, dim=1 if rows else None)
    _foreach_project_norm_(xs, 1.0, rows=rows)
    for x, y in zip(xs, ref):
        torch.testing.assert_close(x, y, atol=TOL, rtol=TOL)


@given(seed=seeds(), n=st.integers(1, 5), d=st.integers(1, 9), r=st.integers(1, 12))
def test_stacked_r_theta_equals_each_layers_r_theta(seed: int, n: int, d: int, r: int) -> None:
    """One batched r_theta call over G layers gives each layer's own r_theta output."""
    mods = _modulations(seed, n, d)
    x = torch.randn(n, r, d, generator=rng(seed + 1), dtype=torch.float64)
    out = _stacked_r_theta(mods, x)
    for i, mod in enumerate(mods):
        torch.testing.assert_close(out[i], mod.r_theta(x[i]), atol=TOL, rtol=TOL)


@given(seed=seeds(), n=st.integers(1, 5), terms=st.integers(1, 4))
def test_stacked_alpha_equals_coefficients(seed: int, n: int, terms: int) -> None:
    """The concatenated alphas equal each layer's coefficients()[0]."""
    mods = _modulations(seed, n, 3, terms)
    expected = torch.cat([mod.coefficients()[0] for mod in mods])
    torch.testing.assert_close(_stacked_alpha(mods), expected, atol=TOL, rtol=TOL)


@given(seed=seeds(), n=st.integers(1, 5), bad=st.integers(-1, 4), a=st.sampled_from([1e-3, 0.1, 1.0]))
def test_foreach_commit_equals_commit_and_skips_nonfinite(seed: int, n: int, bad: int, a: float) -> None:
    """Batched commit equals Modulation.commit per layer; a layer with a non-finite l is left unchanged."""
    mods, ref = _modulations(seed, n, 3), _modulations(seed, n, 3)
    ls = torch.randn(n, mods[0].h.numel(), generator=rng(seed + 2), dtype=torch.float64)
    if 0 <= bad < n:
        ls[bad, 0] = math.nan
    ok, capped = _foreach_commit(mods, ls, a, 1.0)
    ref_capped = []
    for i, mod in enumerate(ref):
        if bool(torch.isfinite(ls[i]).all()):
            ref_capped.append(bool(mod.commit(ls[i], a, 1.0)))
        else:
            ref_capped.append(False)
    assert ok.tolist() == [bool(torch.isfinite(l).all()) for l in ls]
    assert capped.tolist() == ref_capped
    for mod, expect in zip(mods, ref):
        torch.testing.assert_close(mod.h, expect.h, atol=TOL, rtol=TOL)
        torch.testing.assert_close(mod.gamma_t, expect.gamma_t, atol=TOL, rtol=TOL)
        assert int(mod.t) == int(expect.t)


@given(seed=seeds(), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), keep=st.integers(0, 7),
       feat=st.integers(0, 2))
def test_all_units_equals_unravel_index_gather(seed: int, sizes: list[int], keep: int, feat: int) -> None:
    """Every unit without an index equals gathering at unravel_index(arange(total)), broadcasts included."""
    names = [f"u{i}" for i in range(len(sizes))]
    grid = dict(zip(names, sizes))
    own = [u for i, u in enumerate(names) if keep >> i & 1] or names[:1]  # a subset of the grid's unit axes
    own = own[::-1] if seed % 2 else own  # in another order than the grid's
    v = torch.randn(*[grid[u] for u in own], *([2] * feat), generator=rng(seed), dtype=torch.float64)
    multi = dict(zip(grid, torch.unravel_index(torch.arange(math.prod(sizes)), tuple(sizes))))
    expected = v[tuple(multi[u] for u in own)]
    torch.testing.assert_close(_all_units(v, {u: grid[u] for u in own}, grid), expected, atol=0, rtol=0)


@pytest.mark.parametrize("group,rep,size", [
    (recm.SO3Generators(), recm.Vector("b c xyz n", units="b n"), 3),
    (recm.SO2Generators(), recm.Vector("b xyz"), 3),
    (recm.CyclicGenerators(5), recm.Permutation("b set", axis="set"), 5),
])
def test_cached_action_equals_rep_act(group: recm.Group, rep: recm.Representation, size: int) -> None:
    """The optimizer's cached-matrix action equals Representation.act."""
    layer = _TinyLayer()
    opt = recm.RECMOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer, group, target=None)
    x = torch.randn(7, 2, size, 4) if rep.units == ("b", "n") else torch.randn(7, size)
    feat, _ = rep.unit_view(x)
    feat = feat.reshape(-1, *feat.shape[len(rep.units):])
    for _ in range(2):  # built once, then read from the cache
        torch.testing.assert_close(opt._book._act(rep, feat), rep.act(group, group.generators(), feat))


@recm.relaxed(inputs=recm.Vector("b xyz"), terms={"weight": "un"})
class _TinyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.un = nn.Linear(3, 3)

    def equivariant(self, z: Tensor) -> Tensor:
        return z

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return self.un(z)


class _Net(nn.Module):
    """Layers of two widths: three share one batched group, the others are alone in theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([RelaxedVectorLinear(4, 6), RelaxedVectorLinear(6, 6),
                                     RelaxedVectorLinear(6, 6), RelaxedVectorLinear(6, 6),
                                     RelaxedVectorLinear(6, 1)])

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.layers:
            z = torch.tanh(layer(z))
        return z[:, 0]


def _reference_project(self: recm.RECMOptimizer) -> None:
    for layer in self._layers:
        project_norm_([layer.mod.w_alpha], 1.0, dim=1)
        project_norm_([layer.mod.w_beta], 1.0)
        project_norm_([p for ps in layer.term_params.values() for p in ps], self.weight_radius)


def _train(seed: int, batch: int, max_units: int, accumulate: int, steps: int = 3,
           foreach: bool = True) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = _Net().double()
    # SGD, not Adam: Adam turns a rounding-level gradient (the exact one is 0) into a full-size step.
    opt = recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"),
                             a=0.5, max_units=max_units, seed=seed, prune_eps=0.05, foreach=foreach,
                             example=torch.zeros(1, 4, 3, dtype=torch.float64))
    g = rng(seed)
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(batch, 4, 3, generator=g, dtype=torch.float64)
            y = torch.randn(batch, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0, 0]).double()
            (model(x) - y).pow(2).mean().backward()
            opt.observe(y)
        opt.step()
        opt.zero_grad()
    return model, [layer.recm_modulation.live for layer in model.layers]


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 12), max_units=st.integers(3, 16),
       accumulate=st.integers(1, 2))
def test_batched_step_equals_per_layer_reference(seed: int, batch: int, max_units: int, accumulate: int) -> None:
    """foreach=True (batched samples, r_theta, update and coefficients) equals the per-layer loop, foreach=False.

    Parameters, h, t, the newest samples and the kept/pruned flags agree after three steps,
    with one or two paired micro-batches per step.
    """
    fast, fast_live = _train(seed, batch, max_units, accumulate)
    # the projections' per-tensor reference too
    with mock.patch.object(recm.RECMOptimizer, "_project", _reference_project):
        ref, ref_live = _train(seed, batch, max_units, accumulate, foreach=False)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=TOL, rtol=TOL, msg=name)
    for a, b in zip(fast.layers, ref.layers):
        ma, mb = a.recm_modulation, b.recm_modulation
        torch.testing.assert_close(ma.h, mb.h, atol=TOL, rtol=TOL)
        torch.testing.assert_close(ma.newest, mb.newest, atol=TOL, rtol=TOL)
        assert int(ma.t) == int(mb.t)
    assert fast_live == ref_live


@given(seed=seeds(), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_unravel_equals_torch_unravel_index(seed: int, sizes: list[int]) -> None:
    """The optimizer's unravel gives torch.unravel_index's multi-index."""
    idx = torch.randperm(math.prod(sizes), generator=rng(seed))
    expected = torch.stack(torch.unravel_index(idx, tuple(sizes)))
    assert torch.equal(_unravel(idx, tuple(sizes)), expected)


def _after_steps(seed: int = 0, foreach: bool = True) -> tuple[nn.Module, recm.RECMOptimizer, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = _Net().double()
    opt = recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, target=recm.Vector("b xyz"), a=0.5,
                             foreach=foreach, example=torch.zeros(1, 4, 3, dtype=torch.float64))
    g = rng(seed)
    x, y = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    for _ in range(2):
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()
    return model, opt, x, y


def _grads(model: nn.Module, x: Tensor, y: Tensor, forwards: int = 1) -> dict[str, Tensor]:
    torch.manual_seed(1)  # the noise term draws from the global generator
    for _ in range(forwards):
        (model(x) - y).pow(2).mean().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("forwards", [1, 2])
def test_batched_coefficients_give_the_per_layer_gradients(forwards: int) -> None:
    """The batched coefficients (one autograd function for all layers) give the per-layer path's gradients.

    With two forwards before one backward each forward takes its own batched rows; a
    second forward-backward round after the first backward starts afresh.
    """
    model, _, x, y = _after_steps()
    fast, again = _grads(model, x, y, forwards), _grads(model, x, y)
    ref_model, _, _, _ = _after_steps(foreach=False)
    ref, ref_again = _grads(ref_model, x, y, forwards), _grads(ref_model, x, y)
    assert set(fast) == set(ref) and any("r_theta" in name for name in ref)  # the newest term reaches r_theta
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], atol=TOL, rtol=TOL, msg=name)
        torch.testing.assert_close(again[name], ref_again[name], atol=TOL, rtol=TOL, msg=name)


@given(seed=seeds(), n=st.integers(1, 4), terms=st.integers(1, 3), copies=st.integers(2, 4),
       units=st.integers(1, 5), d=st.integers(1, 6))
def test_batched_coefficients_backward_equals_autograd(seed: int, n: int, terms: int, copies: int, units: int,
                                                       d: int) -> None:
    """The written-out backward of the batched coefficients equals autograd through each layer's own graph."""
    from recm_opt._coefficients import _Pass

    mods = _modulations(seed, n, d, terms)
    g = rng(seed + 3)
    for mod in mods:
        mod.newest = torch.randn(copies, units, d, generator=g, dtype=torch.float64)
        with torch.no_grad():
            mod.w_beta.copy_(torch.randn(mod.w_beta.shape, generator=g, dtype=torch.float64))
    weights = torch.randn(n, terms + 1, generator=g, dtype=torch.float64)
    p = _Pass(mods, None)
    loss = sum((weights[i, :terms] * torch.stack(list(p.terms[i]))).sum() + weights[i, terms] * p.betas[i]
               for i in range(n))
    fast = torch.autograd.grad(loss, [q for m in mods for q in m.parameters()])
    ref_loss = sum((weights[i, :terms] * m.reference_coefficients(with_grad=True)[0]).sum()
                   + weights[i, terms] * m.reference_coefficients(with_grad=True)[1] for i, m in enumerate(mods))
    ref = torch.autograd.grad(ref_loss, [q for m in mods for q in m.parameters()])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_batched_coefficients_follow_in_place_changes_and_copies() -> None:
    """An in-place change to w_alpha after the step is seen by the next forward; deep copies work."""
    import copy

    model, _, x, _ = _after_steps()
    mod = model.layers[1].recm_modulation
    alpha_before = mod.coefficients(with_grad=True)[0].detach().clone()
    with torch.no_grad():
        mod.w_alpha.mul_(-1.0)
    torch.testing.assert_close(mod.coefficients(with_grad=True)[0], mod.coefficients()[0], atol=TOL, rtol=TOL)
    assert not torch.allclose(mod.coefficients()[0], alpha_before)
    clone = copy.deepcopy(model)  # AveragedModel does this: the copy's layers compute their own coefficients
    outputs = []
    for m in (clone, model):
        torch.manual_seed(2)  # the same noise draws
        outputs.append(m(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=TOL, rtol=TOL)


def test_foreach_must_be_a_bool_or_none() -> None:
    """foreach accepts True, False and None, and names anything else."""
    layer = _TinyLayer()
    with pytest.raises(TypeError, match="foreach"):
        recm.RECMOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer, target=None, foreach="yes")
