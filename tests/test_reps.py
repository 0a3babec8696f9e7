"""Issue 3, law 8: every representation is an orthogonal homomorphism, with the x' = x @ D(g).T convention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import OctahedralGenerators, elements, rng, seeds
from torch import Tensor

import recm_opt as recm
from recm_opt.groups import Group

SO3, O3, SO2 = recm.SO3Generators(), recm.O3Generators(), recm.SO2Generators()
PRODUCT = recm.ProductGenerators(recm.SO3Generators(), recm.PermutationGenerators(3))
VECTOR3_GROUPS = [SO3, O3, SO2, recm.CyclicGenerators(5), recm.DihedralGenerators(4), OctahedralGenerators(), PRODUCT]


def _parity(g: Tensor, x: Tensor) -> Tensor:
    """A Custom action: the sign representation det(g) of O(3) on every feature."""
    return x * torch.sign(torch.linalg.det(g))


def _irreps_cases() -> list[tuple[recm.Representation, Group, tuple[int, ...]]]:
    try:
        import e3nn  # noqa: F401
    except ImportError:
        return []
    rep = recm.Irreps("2x0e+1o+1e+2e")
    return [(rep, group, (2, rep.irreps.dim)) for group in (SO3, O3, recm.DihedralGenerators(3), PRODUCT)]


# (representation, group, per-unit feature shape)
CASES = (
    [(recm.Vector("b c xyz"), group, (2, 3)) for group in VECTOR3_GROUPS]
    + [(recm.Vector("b xy", axis="xy", size=2), group, (2,))
       for group in (SO2, recm.CyclicGenerators(6), recm.DihedralGenerators(5))]
    + [(recm.Permutation("b set f", axis="set"), group, (n, 2))
       for group, n in ((recm.PermutationGenerators(4), 4), (recm.CyclicGenerators(5), 5),
                        (recm.DihedralGenerators(6), 6), (PRODUCT, 3))]
    + [(recm.Invariant("b ..."), group, (3,)) for group in (SO3, recm.PermutationGenerators(3))]
    + [(recm.Custom(_parity, "b f"), O3, (4,))]
    + _irreps_cases()
)
IDS = [f"{type(r).__name__}-{g.name}" for r, g, _ in CASES]


def _tol(rep: recm.Representation) -> float:
    # e3nn's Wigner constants are stored in float32: D(gh) = D(g) D(h) holds to ~4e-6 at worst
    # (20k Haar pairs of O(3), up to l = 3); every other representation is exact in float64.
    return 1e-5 if isinstance(rep, recm.Irreps) else 1e-10


@pytest.mark.parametrize(("rep", "group", "shape"), CASES, ids=IDS)
@given(data=st.data(), seed=seeds())
def test_representation_is_homomorphism(data: st.DataObject, rep: recm.Representation, group: Group,
                                        shape: tuple[int, ...], seed: int) -> None:
    """act(e) = id, act(gh) = act(g) o act(h), and ||act(g) x|| = ||x|| (orthogonality), on random features."""
    g, h = data.draw(elements(group, 2))
    x = torch.randn(5, *shape, generator=rng(seed), dtype=torch.float64)
    tol = _tol(rep)
    (ex,) = rep.act(group, group.identity()[None], x)
    torch.testing.assert_close(ex, x, atol=tol, rtol=tol)
    (gh_x,) = rep.act(group, (g @ h)[None], x)
    (g_h_x,) = rep.act(group, g[None], rep.act(group, h[None], x)[0])
    torch.testing.assert_close(gh_x, g_h_x, atol=tol, rtol=tol)
    (gx,) = rep.act(group, g[None], x)
    torch.testing.assert_close(gx.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=tol, rtol=tol)


MATRIX_CASES = [(r, g, s) for r, g, s in CASES if not isinstance(r, recm.Custom)]


@pytest.mark.parametrize(("rep", "group", "shape"), MATRIX_CASES,
                         ids=[i for i, (r, _, _) in zip(IDS, CASES) if not isinstance(r, recm.Custom)])
@given(data=st.data())
def test_representation_matrices_are_orthogonal_homomorphism(data: st.DataObject, rep: recm.Representation,
                                                             group: Group, shape: tuple[int, ...]) -> None:
    """D(e) = I, D(gh) = D(g) D(h) and D(g)^T D(g) = I for the matrices a representation exposes."""
    g, h = data.draw(elements(group, 2))
    size = shape[rep._axis_dim()] if rep.axis is not None else shape[0]
    D = rep.matrices(group, torch.stack([group.identity(), g, h, g @ h]), size)
    eye = torch.eye(D.shape[-1], dtype=D.dtype)
    tol = _tol(rep)
    torch.testing.assert_close(D[0], eye, atol=tol, rtol=tol)
    torch.testing.assert_close(D[3], D[1] @ D[2], atol=tol, rtol=tol)
    torch.testing.assert_close(D[1].T @ D[1], eye, atol=tol, rtol=tol)


def test_vector_convention_rotates_x_to_y() -> None:
    """x' = x @ D(g).T: the quarter turn of C_4 about z maps e_x to e_y (and e_y to -e_x)."""
    group = recm.CyclicGenerators(4)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    (moved,) = recm.Vector("b xyz").act(group, group.generators(), x)
    torch.testing.assert_close(moved, torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64))
    D = recm.Vector("b xyz").matrices(group, group.generators(), 3)[0]
    torch.testing.assert_close(moved, x @ D.T)


def test_vector_convention_acts_on_the_declared_axis_only() -> None:
    """In VN layout (B, C, 3, N) the rotation acts on xyz, whatever the position of the channel and point axes."""
    group = recm.CyclicGenerators(4)
    x = torch.randn(2, 5, 3, 7, generator=rng(0), dtype=torch.float64)
    rep = recm.Vector("b c xyz n", units="b n")
    v, _ = rep.unit_view(x)  # (b, n, c, xyz)
    (moved,) = rep.act(group, group.generators(), v.flatten(0, 1))
    D = rep.matrices(group, group.generators(), 3)[0]
    expected = torch.einsum("ij,bcjn->bnci", D, x).flatten(0, 1)  # x'_i = sum_j D_ij x_j on xyz
    torch.testing.assert_close(moved, expected)


def test_permutation_convention_shifts_and_swaps() -> None:
    """Cyclic shift by one step: x'[i] = x[i - 1]; the transposition (0 1) swaps the first two entries."""
    x = torch.arange(4.0, dtype=torch.float64)[None]
    c4 = recm.CyclicGenerators(4)
    (shifted,) = recm.Permutation("b set", axis="set").act(c4, c4.generators(), x)
    torch.testing.assert_close(shifted, torch.tensor([[3.0, 0.0, 1.0, 2.0]], dtype=torch.float64))
    s3 = recm.PermutationGenerators(3)
    swapped = recm.Permutation("b set", axis="set").act(s3, s3.generators()[:1], x[:, :3])[0]
    torch.testing.assert_close(swapped, torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64))


def test_irreps_vector_block_rotates_like_a_cartesian_vector() -> None:
    """Irreps '1o' acts by D(R) = R (e3nn 0.6's l = 1 basis is x, y, z), to e3nn's float32-stored constants."""
    pytest.importorskip("e3nn")
    R = O3.sample(16, rng(0))
    D = recm.Irreps("1o").matrices(O3, R)
    torch.testing.assert_close(D, R, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "build",
    [lambda: recm.Permutation("b set", axis="b"), lambda: recm.Vector("b xyz", units="b xyz"),
     lambda: recm.Permutation("b n f", axis="n", units="b n")],
    ids=["permutation-of-batch", "vector-axis-as-unit", "permutation-of-points"],
)
def test_acting_on_a_unit_axis_is_rejected(build: object) -> None:
    """l_theta averages over unit axes, so a representation acting on one would do nothing: ValueError."""
    with pytest.raises(ValueError, match="unit axis"):
        build()  # type: ignore[operator]


def test_product_group_acts_on_each_factor() -> None:
    """SO(3) x S_3: vectors see the rotation block, a set axis of size 3 the permutation block."""
    g = PRODUCT.sample(1, rng(3))
    R, P = g[0, :3, :3], g[0, 3:, 3:]
    x = torch.randn(2, 3, generator=rng(4), dtype=torch.float64)
    torch.testing.assert_close(recm.Vector("b xyz").act(PRODUCT, g, x)[0], x @ R.T)
    torch.testing.assert_close(recm.Permutation("b set", axis="set").act(PRODUCT, g, x)[0], x @ P.T)
    assert math.isclose(float(torch.linalg.det(R)), 1.0, rel_tol=1e-9)
