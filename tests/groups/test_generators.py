"""The generating sets close to the right groups, and SO(3)/SO(2) words equidistribute."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import OctahedralGenerators, rng
from torch import Tensor

import recm_opt as recm
from recm_opt.groups import Group

EYE2 = torch.eye(2, dtype=torch.float64)


@pytest.mark.parametrize(
    ("group", "order"),
    [(recm.CyclicGenerators(n), n) for n in (1, 2, 3, 5, 8, 12)]
    + [(recm.DihedralGenerators(n), 2 * n) for n in (1, 2, 3, 4, 7)]
    + [(recm.PermutationGenerators(n), math.factorial(n)) for n in (1, 2, 3, 4, 5)]
    + [(OctahedralGenerators(), 24)]
    + [(recm.ProductGenerators(recm.CyclicGenerators(3), recm.PermutationGenerators(3)), 18)],
    ids=repr,
)
def test_finite_groups_close_to_the_right_order(group: Group, order: int) -> None:
    """C_n has n elements, D_n 2n, S_n n!, the cube's rotations 24, a product the product of orders."""
    assert group.order() == order


@given(n=st.integers(1, 16))
def test_dihedral_generators_satisfy_relations(n: int) -> None:
    """r^n = e, s^2 = e and s r s = r^-1 (and r^k != e for 0 < k < n)."""
    r, s = recm.DihedralGenerators(n).generators()
    torch.testing.assert_close(torch.linalg.matrix_power(r, n), EYE2, atol=1e-12, rtol=0)
    torch.testing.assert_close(s @ s, EYE2, atol=1e-12, rtol=0)
    torch.testing.assert_close(s @ r @ s, r.T, atol=1e-12, rtol=0)  # r^-1 = r^T: r is orthogonal
    for k in range(1, n):
        assert float((torch.linalg.matrix_power(r, k) - EYE2).abs().max()) > 1e-6


@given(n=st.integers(2, 9))
def test_permutation_generators_satisfy_relations(n: int) -> None:
    """The transposition squares to e and the n-cycle has order exactly n."""
    swap, cycle = recm.PermutationGenerators(n).generators()
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(swap @ swap, eye)
    torch.testing.assert_close(torch.linalg.matrix_power(cycle, n), eye)
    assert all(not torch.equal(torch.linalg.matrix_power(cycle, k), eye) for k in range(1, n))


def _rotation_axis(R: Tensor) -> Tensor:
    """Unit axis of rotations R (..., 3, 3), up to sign, from R + R^T - (tr R - 1) I = 2 (1 - cos t) u u^T."""
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    M = R + R.transpose(-1, -2) - (tr - 1)[..., None, None] * torch.eye(3, dtype=R.dtype)
    col = M.diagonal(dim1=-2, dim2=-1).argmax(-1)  # the largest diagonal entry is far from 0
    u = torch.take_along_dim(M, col[..., None, None].expand(*col.shape, 3, 1), -1)[..., 0]
    return u / u.norm(dim=-1, keepdim=True)


def _no_power_is_identity(R: Tensor, up_to: int) -> bool:
    P = torch.eye(len(R), dtype=R.dtype)
    for _ in range(up_to):
        P = R @ P
        if float((P - torch.eye(len(R), dtype=R.dtype)).abs().max()) < 1e-6:
            return False
    return True


@pytest.mark.parametrize("group", [recm.SO3Generators(), recm.SO3Generators.algebraic(), recm.O3Generators()],
                         ids=repr)
def test_so3_generators_have_distinct_axes_and_irrational_angle(group: recm.SO3Generators) -> None:
    """Two proper rotations about non-parallel axes, neither of finite order (checked up to q = 2000).

    An angle that is a rational multiple p/q of pi gives R^(2q) = I, so no power up to 2000 being I
    rules out every q <= 1000.
    """
    rotations = [R for R in group.generators() if float(torch.linalg.det(R)) > 0]
    assert len(rotations) == 2
    axes = [_rotation_axis(R) for R in rotations]
    assert float(torch.linalg.cross(axes[0], axes[1]).norm()) > 0.1
    for R in rotations:
        torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=R.dtype))
        assert _no_power_is_identity(R, 2000)


def test_so2_generator_angle_is_not_a_rational_multiple_of_pi() -> None:
    """SO(2)'s single rotation has no power equal to the identity (up to 2000)."""
    (R,) = recm.SO2Generators().generators()
    assert _no_power_is_identity(R, 2000)


def _random_words(gens: Tensor, n: int, length: int, seed: int) -> Tensor:
    idx = torch.randint(len(gens), (n, length), generator=rng(seed))
    W = torch.eye(gens.shape[-1], dtype=gens.dtype).expand(n, -1, -1)
    for k in range(length):
        W = gens[idx[:, k]] @ W
    return W


def test_so3_random_words_have_mean_trace_zero() -> None:
    """Haar: E[tr R] = 0 and E[tr(R)^2] = 1 (characters); long random words match within a CLT bound.

    Under Haar tr R has variance 1, so the mean of N = 4000 traces is within 4.5 / sqrt(N).
    """
    n = 4000
    W = _random_words(recm.SO3Generators().generators(), n, 60, seed=0)
    tr = W.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(float(tr.mean())) < 4.5 / math.sqrt(n)
    # tr^2 has Haar variance E[tr^4] - 1 = 2 (number of irreps in V x V x V x V minus one), sd sqrt(2).
    assert abs(float((tr**2).mean()) - 1) < 4.5 * math.sqrt(2 / n)


def test_so3_random_word_axes_pass_chi_square() -> None:
    """Axes of Haar rotations are uniform lines: |u_z| ~ U(0, 1) and the azimuth ~ U(0, 2 pi); chi-square p > 1e-3.

    The axis law mixes more slowly than the trace: at word length 60 this test rejects
    (p ~ 1e-6 at seeds 1 and 2), from length 120 on it passes; 240 leaves a margin.
    """
    from scipy.stats import chisquare

    W = _random_words(recm.SO3Generators().generators(), 4000, 240, seed=1)
    u = _rotation_axis(W)
    u = torch.where(u[:, 2:] < 0, -u, u)  # a line: pick the upper-hemisphere direction
    z_bin = torch.clamp((u[:, 2] * 4).long(), max=3)
    phi_bin = torch.clamp(((torch.atan2(u[:, 1], u[:, 0]) + math.pi) / (2 * math.pi) * 4).long(), max=3)
    counts = torch.bincount(z_bin * 4 + phi_bin, minlength=16).numpy()
    assert chisquare(counts).pvalue > 1e-3


def test_so3_haar_sampler_axes_pass_chi_square() -> None:
    """The library's Haar sampler passes the same chi-square test (a check on the test's power too)."""
    from scipy.stats import chisquare

    u = _rotation_axis(recm.SO3Generators().sample(4000, rng(2)))
    u = torch.where(u[:, 2:] < 0, -u, u)
    counts = torch.bincount(torch.clamp((u[:, 2] * 4).long(), max=3) * 4
                            + torch.clamp(((torch.atan2(u[:, 1], u[:, 0]) + math.pi) / (2 * math.pi) * 4).long(),
                                          max=3), minlength=16).numpy()
    assert chisquare(counts).pvalue > 1e-3
    short = _rotation_axis(_random_words(recm.SO3Generators().generators(), 4000, 2, seed=1))
    short = torch.where(short[:, 2:] < 0, -short, short)
    biased = torch.bincount(torch.clamp((short[:, 2] * 4).long(), max=3), minlength=4).numpy()
    assert chisquare(biased).pvalue < 1e-6  # words of length 2 are far from Haar: the test can tell


def test_so2_powers_equidistribute() -> None:
    """Weyl: the mean trace of R^k, k = 1..N, tends to 0 (it is O(1/N) for an irrational angle)."""
    (R,) = recm.SO2Generators().generators()
    n, P, total = 2000, torch.eye(2, dtype=torch.float64), 0.0
    for _ in range(n):
        P = R @ P
        total += float(P.trace())
    # |sum_k 2 cos(k t)| <= 2 / |sin(t / 2)|, so the mean is at most that over N.
    assert abs(total / n) <= 2 / abs(math.sin(recm.SO2Generators().angle / 2)) / n
