"""Hypothesis strategies for recm_opt's property tests: groups, elements, seeds, tensors, layer data.

Randomness always comes from a drawn seed and a ``torch.Generator``, so Hypothesis
can shrink and replay every example. :func:`probe_layer` and :func:`capture` drive
the real ``RECMOptimizer`` on one batch, so the laws are checked on the sample the
library itself stacks.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

import recm_opt as recm
from recm_opt.groups import Group


class OctahedralGenerators(recm.SO3Generators):
    """Quarter turns about x and z: they generate the rotation group of the cube (order 24).

    A user-level finite subgroup of SO(3) acting on 3-vectors, built on the public
    ``SO3Generators`` (closure by :meth:`Group.elements`).
    """

    name = "O"
    finite = True

    def __init__(self) -> None:
        super().__init__(angle=math.pi / 2)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:  # noqa: D102
        return Group.sample(self, n, generator)

    def __repr__(self) -> str:
        return "OctahedralGenerators()"


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator().manual_seed``."""
    return st.integers(0, 2**32 - 1)


def rng(seed: int) -> torch.Generator:
    """A private generator for one drawn seed."""
    return torch.Generator().manual_seed(seed)


@cache
def elements_of(group: Group) -> Tensor:
    """All elements of a finite group (closure is cached: groups are reused across examples)."""
    return group.elements()


@cache
def _finite(kind: str, n: int) -> Group:
    return {"C": recm.CyclicGenerators, "D": recm.DihedralGenerators, "S": recm.PermutationGenerators}[kind](n)


@st.composite
def finite_groups(draw: st.DrawFn, vectors: bool | None = None) -> Group:
    """C_n, D_n (act on 2- and 3-vectors and on an n-axis), S_n and the octahedral group.

    Args:
        vectors: True for groups acting on 3-vectors only, False for permutation groups
            only, None for any.
    """
    options = []
    if vectors is not False:
        options += [("C", n) for n in range(1, 9)] + [("D", n) for n in range(1, 7)] + [("O", 0)]
    if vectors is not True:
        options += [("S", n) for n in range(2, 5)]
    kind, n = draw(st.sampled_from(options))
    return _octahedral() if kind == "O" else _finite(kind, n)


@cache
def _octahedral() -> Group:
    return OctahedralGenerators()


@st.composite
def groups(draw: st.DrawFn) -> Group:
    """Any group the library offers: finite ones, SO(2), SO(3), O(3) and a product."""
    infinite = [recm.SO2Generators(), recm.SO3Generators(), recm.O3Generators(),
                recm.ProductGenerators(recm.SO3Generators(), recm.PermutationGenerators(3))]
    return draw(st.one_of(finite_groups(), st.sampled_from(infinite)))


@st.composite
def elements(draw: st.DrawFn, group: Group, n: int = 1) -> Tensor:
    """``n`` elements of ``group``: indices into the element list (finite) or Haar samples."""
    if group.finite:
        elems = elements_of(group)
        idx = draw(st.lists(st.integers(0, len(elems) - 1), min_size=n, max_size=n))
        return elems[idx]
    return group.sample(n, rng(draw(seeds())))


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
            scale: float = 1.0) -> Tensor:
    """A Gaussian tensor of ``shape`` from a drawn seed."""
    return scale * torch.randn(shape, generator=rng(draw(seeds())), dtype=dtype)


@st.composite
def layer_data(draw: st.DrawFn, group: Group, units: int, dtype: torch.dtype = torch.float64
               ) -> tuple[Tensor, Tensor, recm.Representation, recm.Representation]:
    """A random batch ``(z, y)`` of ``units`` units and representations the group acts by.

    S_n permutes a set axis of z and y; the other finite groups rotate 3-vectors
    (``(B, C, 3)`` inputs with an invariant or a vector target).
    """
    g = rng(draw(seeds()))
    if isinstance(group, recm.PermutationGenerators):
        zrep = recm.Permutation("b set f", axis="set", set=group.n, f=2)
        yrep = recm.Permutation("b set", axis="set", set=group.n)
        z, y = torch.randn(units, group.n, 2, generator=g), torch.randn(units, group.n, generator=g)
    elif draw(st.booleans()):
        zrep, yrep = recm.Vector("b c xyz", c=2), recm.Invariant("b")
        z, y = torch.randn(units, 2, 3, generator=g), torch.randn(units, generator=g)
    else:
        zrep, yrep = recm.Vector("b xyz"), recm.Vector("b xyz")
        z, y = torch.randn(units, 3, generator=g), torch.randn(units, 3, generator=g)
    return z.to(dtype), y.to(dtype), zrep, yrep


def orbit_closure(group: Group, rep: recm.Representation, x: Tensor, elements: Tensor | None = None) -> Tensor:
    """Every image of every unit of ``x`` under ``elements`` (default: the whole group), units first."""
    elems = elements_of(group) if elements is None else elements
    return rep.act(group, elems, x.double()).flatten(0, 1).to(x.dtype)


def probe_layer(rep: recm.Representation) -> nn.Module:
    """A one-input ``@relaxed`` layer: ``f_eq(z) = s z`` and one term ``w z`` (both commute with any action)."""

    @recm.relaxed(inputs=rep, terms={"weight": "w"})
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.w = nn.Parameter(torch.zeros(()))

        def equivariant(self, z: Tensor) -> Tensor:
            return self.scale * z

        def unconstrained(self, term: str, z: Tensor) -> Tensor:
            return self.w * z

    return Probe()


def capture(group: Group, zrep: recm.Representation, yrep: recm.Representation, z: Tensor, y: Tensor,
            steps: int = 1, scale: tuple[float, float] = (1.0, 1.0), **kwargs: object
            ) -> tuple[nn.Module, recm.RECMOptimizer]:
    """Run ``steps`` optimizer steps (learning rates 0) on the one batch ``(z, y)``.

    ``scale`` multiplies r_theta's two layers to vary B. The
    layer's ``recm_modulation.newest`` is then exactly the batch and its generator
    copies, and ``h`` the closed form of ``l_theta`` of that batch.
    """
    model = probe_layer(zrep).to(z.dtype)
    kwargs.setdefault("max_units", len(z))
    opt = recm.RECMOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, group, target=yrep,
                             lr=0.0, example=z[:1], **kwargs)  # type: ignore[arg-type]
    mod = model.recm_modulation
    with torch.no_grad():
        for layer, s in zip((mod.r_theta[0], mod.r_theta[2]), scale):
            layer.weight.mul_(s)
            layer.bias.mul_(s)
    for _ in range(steps):
        model(z).sum().backward()
        opt.step(target=y)
        opt.zero_grad()
    return model, opt
