"""e3nn irreps inputs: a layer on ``8x0e+4x1o`` trains and is symmetrised by ``D_from_matrix``.

The optimizer's symmetrisation is checked where it happens: the stacked sample
behind h's newest term holds the captured input and, for every generator g of
C_G, that input acted on by ``Irreps.D_from_matrix(R_g)``. The same action is also
compared with a block matrix built by hand (scalars fixed, each ``1o`` rotated in
the basis of e3nn's l = 1 spherical harmonics, read off ``spherical_harmonics``:
y, z, x before e3nn 0.6, x, y, z since), so the test does not restate the implementation.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.optimizer import RECMOptimizer

o3 = pytest.importorskip("e3nn.o3")

IRREPS_IN, IRREPS_OUT = "8x0e+4x1o", "1x1o"
# float32 maths on O(1) features: a few ulps per matrix product.
TOL = 1e-5


@recm.relaxed(inputs=recm.Irreps(IRREPS_IN, pattern="b irreps"), terms={"weight": "un"})
class RelaxedIrrepsLinear(nn.Module):
    """An e3nn ``o3.Linear`` (equivariant) plus a dense map on the raw irreps features."""

    def __init__(self) -> None:
        super().__init__()
        self.eq = o3.Linear(IRREPS_IN, IRREPS_OUT)
        self.un = nn.Linear(o3.Irreps(IRREPS_IN).dim, o3.Irreps(IRREPS_OUT).dim)
        with torch.no_grad():
            self.un.weight.mul_(1e-2)

    def equivariant(self, z: Tensor) -> Tensor:
        return self.eq(z)

    def unconstrained(self, term: str, z: Tensor) -> Tensor:
        return self.un(z)


def _hand_built_D(R: Tensor) -> Tensor:
    """``D(R)`` of 8x0e+4x1o without D_from_matrix: identity on scalars, ``P R P^T`` on each vector.

    ``P`` maps an (x, y, z) vector to e3nn's l = 1 coordinates: the normalised
    spherical harmonics of the unit vectors are its columns.
    """
    P = o3.spherical_harmonics(1, torch.eye(3, dtype=R.dtype), normalize=True, normalization="norm").T
    return torch.block_diag(torch.eye(8, dtype=R.dtype), *[P @ R @ P.T] * 4)


def test_irreps_action_matches_D_from_matrix() -> None:  # noqa: N802 - e3nn's name
    """Irreps.act applies x @ D(g).T with D = Irreps.D_from_matrix, which is the hand-built block matrix."""
    group = recm.SO3Generators()
    rep = recm.Irreps(IRREPS_IN, pattern="b irreps")
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    moved = rep.act(group, group.generators(), x)
    for g, R in enumerate(group.generators()):
        D = o3.Irreps(IRREPS_IN).D_from_matrix(R.float())
        torch.testing.assert_close(D, _hand_built_D(R.float()), rtol=TOL, atol=TOL)
        torch.testing.assert_close(moved[g], x @ D.T, rtol=TOL, atol=TOL)


def test_layer_with_irreps_input_trains_and_is_symmetrised_by_D_from_matrix() -> None:
    """The tagged e3nn layer trains; its captured sample's copies are the input acted on by D_from_matrix."""
    torch.manual_seed(0)
    model = RelaxedIrrepsLinear()
    group = recm.SO3Generators()
    opt = RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, group=group,
                        target=recm.Irreps(IRREPS_OUT, pattern="b irreps"), a=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 20, generator=g)
        y = x[:, 8:11] + torch.tensor([0.5, 0.0, 0.0])  # the first vector plus a fixed offset: not equivariant
        (model(x) - y).pow(2).mean().backward()
        opt.step(target=y)
        opt.zero_grad()
    mod = model.recm_modulation
    assert int(mod.t) == 3 and torch.isfinite(mod.h).all() and mod.h.abs().max() > 0

    sample = mod.newest  # (1 + |C_G|, units, 20 input features + 3 target features)
    assert sample.shape == (1 + len(group.generators()), 16, 23)
    torch.testing.assert_close(sample[0], torch.cat([x, y], 1))
    D_out = o3.Irreps(IRREPS_OUT)
    for k, R in enumerate(group.generators()):
        D = o3.Irreps(IRREPS_IN).D_from_matrix(R.float())
        torch.testing.assert_close(sample[1 + k, :, :20], x @ D.T, rtol=TOL, atol=TOL)
        torch.testing.assert_close(sample[1 + k, :, 20:], y @ D_out.D_from_matrix(R.float()).T, rtol=TOL, atol=TOL)
