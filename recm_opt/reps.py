"""How a group element acts on a tensor: the representations of a layer's inputs and targets.

Convention (used everywhere in recm_opt): a representation acts on one declared
axis of a tensor by ``x' = x @ D(g).T`` on that axis, i.e. ``x'_i = sum_j D_ij x_j``,
where ``D(g)`` is an orthogonal matrix. Every other feature axis is left alone.

Each representation is declared with an einops-style axis pattern, e.g.
``Vector("b c xyz n", units="b n")`` for Vector-Neuron features ``(B, C, 3, N)``
with one *unit* per point. Unit axes index the samples that ``l_theta`` averages
over; the remaining axes are the unit's features. Composite
axes such as ``"b (c xyz)"`` declare packed vectors, and ``...`` stands for any
number of feature axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import EinopsError, rearrange
from einops.parsing import ParsedExpression
from torch import Tensor

from .groups import Group, Kind

__all__ = ["Custom", "Invariant", "Irreps", "Permutation", "Representation", "Vector"]


def _axes(pattern: str) -> list[str]:
    """Return the atomic axis names of ``pattern`` in order (``...`` kept as is)."""
    return pattern.replace("(", " ").replace(")", " ").split()


class Representation:
    """Base class: an axis pattern, its unit axes, and an orthogonal action on features.

    Args:
        pattern: einops-style pattern naming every axis of the tensor.
        units: space-separated unit axes; defaults to the pattern's first axis.
    """

    axis: str | None = None
    kind: Kind | None = None

    def __init__(self, pattern: str, units: str | None = None, **sizes: int) -> None:
        try:  # a malformed pattern fails here, at declaration, with einops' own message
            ParsedExpression(pattern)
        except EinopsError as err:
            raise ValueError(f"pattern {pattern!r} is not a valid einops pattern: {err}") from err
        names = _axes(pattern)
        if not names or names[0] == "...":
            raise ValueError(f"pattern must start with a named unit axis, got {pattern!r}")
        self.pattern = pattern
        self.units = tuple((units or names[0]).split())
        self.sizes = sizes
        missing = [u for u in self.units if u not in names]
        if missing:
            raise ValueError(f"unit axes {missing} are not in pattern {pattern!r}")
        if self.axis is not None and self.axis not in names:
            raise ValueError(f"axis {self.axis!r} is not in pattern {pattern!r}")
        if self.axis in self.units:
            raise ValueError(
                f"axis {self.axis!r} is a unit axis of {pattern!r}: l_theta averages over units, "
                "so acting on them has no effect; act on a feature axis instead"
            )
        for name, n in sizes.items():
            if name not in names:
                raise ValueError(f"size {name}={n!r} names no axis of pattern {pattern!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"size {name} must be an int >= 1, got {n!r}")
        features = [n for n in names if n not in self.units]
        self._target = f"{' '.join(self.units)} {' '.join(features)}"

    def feature_width(self) -> int | None:
        """Return the number of features per unit, or ``None`` when an axis size is undeclared.

        This is the width each captured unit contributes to ``r_theta``'s input. Sizes
        come from the declaration (``Vector("b c xyz", c=4)``: 12); ``...`` and axes
        without a declared size make it unknown.

        Example:
            >>> Vector("b c xyz", c=4).feature_width(), Invariant("b").feature_width(), Invariant("b f").feature_width()
            (12, 1, None)
        """
        width = 1
        for name in _axes(self.pattern):
            if name in self.units:
                continue
            size = self._known_size(name)
            if size is None:
                return None
            width *= size
        return width

    def _known_size(self, name: str) -> int | None:
        return None if name == "..." else self.sizes.get(name)

    def unit_view(self, x: Tensor, where: str = "input") -> tuple[Tensor, dict[str, int]]:
        """Rearrange ``x`` to ``(*units, *features)`` (a view where possible) and return unit sizes.

        Args:
            x: the tensor this representation describes.
            where: context for error messages, e.g. ``"layer 'enc.0', input 'z'"``.

        Raises:
            ValueError: if ``x`` does not match the pattern or a declared axis size.
        """
        try:
            y = rearrange(x, f"{self.pattern} -> {self._target}", **self.sizes)
        except Exception as err:  # einops raises its own error type
            raise ValueError(
                f"{where}: expected a tensor matching {self.pattern!r}{self._size_note()}, "
                f"got shape {tuple(x.shape)}"
            ) from err
        self._check_axis(y, x, where)
        return y, dict(zip(self.units, y.shape[: len(self.units)]))

    def _size_note(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.sizes.items())

    def _check_axis(self, y: Tensor, x: Tensor, where: str) -> None:
        """Hook for subclasses to validate the acted-on axis size."""

    def check_action(self, group: Group, elements: Tensor, x: Tensor, where: str) -> None:
        """Check, once, that this representation can act on per-unit features ``x`` (a no-op here)."""

    def _axis_dim(self) -> int:
        """Position of the acted-on axis among the per-unit feature axes (negative index)."""
        names = [n for n in _axes(self.pattern) if n not in self.units]
        assert self.axis is not None
        return names.index(self.axis) - len(names)

    def matrices(self, group: Group, elements: Tensor, size: int) -> Tensor:
        """Return ``D(g)`` for each of ``elements`` (natural matrices of ``group``)."""
        assert self.kind is not None
        return group.matrices(elements, self.kind, size)

    def act(self, group: Group, elements: Tensor, x: Tensor) -> Tensor:
        """Apply every element to per-unit features ``x`` of shape ``(S, *features)``.

        Returns:
            A ``(k, S, *features)`` tensor: ``x' = x @ D(g).T`` on the declared axis.
        """
        d = self._axis_dim()
        D = self.matrices(group, elements, x.shape[d]).to(dtype=x.dtype, device=x.device)
        xm = x.movedim(d, -1)
        out = torch.einsum("kij,...j->k...i", D, xm)
        return out.movedim(-1, d)

    def __repr__(self) -> str:
        units = " ".join(self.units)
        return f"{type(self).__name__}({self.pattern!r}, units={units!r})"


class Invariant(Representation):
    """The trivial representation: ``g`` leaves the tensor unchanged (class labels, scalars).

    Example:
        >>> Invariant("b").unit_view(torch.zeros(5))[1]
        {'b': 5}
    """

    def __init__(self, pattern: str = "b ...", units: str | None = None, **sizes: int) -> None:
        super().__init__(pattern, units, **sizes)

    def matrices(self, group: Group, elements: Tensor, size: int = 1) -> Tensor:  # noqa: D102
        return torch.eye(size, dtype=torch.float64).expand(len(elements), size, size)

    def act(self, group: Group, elements: Tensor, x: Tensor) -> Tensor:  # noqa: D102
        return x.expand(len(elements), *x.shape)


class Vector(Representation):
    """Vectors on a named axis (default ``xyz``), rotated by the group's orthogonal matrices.

    Args:
        pattern: e.g. ``"b c xyz n"`` (Vector Neurons), ``"n xyz"`` (graph nodes),
            ``"b (c xyz)"`` (packed vectors).
        units: unit axes, e.g. ``"b n"`` for one unit per point.
        axis: the name of the vector axis in ``pattern``.
        size: the vector dimension, 3 or 2.

    Example:
        >>> from recm_opt.groups import SO3Generators
        >>> rep = Vector("b xyz")
        >>> z, _ = rep.unit_view(torch.randn(4, 3))
        >>> rep.act(SO3Generators(), SO3Generators().generators(), z).shape
        torch.Size([2, 4, 3])
    """

    kind: Kind = "vector"

    def __init__(self, pattern: str = "b ... xyz", units: str | None = None, axis: str = "xyz", size: int = 3,
                 **sizes: int) -> None:
        if size not in (2, 3):
            raise ValueError(f"size must be 2 or 3, got {size}")
        self.axis, self.size = axis, size
        # Passing the size lets einops split packed axes such as "b (c xyz)" and check bare ones.
        super().__init__(pattern, units, **{axis: size}, **sizes)

    def _check_axis(self, y: Tensor, x: Tensor, where: str) -> None:
        if y.shape[self._axis_dim()] != self.size:
            raise ValueError(
                f"{where}: axis {self.axis!r} of {self.pattern!r} must have size {self.size}, "
                f"got shape {tuple(x.shape)}"
            )

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.sizes.items() if k != self.axis)
        return f"Vector({self.pattern!r}, units={' '.join(self.units)!r}, axis={self.axis!r}, size={self.size}{extra})"


class Permutation(Representation):
    """A feature axis permuted by the group: ``x'[..., pi(i)] = x[..., i]``.

    Args:
        pattern: e.g. ``"b set f"``.
        axis: the permuted axis; it must not be a unit axis.
        units: unit axes.

    Example:
        >>> from recm_opt.groups import PermutationGenerators
        >>> rep = Permutation("b set", axis="set")
        >>> x = torch.arange(3.0)[None]
        >>> rep.act(PermutationGenerators(3), PermutationGenerators(3).generators(), x)[0]
        tensor([[1., 0., 2.]])
    """

    kind: Kind = "permutation"

    def __init__(self, pattern: str, axis: str, units: str | None = None, **sizes: int) -> None:
        self.axis = axis
        super().__init__(pattern, units, **sizes)


class Irreps(Representation):
    """Steerable features given as e3nn irreps (needs the optional ``e3nn`` package).

    ``D(g) = Irreps.D_from_matrix(R)`` with ``R`` the group's 3x3 matrix, so the
    features use e3nn's basis (with e3nn 0.6 a ``1o`` block rotates exactly like an (x, y, z) vector).

    Args:
        irreps: an e3nn ``Irreps`` or its string, e.g. ``"8x0e+4x1o"``.
        pattern: axis pattern; the irreps axis is named ``axis``.
        axis: the name of the irreps axis.
        units: unit axes.
    """

    kind: Kind = "vector"

    def __init__(
        self, irreps: Any, pattern: str = "b ... irreps", axis: str = "irreps", units: str | None = None,
        **sizes: int,
    ) -> None:
        try:
            from e3nn import o3
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Irreps needs e3nn: pip install 'recm_opt[e3nn]'") from err
        self.irreps = o3.Irreps(irreps)
        self.axis = axis
        super().__init__(pattern, units, **sizes)

    def _known_size(self, name: str) -> int | None:
        return int(self.irreps.dim) if name == self.axis else super()._known_size(name)

    def _check_axis(self, y: Tensor, x: Tensor, where: str) -> None:
        if y.shape[self._axis_dim()] != self.irreps.dim:
            raise ValueError(
                f"{where}: axis {self.axis!r} must have size {self.irreps.dim} for {self.irreps}, "
                f"got shape {tuple(x.shape)}"
            )

    def matrices(self, group: Group, elements: Tensor, size: int = 0) -> Tensor:  # noqa: D102
        R = group.matrices(elements, "vector", 3)
        # float64 Euler angles: in float32 they cost D(gh) = D(g) D(h) up to 1e-4 near gimbal lock;
        # in float64 what remains (~1e-6) comes from e3nn's stored constants.
        return self.irreps.D_from_matrix(R.to(torch.float64)).to(torch.float64)

    def __repr__(self) -> str:
        return f"Irreps({str(self.irreps)!r}, pattern={self.pattern!r})"


class Custom(Representation):
    """Escape hatch: ``fn(g, x) -> x'`` for one natural-representation element ``g``.

    ``x`` has shape ``(S, *features)``, the per-unit features in pattern order. ``fn``
    must be a group action (``fn(e, x) = x``, ``fn(gh, x) = fn(g, fn(h, x))``). The
    optimizer checks it at its first use (:meth:`check_action`): same shape out as in,
    the identity leaves ``x`` unchanged, every generator gives finite values.

    Example:
        >>> rep = Custom(lambda g, x: -x if torch.det(g) < 0 else x, "b f")
        >>> rep.act(None, -torch.eye(3)[None], torch.ones(2, 4)).shape
        torch.Size([1, 2, 4])
    """

    def __init__(
        self, fn: Callable[[Tensor, Tensor], Tensor], pattern: str = "b ...", units: str | None = None,
        **sizes: int,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        self.fn = fn
        super().__init__(pattern, units, **sizes)

    def act(self, group: Group | None, elements: Tensor, x: Tensor) -> Tensor:  # noqa: D102
        return torch.stack([self.fn(g.to(x.dtype), x) for g in elements])

    def check_action(self, group: Group, elements: Tensor, x: Tensor, where: str) -> None:
        """Check ``fn`` on real features ``x``: shape kept, ``fn(e, x) = x``, finite for every generator.

        Raises:
            ValueError: naming ``where`` (the layer and input) and what failed.
        """
        e = torch.eye(elements.shape[-1], dtype=elements.dtype)
        for name, g in [("the identity", e), *((f"generator {i}", g) for i, g in enumerate(elements))]:
            try:
                out = self.fn(g.to(x.dtype), x)
            except Exception as err:
                raise ValueError(f"{where}: Custom action failed on {name}: {err}") from err
            if not isinstance(out, Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{where}: Custom action must return the features' shape {tuple(x.shape)}, "
                                 f"got {shape} for {name}")
            if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
                raise ValueError(f"{where}: Custom action returned non-finite values for {name}")
            if name == "the identity" and not torch.allclose(out, x, atol=1e-5, rtol=1e-4):
                raise ValueError(f"{where}: Custom action is not a group action: fn(identity, x) != x "
                                 f"(max difference {float((out - x).abs().max()):.3g})")
