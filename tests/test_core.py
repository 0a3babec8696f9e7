"""The whole path a user walks: tag, wrap, train, export, report; units layouts and bad input."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from vector_model import RelaxedVectorLinear, VectorNet, make_task

import recm_opt as recm
from recm_opt.modulation import gamma

ROOT = Path(__file__).resolve().parents[1]


def _train(model, opt, x, y, steps=5, batch=16):
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        (model(xb) - yb).pow(2).mean().backward()
        opt.step(target=yb)
        opt.zero_grad()


def _vector_setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = VectorNet()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, target=recm.Vector("b xyz"),
                             example=torch.zeros(1, 4, 3), **kw)
    return model, opt


def test_readme_snippet_runs():
    """The README's usage snippet executes as written."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})


def test_untagged_layer_is_its_equivariant_part():
    """Before an optimizer is attached, a tagged layer returns f_eq (alpha = 0, beta = 1)."""
    layer = RelaxedVectorLinear(3, 5)
    z = torch.randn(4, 3, 3)
    torch.testing.assert_close(layer(z), layer.equivariant(z))


def test_attached_layer_at_t0_is_its_equivariant_part():
    """At t = 0 (h = 0): alpha = GELU(0) = 0 and beta = k(0) = 1."""
    model, _ = _vector_setup()
    z = torch.randn(4, 4, 3)
    layer = model.layers[0]
    torch.testing.assert_close(layer(z), layer.equivariant(z))


def test_instance_tagging():
    """A module instance can be tagged; its class stays untouched."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.un = nn.Parameter(torch.zeros(3))

        def equivariant(self, z):
            return z

        def unconstrained(self, term, z):
            return self.un.expand_as(z)

    m = recm.relaxed(Plain(), inputs=recm.Vector("b xyz"), terms={"bias": "un"})
    assert recm.is_relaxed(m) and not recm.is_relaxed(Plain())
    opt = recm.RECMOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, target=None)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert int(m.recm_modulation.t) == 1


def test_decorator_rejects_non_modules():
    """relaxed() raises TypeError for anything but an nn.Module class or instance."""
    with pytest.raises(TypeError, match="nn.Module"):
        recm.relaxed(int, inputs=recm.Vector())


def test_step_order_inner_then_projection_then_h():
    """h_1 = gamma_1 * l_theta(sample) evaluated with the post-step theta."""
    model, opt = _vector_setup()
    x, y = make_task(16, 1.0)
    (model(x) - y).pow(2).mean().backward()
    opt.step(target=y)
    mod = model.layers[0].recm_modulation
    expected = gamma(1, opt.a, 1.0) * mod.l_theta(mod.newest)
    torch.testing.assert_close(mod.h, expected.detach())
    assert int(mod.t) == 1 and float(mod.gamma_t) == pytest.approx(opt.a / (1 + opt.a))


def test_theta_gets_gradient_only_through_newest_term():
    """The forward's h has the committed value; theta's gradient flows through gamma_t * l_theta."""
    model, opt = _vector_setup()
    x, y = make_task(32, 1.0)
    _train(model, opt, x, y, steps=1)
    mod = model.layers[0].recm_modulation
    h_value = mod.state_value(with_grad=True)
    torch.testing.assert_close(h_value.detach(), mod.h)
    (model(x[:16]) - y[:16]).pow(2).mean().backward()
    assert mod.r_theta[0].weight.grad is not None and mod.r_theta[0].weight.grad.abs().sum() > 0


def test_plain_units_one_per_sample():
    """Plain (B, ...) inputs with per-sample targets: one unit per sample, features flattened."""
    model, opt = _vector_setup()
    x, y = make_task(16, 0.0)
    _train(model, opt, x, y, steps=1)
    newest = model.layers[0].recm_modulation.newest
    assert newest.shape == (1 + 2, 16, 4 * 3 + 3)  # identity + 2 SO(3) generators; z (4x3) and y (3)


@recm.relaxed(inputs=recm.Vector("b c xyz n", units="b n"), terms={"weight": "un"})
class _VNLayer(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in))
        self.un = nn.Parameter(torch.zeros(3 * c_out, 3 * c_in))

    def equivariant(self, z):
        return torch.einsum("oc,bcxn->boxn", self.w, z)

    def unconstrained(self, term, z):
        flat = z.permute(0, 3, 1, 2).flatten(2)  # (B, N, 3C), channel-major, xyz minor
        return (flat @ self.un.T).view(z.shape[0], z.shape[3], -1, 3).permute(0, 2, 3, 1)


def test_vector_neuron_units_one_per_point_with_broadcast_labels():
    """VN (B, C, 3, N) with class labels: one unit per point, the label broadcast to its points."""
    layer = _VNLayer(2, 4)
    opt = recm.RECMOptimizer(torch.optim.Adam(layer.parameters()), layer, max_units=1000,
                             example=torch.zeros(1, 2, 3, 1))
    z, labels = torch.randn(3, 2, 3, 7), torch.tensor([0, 1, 2])
    layer(z).sum().backward()
    opt.step(target=labels)
    newest = layer.recm_modulation.newest
    assert newest.shape == (3, 3 * 7, 2 * 3 + 1)
    # the label column is each point's sample label, identical in every group copy
    assert sorted(newest[0, :, -1].tolist()) == sorted([0.0] * 7 + [1.0] * 7 + [2.0] * 7)
    torch.testing.assert_close(newest[1:, :, -1], newest[0, :, -1].expand(2, -1))


@recm.relaxed(inputs={"h": recm.Invariant("n f"), "x": recm.Vector("n xyz")}, terms={"weight": "un"})
class _NodeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.un = nn.Linear(3, 3)

    def equivariant(self, h, x, edge_index=None):
        return x * h[:, :1]

    def unconstrained(self, term, h, x, edge_index=None):
        return self.un(x)


def test_graph_units_one_per_node_with_per_node_targets():
    """EGNN layout: node scalars (n, F) and coordinates (n, 3), per-node 3-vector targets; non-tensors ignored."""
    layer = _NodeLayer()
    opt = recm.RECMOptimizer(torch.optim.Adam(layer.parameters()), layer, target=recm.Vector("n xyz"),
                             example=(torch.zeros(1, 5), torch.zeros(1, 3)))
    h, x, y = torch.randn(10, 5), torch.randn(10, 3), torch.randn(10, 3)
    layer(h, x, edge_index="not a tensor").sum().backward()
    opt.step(target=y)
    newest = layer.recm_modulation.newest
    assert newest.shape == (3, 10, 5 + 3 + 3)
    R = recm.SO3Generators().generators()[0].float()
    torch.testing.assert_close(newest[1, :, 5:8], newest[0, :, 5:8] @ R.T)  # x rotated
    torch.testing.assert_close(newest[1, :, :5], newest[0, :, :5])  # scalars invariant


def test_captured_units_are_bounded_by_subsampling():
    """A batch with more units than max_units keeps exactly max_units of them."""
    layer = _VNLayer(2, 2)
    opt = recm.RECMOptimizer(torch.optim.Adam(layer.parameters()), layer, max_units=50,
                             example=torch.zeros(1, 2, 3, 1))
    layer(torch.randn(8, 2, 3, 100)).sum().backward()
    opt.step(target=torch.zeros(8))
    assert layer.recm_modulation.newest.shape[1] == 50


def test_wrong_vector_axis_size_names_layer_input_and_shapes():
    """A 3-vector axis of size 4 raises ValueError naming the layer, the input and both shapes."""
    model, _ = _vector_setup()
    with pytest.raises(ValueError, match=r"layer 'layers.0', input 'z'.*'b c xyz'.*\(2, 4, 4\)"):
        model(torch.randn(2, 4, 4))


def test_target_mismatch_raises():
    """A target whose batch does not match the layer's units raises ValueError."""
    model, opt = _vector_setup()
    model(torch.randn(8, 4, 3)).sum().backward()
    with pytest.raises(ValueError, match="target"):
        opt.step(target=torch.randn(5, 3))


def test_step_without_target_is_a_clear_error_and_changes_nothing():
    """Captured inputs with a declared target but no target: ValueError before any change."""
    model, opt = _vector_setup()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    model(torch.randn(8, 4, 3)).sum().backward()
    with pytest.raises(ValueError, match="observe"):
        opt.step()
    for p, q in zip(params, before):
        torch.testing.assert_close(p, q)


def test_layer_that_never_ran_keeps_h_with_one_warning():
    """A tagged layer absent from the forward keeps h unchanged and warns once."""

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = RelaxedVectorLinear(4, 1)
            # never runs, so an example batch cannot size it: its input sizes are declared
            self.unused = recm.relaxed(RelaxedVectorLinear(4, 1), inputs=recm.Vector("b c xyz", c=4),
                                       terms=recm.get_relaxation(self.used).terms)

        def forward(self, z):
            return self.used(z)[:, 0]

    model = TwoPaths()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters()), model, target=recm.Vector("b xyz"),
                             example={"z": torch.zeros(1, 4, 3)})
    x, y = make_task(48, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, x, y, steps=3)
    msgs = [str(w.message) for w in caught if "did not run" in str(w.message)]
    assert len(msgs) == 1 and "unused" in msgs[0]
    assert int(model.unused.recm_modulation.t) == 0 and model.unused.recm_modulation.h.abs().sum() == 0
    assert int(model.used.recm_modulation.t) == 3


def test_nonfinite_input_is_skipped_and_counted():
    """NaN in a captured input: the layer's h is unchanged and its counter increments."""
    model, opt = _vector_setup()
    x, y = make_task(16, 1.0)
    _train(model, opt, x, y, steps=1)
    mod = model.layers[0].recm_modulation
    h, t = mod.h.clone(), int(mod.t)
    x_bad = x.clone()
    x_bad[0, 0, 0] = float("nan")
    out = model(x_bad)
    out.nan_to_num().sum().backward()
    opt.observe(y)
    opt.step()
    torch.testing.assert_close(mod.h, h)
    assert int(mod.t) == t
    assert opt.report()[0]["skipped"] >= 1


def test_model_without_tagged_layers_acts_as_inner_optimizer():
    """No @relaxed layers: one warning, and steps equal the inner optimizer's."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    with pytest.warns(UserWarning, match="no @relaxed layers"):
        opt = recm.RECMOptimizer(torch.optim.AdamW(a.parameters(), lr=0.1), a)
    ref = torch.optim.AdamW(b.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    for model, o in ((a, opt), (b, ref)):
        model(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_eval_output_equals_exported_output():
    """In eval mode a tagged layer computes exactly what export bakes in."""
    model, opt = _vector_setup()
    x, y = make_task(400 * 16, 1.0)
    _train(model, opt, x, y, steps=400)
    model.eval()
    exported = recm.export(model)
    z = torch.randn(32, 4, 3)
    torch.testing.assert_close(exported(z), model(z), rtol=0, atol=0)
    assert not any("recm_modulation" in n for n, _ in exported.named_parameters())
    assert all(not m._forward_pre_hooks for m in exported.modules())


def test_export_removes_pruned_terms_with_their_parameters():
    """Terms with |alpha| < eps are removed from the exported model with their parameters."""
    model, opt = _vector_setup()
    x, y = make_task(80, 0.0)
    _train(model, opt, x, y, steps=5)
    rows = opt.report()
    assert all(not r["kept"] for r in rows)
    exported = recm.export(model)
    names = {n for n, _ in exported.named_parameters()}
    assert not any(k in n for n in names for k in ("un_weight", "un_bias", "noise_scale"))
    assert sum(p.numel() for p in exported.parameters()) == sum(r["params_after"] for r in rows)
    assert recm.parameter_overhead(rows, model) == 0.0


def test_report_rows_have_the_documented_keys():
    """report() returns per-layer alpha per term, beta, |h|, kept/pruned and parameter counts."""
    model, opt = _vector_setup()
    rows = opt.report()
    assert [r["name"] for r in rows] == ["layers.0", "layers.1", "layers.2"]
    for key in ("alpha", "beta", "h_norm", "t", "kept", "pruned", "params_before", "params_after", "skipped"):
        assert key in rows[0]
    assert set(rows[0]["alpha"]) == {"weight", "bias", "noise"}
    assert "layers.0" in recm.format_report(rows)


def test_modulation_params_join_inner_optimizer_in_own_group_without_weight_decay():
    """r_theta, w_alpha and w_beta are one extra param group of the inner optimizer, weight decay 0."""
    model = VectorNet()
    inner = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    opt = recm.RECMOptimizer(inner, model, example=torch.zeros(1, 4, 3))
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["recm"] and inner.param_groups[1]["weight_decay"] == 0
    assert opt.param_groups is inner.param_groups
    mod = model.layers[0].recm_modulation
    assert mod.w_alpha.shape == (3, 16) and mod.w_beta.shape == (16,) and mod.h.shape == (16,)


def test_public_surface_is_small():
    """recm_opt.__all__ is sorted, about 24 names (those the docs use); RECMOptimizer adds about ten methods."""
    assert recm.__all__ == sorted(recm.__all__, key=str.lower) or recm.__all__ == sorted(recm.__all__)
    assert len(recm.__all__) <= 24 and all(hasattr(recm, n) for n in recm.__all__)
    own = [n for n in vars(recm.RECMOptimizer) if not n.startswith("_") and n not in ("captures_inputs",
                                                                                    "modulation_kind")]
    assert sorted(own) == ["add_param_group", "detach", "eval", "layers", "load_state_dict", "observe", "pair",
                           "report", "state_dict", "step", "train", "zero_grad"]
