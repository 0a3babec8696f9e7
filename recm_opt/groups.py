"""Topological generating sets of the symmetry groups RECM symmetrises over.

Every group is described by a finite generating set ``C_G`` whose elements are
stored as matrices of the group's *natural* representation (3x3 rotations for
SO(3), 2x2 for the planar groups, n x n permutation matrices for S_n, block
diagonal matrices for products). ``C_G`` is all RECM needs: ``l_theta`` averages
``r_theta`` over ``C_G``, and its expected value vanishes exactly when the data
is invariant under the closed group that ``C_G`` generates.

Representations (:mod:`recm_opt.reps`) ask a group for the matrices it needs
through :meth:`Group.matrices`, by kind (``"vector"`` or ``"permutation"``) and
size, so one group can act on 3-vectors, planar vectors and permuted axes alike.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CyclicGenerators",
    "DihedralGenerators",
    "Group",
    "O3Generators",
    "PermutationGenerators",
    "ProductGenerators",
    "SO2Generators",
    "SO3Generators",
    "rotation_matrix",
]

Kind = Literal["vector", "permutation"]
_DTYPE = torch.float64


def rotation_matrix(axis: Tensor, angle: float | Tensor) -> Tensor:
    """Return the 3x3 rotation by ``angle`` (radians) about ``axis`` (Rodrigues).

    Args:
        axis: a non-zero 3-vector; it is normalised.
        angle: rotation angle in radians, right-handed about ``axis``.

    Returns:
        A float64 ``(3, 3)`` orthogonal matrix with determinant +1.

    Example:
        >>> R = rotation_matrix(torch.tensor([0.0, 0.0, 1.0]), math.pi / 2)
        >>> torch.allclose(R @ torch.tensor([1.0, 0, 0], dtype=R.dtype), torch.tensor([0.0, 1, 0], dtype=R.dtype))
        True
    """
    u = torch.as_tensor(axis, dtype=_DTYPE)
    u = u / u.norm()
    angle = torch.as_tensor(angle, dtype=_DTYPE)
    K = torch.zeros(3, 3, dtype=_DTYPE)
    K[0, 1], K[0, 2], K[1, 2] = -u[2], u[1], -u[0]
    K = K - K.T
    return torch.eye(3, dtype=_DTYPE) + torch.sin(angle) * K + (1 - torch.cos(angle)) * (K @ K)


def _planar_rotation(angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=_DTYPE)


def _embed_plane(m: Tensor) -> Tensor:
    """Lift 2x2 matrices to 3x3 ones acting on (x, y) and fixing z."""
    out = torch.zeros(*m.shape[:-2], 3, 3, dtype=m.dtype)
    out[..., :2, :2] = m
    out[..., 2, 2] = 1.0
    return out


def _haar_rotations(n: int, generator: torch.Generator) -> Tensor:
    """Haar-random rotations from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=_DTYPE)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


class Group:
    """A compact group given by a finite topological generating set.

    Subclasses set ``name``, ``dim`` (size of the natural representation) and
    ``finite``, and implement :meth:`generators`. The natural representation is
    faithful and orthogonal: ``rho(e) = I``, ``rho(gh) = rho(g) rho(h)`` and
    ``rho(g)^T rho(g) = I`` for every element.
    """

    name: str = "group"
    dim: int = 0
    finite: bool = False

    def generators(self) -> Tensor:
        """Return ``C_G`` as a float64 tensor of shape ``(k, dim, dim)``."""
        raise NotImplementedError

    def identity(self) -> Tensor:
        """Return the identity element as a ``(dim, dim)`` matrix."""
        return torch.eye(self.dim, dtype=_DTYPE)

    def matrices(self, elements: Tensor, kind: Kind, size: int) -> Tensor:
        """Return the matrices of ``elements`` in a representation of ``kind`` and ``size``.

        Args:
            elements: ``(k, dim, dim)`` elements in the natural representation.
            kind: ``"vector"`` (orthogonal action on an axis of ``size`` 2 or 3) or
                ``"permutation"`` (permutation matrices of an axis of ``size``).
            size: the size of the axis being acted on.

        Returns:
            A ``(k, size, size)`` float64 tensor.

        Raises:
            ValueError: if this group has no representation of that kind and size.
        """
        if kind == "vector" and size == self.dim and self.dim in (2, 3):
            return elements
        if kind == "vector" and size == 3 and self.dim == 2:
            return _embed_plane(elements)
        raise ValueError(f"{self.name} has no {kind} representation of size {size}")

    def supports(self, kind: Kind, size: int) -> bool:
        """Return whether :meth:`matrices` accepts ``kind`` and ``size``."""
        try:
            self.matrices(self.identity()[None], kind, size)
        except ValueError:
            return False
        return True

    def elements(self, max_order: int = 100_000) -> Tensor:
        """Return every element of a finite group, found by closure under ``C_G``.

        Args:
            max_order: stop with an error if the closure grows beyond this.

        Returns:
            A ``(order, dim, dim)`` tensor whose first element is the identity.

        Raises:
            ValueError: for infinite groups, or past ``max_order``.
        """
        if not self.finite:
            raise ValueError(f"{self.name} is infinite: it has no finite list of elements")
        gens = self.generators()
        found = {_key(self.identity()): self.identity()}
        frontier = [self.identity()]
        while frontier:
            new = []
            for g in frontier:
                for s in gens:
                    h = s @ g
                    k = _key(h)
                    if k not in found:
                        found[k] = h
                        new.append(h)
            if len(found) > max_order:
                raise ValueError(
                    f"{self.name}: closure exceeds max_order={max_order}; use order() for its size and "
                    f"sample(n, generator) for uniform elements instead of listing them all"
                )
            frontier = new
        return torch.stack(list(found.values()))

    def order(self) -> int:
        """Return the number of elements of a finite group.

        The base class counts the closure of ``C_G`` (see :meth:`elements`); the
        built-in finite groups answer without listing their elements, so this is
        instant for ``PermutationGenerators(12)`` as well.

        Raises:
            ValueError: for infinite groups, or when the closure exceeds :meth:`elements`' cap.

        Example:
            >>> DihedralGenerators(5).order()
            10
        """
        return len(self.elements())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` elements from the group's Haar (uniform) measure.

        The base class draws uniformly from :meth:`elements`; the built-in groups
        sample directly, without listing their elements.
        """
        elems = self.elements()
        idx = torch.randint(len(elems), (n,), generator=generator)
        return elems[idx]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _key(m: Tensor) -> tuple[int, ...]:
    # Rounded entries identify an element of a finite matrix group exactly:
    # distinct elements differ by far more than float64 rounding error.
    return tuple(torch.round(m * 1e6).to(torch.int64).flatten().tolist())


class SO3Generators(Group):
    """Two rotations that generate a dense subgroup of SO(3), so their closure is SO(3).

    The default pair rotates by 3/2 rad about x and about z. Two rotations about
    distinct axes by an angle that is not a rational multiple of pi generate a
    dense subgroup; a function invariant under both is invariant under all of
    SO(3) by continuity. :meth:`algebraic` gives the pair with rational entries
    (rotations by arccos(3/5) about x and z), which generate a free group.

    Args:
        angle: rotation angle in radians.
        axes: the two rotation axes (3-vectors); they must not be parallel.

    Example:
        >>> SO3Generators().generators().shape
        torch.Size([2, 3, 3])
    """

    name = "SO(3)"
    dim = 3

    def __init__(self, angle: float = 1.5, axes: tuple[tuple[float, ...], ...] = ((1, 0, 0), (0, 0, 1))) -> None:
        axes_t = torch.tensor(axes, dtype=_DTYPE)
        if axes_t.shape != (2, 3):
            raise ValueError(f"axes must be two 3-vectors, got shape {tuple(axes_t.shape)}")
        if torch.linalg.cross(axes_t[0], axes_t[1]).norm() < 1e-9:
            raise ValueError(f"axes must not be parallel, got {axes}")
        self.angle = float(angle)
        self.axes = axes_t / axes_t.norm(dim=1, keepdim=True)

    @classmethod
    def algebraic(cls) -> SO3Generators:
        """Rotations by arccos(3/5) about x and z: rational matrices, a free generating pair."""
        return cls(angle=math.acos(3 / 5))

    def generators(self) -> Tensor:  # noqa: D102
        return torch.stack([rotation_matrix(a, self.angle) for a in self.axes])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` Haar-random rotations."""
        return _haar_rotations(n, generator)

    def __repr__(self) -> str:
        return f"SO3Generators(angle={self.angle})"


class O3Generators(SO3Generators):
    """SO(3)'s generating pair plus the inversion ``-I``: a generating set of O(3).

    Example:
        >>> O3Generators().generators().shape
        torch.Size([3, 3, 3])
    """

    name = "O(3)"

    def generators(self) -> Tensor:  # noqa: D102
        return torch.cat([super().generators(), -torch.eye(3, dtype=_DTYPE)[None]])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` Haar-random elements of O(3)."""
        signs = torch.randint(2, (n,), generator=generator).to(_DTYPE) * 2 - 1
        return _haar_rotations(n, generator) * signs[:, None, None]

    def __repr__(self) -> str:
        return f"O3Generators(angle={self.angle})"


class SO2Generators(Group):
    """One planar rotation by ``angle`` rad, which generates a dense subgroup of SO(2).

    The angle must not be a rational multiple of pi (the default 3/2 rad is not),
    so the closure of its powers is the whole circle. Acts on 2-vectors, and on
    3-vectors as rotations about z.

    Example:
        >>> SO2Generators().generators().shape
        torch.Size([1, 2, 2])
    """

    name = "SO(2)"
    dim = 2

    def __init__(self, angle: float = 1.5) -> None:
        self.angle = float(angle)

    def generators(self) -> Tensor:  # noqa: D102
        return _planar_rotation(self.angle)[None]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` uniformly random planar rotations."""
        theta = torch.rand(n, generator=generator, dtype=_DTYPE) * 2 * math.pi
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    def __repr__(self) -> str:
        return f"SO2Generators(angle={self.angle})"


def _check_n(n: int, low: int) -> None:
    if not isinstance(n, int) or n < low:
        raise ValueError(f"n must be an int >= {low}, got {n!r}")


class CyclicGenerators(Group):
    """The rotation by 2 pi / n, which generates the cyclic group C_n (order n).

    Acts on 2-vectors, on 3-vectors about z, and as the cyclic shift of an axis
    of size n (``x'[i] = x[i - k]`` for the rotation by ``k`` steps).

    Args:
        n: the order, ``n >= 1``.

    Example:
        >>> CyclicGenerators(6).order()
        6
    """

    name = "C_n"
    dim = 2
    finite = True

    def __init__(self, n: int) -> None:
        _check_n(n, 1)
        self.n = n
        self.name = f"C_{n}"

    def generators(self) -> Tensor:  # noqa: D102
        return _planar_rotation(2 * math.pi / self.n)[None]

    def matrices(self, elements: Tensor, kind: Kind, size: int) -> Tensor:  # noqa: D102
        if kind == "permutation" and size == self.n:
            return _polygon_permutations(elements, self.n)
        return super().matrices(elements, kind, size)

    def order(self) -> int:  # noqa: D102
        return self.n

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` uniformly random rotations by multiples of 2 pi / n."""
        theta = torch.randint(self.n, (n,), generator=generator).to(_DTYPE) * (2 * math.pi / self.n)
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n})"


class DihedralGenerators(CyclicGenerators):
    """The rotation by 2 pi / n and the reflection ``diag(1, -1)``: generators of D_n (order 2n).

    They satisfy ``r**n = e``, ``s**2 = e`` and ``s r s = r^-1``. Acts on 2-vectors,
    on 3-vectors (in the xy-plane) and on an axis of size n as the symmetries of
    the regular n-gon's vertices.

    Example:
        >>> DihedralGenerators(4).order()
        8
    """

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.name = f"D_{n}"

    def generators(self) -> Tensor:  # noqa: D102
        s = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=_DTYPE)
        return torch.stack([_planar_rotation(2 * math.pi / self.n), s])

    def order(self) -> int:  # noqa: D102
        return 2 * self.n

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` uniformly random elements ``r^k s^j`` (k < n, j < 2)."""
        rotations = super().sample(n, generator)
        flips = torch.randint(2, (n,), generator=generator).to(_DTYPE) * 2 - 1
        return rotations * torch.stack([torch.ones_like(flips), flips], -1)[:, None, :]


def _polygon_permutations(elements: Tensor, n: int) -> Tensor:
    """Permutation matrices ``P[j, i] = 1`` where the element maps n-gon vertex i to vertex j."""
    angles = 2 * math.pi * torch.arange(n, dtype=_DTYPE) / n
    vertices = torch.stack([torch.cos(angles), torch.sin(angles)], -1)  # (n, 2)
    moved = torch.einsum("kab,ib->kia", elements, vertices)
    image = torch.round(torch.atan2(moved[..., 1], moved[..., 0]) / (2 * math.pi / n)).to(torch.int64) % n
    P = torch.zeros(len(elements), n, n, dtype=_DTYPE)
    P.scatter_(1, image[:, None, :], 1.0)
    return P


class PermutationGenerators(Group):
    """The transposition (0 1) and the n-cycle (0 1 ... n-1): generators of S_n (order n!).

    Elements are ``n x n`` permutation matrices ``P`` with ``P[pi(i), i] = 1``, acting on
    an axis of size n.

    Example:
        >>> PermutationGenerators(4).order()
        24
    """

    name = "S_n"
    finite = True

    def __init__(self, n: int) -> None:
        _check_n(n, 1)
        self.n = self.dim = n
        self.name = f"S_{n}"

    def generators(self) -> Tensor:  # noqa: D102
        swap = torch.eye(self.n, dtype=_DTYPE)[[1, 0, *range(2, self.n)]] if self.n > 1 else torch.eye(1, dtype=_DTYPE)
        cycle = torch.eye(self.n, dtype=_DTYPE).roll(1, dims=0)
        return torch.stack([swap, cycle])

    def matrices(self, elements: Tensor, kind: Kind, size: int) -> Tensor:  # noqa: D102
        if kind == "permutation" and size == self.n:
            return elements
        raise ValueError(f"{self.name} has no {kind} representation of size {size}")

    def order(self) -> int:
        """Return the order of the group ``C_G`` generates, by Schreier-Sims (sympy), without listing it.

        Example:
            >>> PermutationGenerators(9).order()
            362880
        """
        from sympy.combinatorics import Permutation, PermutationGroup  # a dependency of torch

        images = self.generators().argmax(1).tolist()  # column i holds its 1 in row pi(i)
        return int(PermutationGroup([Permutation(p) for p in images]).order())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` uniformly random permutation matrices (``P[pi(i), i] = 1``)."""
        eye = torch.eye(self.n, dtype=_DTYPE)
        perms = [torch.randperm(self.n, generator=generator) for _ in range(n)]
        return torch.stack([eye[:, p] for p in perms]) if n else eye[None][:0]

    def __repr__(self) -> str:
        return f"PermutationGenerators({self.n})"


class ProductGenerators(Group):
    """The direct product of groups; ``C_G`` is each factor's generators paired with identities.

    Elements are block-diagonal matrices. A representation uses the one factor
    that supports its kind and size (the others act trivially); two candidate
    factors are ambiguous and raise.

    Example:
        >>> g = ProductGenerators(SO3Generators(), PermutationGenerators(3))
        >>> g.generators().shape
        torch.Size([4, 6, 6])
    """

    def __init__(self, *factors: Group) -> None:
        if len(factors) < 2 or not all(isinstance(f, Group) for f in factors):
            raise TypeError(f"ProductGenerators needs >= 2 Group factors, got {factors!r}")
        self.factors = factors
        self.dim = sum(f.dim for f in factors)
        self.finite = all(f.finite for f in factors)
        self.name = " x ".join(f.name for f in factors)
        self._offsets = [sum(f.dim for f in factors[:i]) for i in range(len(factors))]

    def _block(self, parts: list[Tensor]) -> Tensor:
        return torch.stack([torch.block_diag(*p) for p in zip(*parts)])

    def generators(self) -> Tensor:  # noqa: D102
        gens = []
        for i, f in enumerate(self.factors):
            for g in f.generators():
                gens.append(torch.block_diag(*[g if j == i else h.identity() for j, h in enumerate(self.factors)]))
        return torch.stack(gens)

    def matrices(self, elements: Tensor, kind: Kind, size: int) -> Tensor:  # noqa: D102
        hits = [i for i, f in enumerate(self.factors) if f.supports(kind, size)]
        if len(hits) != 1:
            what = "no factor" if not hits else "several factors"
            raise ValueError(f"{self.name}: {what} with a {kind} representation of size {size}")
        i, o = hits[0], self._offsets[hits[0]]
        d = self.factors[i].dim
        return self.factors[i].matrices(elements[:, o : o + d, o : o + d], kind, size)

    def order(self) -> int:
        """Return the product of the factors' orders.

        Example:
            >>> ProductGenerators(CyclicGenerators(3), PermutationGenerators(3)).order()
            18
        """
        if not self.finite:
            raise ValueError(f"{self.name} is infinite: it has no finite order")
        return math.prod(f.order() for f in self.factors)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:  # noqa: D102
        return self._block([f.sample(n, generator) for f in self.factors])

    def __repr__(self) -> str:
        return f"ProductGenerators({', '.join(map(repr, self.factors))})"
