"""Issue law 9: exported fully pruned layers are exactly equivariant, and equivariance_error catches real defects."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import OctahedralGenerators, elements_of, rng, seeds
from torch import Tensor, nn
from vector_model import RelaxedVectorLinear, VectorNet, make_task

import recm_opt as recm
from recm_opt.groups import Group

SO3 = recm.SO3Generators()
VN = recm.Vector("b c xyz")


def _trained(seed: int, steps: int, broken: float = 0.0) -> tuple[nn.Module, recm.RECMOptimizer, Tensor]:
    torch.manual_seed(seed)  # the example model initialises from the global stream
    model = VectorNet(c_in=3, hidden=6).double()
    opt = recm.RECMOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, SO3, target=recm.Vector("b xyz"),
                             seed=seed, example=torch.zeros(1, 3, 3, dtype=torch.float64))
    x, y = make_task(64, broken, c_in=3, seed=seed)
    x, y = x.double(), y.double()
    for _ in range(steps):
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()
    return model, opt, x


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 5))
def test_fully_pruned_export_is_equivariant(seed: int, steps: int) -> None:
    """Symmetric data prunes every alpha; the exported model and each exported layer have float64 error < 1e-6."""
    model, opt, x = _trained(seed, steps)
    assert all(not row["kept"] for row in opt.report())
    exported = recm.export(model).eval()
    error = recm.equivariance_error(exported, x[:8], SO3, input_reps=[VN], output_rep=recm.Vector("b xyz"))
    assert error < 1e-6
    z = x[:8]
    for layer in exported.layers:
        assert recm.equivariance_error(layer, z, SO3) < 1e-6  # the tag's declared input rep, also for the output
        z = exported.gate(layer(z))


def test_export_with_a_kept_term_is_not_equivariant() -> None:
    """Control: force alpha_weight of the first layer to ~1; the exported model is then measurably not equivariant."""
    model, _, x = _trained(0, 2)
    mod = model.layers[0].recm_modulation
    with torch.no_grad():
        mod.h.copy_(3 * mod.w_alpha[0] / mod.w_alpha[0].norm() ** 2)  # w_alpha_0 . h = 3: alpha_0 = GELU(3)
    exported = recm.export(model).eval()
    assert "un_weight" in dict(exported.layers[0].named_parameters())
    error = recm.equivariance_error(exported, x[:8], SO3, input_reps=[VN], output_rep=recm.Vector("b xyz"))
    assert error > 1e-4


class ChannelMix(nn.Module):
    """Equivariant VN linear map on (B, C, 3); ``transposed`` contracts the weight with xyz instead (the bug)."""

    def __init__(self, c: int, transposed: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, generator=rng(1), dtype=torch.float64))
        self.transposed = transposed

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        if self.transposed:
            return torch.einsum("xy,bcy->bcx", self.weight, z)  # needs c = 3: shapes cannot catch it
        return torch.einsum("oc,bcx->box", self.weight, z)


class Reynolds(nn.Module):
    """The group average of a dense map: mean_g D(g)^T W D(g) z, exactly equivariant for a finite group.

    ``defect`` injects one of the two bugs equivariance checks are known to miss or cause:
    ``"transposed"`` acts back with D(g) instead of D(g)^T; ``"reshape"`` averages the
    generator-stacked copies after a reshape that mixes the group axis with units and features.
    """

    def __init__(self, group: Group, c: int, defect: str | None = None) -> None:
        super().__init__()
        self.group, self.elements, self.defect = group, elements_of(group), defect
        self.weight = nn.Parameter(torch.randn(3 * c, 3 * c, generator=rng(2), dtype=torch.float64))

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        k, (b, c, _) = len(self.elements), z.shape
        moved = VN.act(self.group, self.elements, z)  # (k, B, C, 3): x' = x @ D(g).T
        mixed = (moved.reshape(k, b, 3 * c) @ self.weight.T).reshape(k, b, c, 3)
        D = VN.matrices(self.group, self.elements, 3)
        back = "kij,kbcj->kbci" if self.defect == "transposed" else "kji,kbcj->kbci"  # D^T undoes D
        out = torch.einsum(back, D, mixed)
        if self.defect == "reshape":
            return out.reshape(b, k, c, 3).mean(1)  # should be out.mean(0)
        return out.mean(0)


FINITE_3D = [recm.DihedralGenerators(3), recm.CyclicGenerators(5), OctahedralGenerators()]


@pytest.mark.parametrize("group", FINITE_3D, ids=repr)
@given(seed=seeds())
def test_equivariance_error_is_zero_on_exact_maps(group: Group, seed: int) -> None:
    """< 1e-12 (float64) on a group-averaged dense map over every element, and on a VN channel mix under SO(3)."""
    z = torch.randn(4, 3, 3, generator=rng(seed), dtype=torch.float64)
    assert recm.equivariance_error(Reynolds(group, 3), z, group, input_reps=[VN],
                                   elements=elements_of(group)) < 1e-12
    assert recm.equivariance_error(ChannelMix(3), z, SO3, input_reps=[VN], generator=rng(seed)) < 1e-12
    assert recm.equivariance_error(RelaxedVectorLinear(3, 5).double(), z, SO3) < 1e-12  # tag's declared reps


@pytest.mark.parametrize("group", FINITE_3D, ids=repr)
@pytest.mark.parametrize("defect", ["transposed", "reshape"])
def test_equivariance_error_catches_transposed_action_and_reshape_mixup(group: Group, defect: str) -> None:
    """A transposed action or a generator/feature reshape mix-up gives a relative error far above rounding (> 1e-2)."""
    z = torch.randn(4, 3, 3, generator=rng(0), dtype=torch.float64)
    error = recm.equivariance_error(Reynolds(group, 3, defect), z, group, input_reps=[VN],
                                    elements=elements_of(group))
    assert error > 1e-2


def test_equivariance_error_catches_transposed_contraction_and_wrong_output_axis() -> None:
    """Weight on xyz instead of channels (C = 3, so shapes agree), or an output rep on the wrong axis: error > 1e-2."""
    z = torch.randn(4, 3, 3, generator=rng(0), dtype=torch.float64)
    assert recm.equivariance_error(ChannelMix(3, transposed=True), z, SO3, input_reps=[VN]) > 1e-2
    wrong_axis = recm.Vector("b xyz c")  # the output is (B, C, 3); this rep rotates the channel axis
    assert recm.equivariance_error(ChannelMix(3), z, SO3, input_reps=[VN], output_rep=wrong_axis) > 1e-2


def test_equivariance_error_is_relative_and_handles_zero_output() -> None:
    """Scaling a map does not change its relative error; a map that returns zeros has error 0."""
    z = torch.randn(4, 3, 3, generator=rng(0), dtype=torch.float64)
    bad = ChannelMix(3, transposed=True)
    e1 = recm.equivariance_error(bad, z, SO3, input_reps=[VN])
    e2 = recm.equivariance_error(lambda x: 1e6 * bad(x), z, SO3, input_reps=[VN])
    assert math.isclose(e1, e2, rel_tol=1e-9)
    assert recm.equivariance_error(lambda x: torch.zeros_like(x), z, SO3, input_reps=[VN]) == 0.0
