"""Diagnostics: how asymmetric a layer's data is, what that allows, and how equivariant a map is.

Theorem 4.2 of RECM bounds what a layer can learn from its data: for the
update function ``l_theta = r_theta - mean_{g in C_G} r_theta o g``,

    ||E_p[l_theta]|| <= B * W1(p, p_C) <= 2 B * W1(p, p_G)

where ``B`` is a Lipschitz constant of ``r_theta`` (:func:`lipschitz_bound`),
``p_C = mean_{g in C_G} g#p`` averages the data over the generating set and
``p_G`` over the whole group (Haar). The first inequality is Kantorovich-Rubinstein
with a coupling, the second holds because ``p_G`` is invariant and every ``g``
is an isometry. With ``||w_alpha_i|| <= 1`` and ``|GELU(x)| <= |x|`` this gives
``|alpha_i*| <= 2 sqrt(m) B W1(p, p_G)`` (:func:`alpha_bound`). ``W1(p, p_C) = 0``
exactly when ``p`` is invariant (Lemma 4.3), so either distance is a *symmetry gap*.

:func:`symmetry_gap` measures it on empirical samples, exactly, by optimal
assignment (scipy). :func:`coupling_gap` estimates an upper bound on it by Monte
Carlo when the inputs' law is invariant. :func:`equivariance_error` checks a map against declared
representations, e.g. an exported layer whose every alpha was pruned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .groups import Group
from .modulation import Modulation
from .reps import Representation
from .tagging import _MODULATION, get_relaxation

__all__ = ["alpha_bound", "coupling_gap", "equivariance_error", "lipschitz_bound", "symmetry_gap"]


def _modulation(source: nn.Module) -> Modulation:
    if isinstance(source, Modulation):
        return source
    mod = source._modules.get(_MODULATION) if isinstance(source, nn.Module) else None
    if not isinstance(mod, Modulation):
        raise ValueError(f"expected a Modulation or a @relaxed layer attached to RECMOptimizer, got {type(source)}")
    return mod


def lipschitz_bound(source: nn.Module) -> float:
    """Return B, a certified Lipschitz constant (l2 -> l2) of a layer's ``r_theta``.

    Args:
        source: a ``@relaxed`` layer attached to an optimizer, or its :class:`Modulation`.

    Returns:
        ``||W2||_2 * Lip(GELU) * ||W1||_2`` (see :meth:`Modulation.lipschitz_bound`).

    Example:
        >>> mod = Modulation(("weight",), state_dim=4, in_features=3)
        >>> lipschitz_bound(mod) > 0
        True
    """
    return _modulation(source).lipschitz_bound()


def alpha_bound(lipschitz: float, gap: float, state_dim: int) -> float:
    """Return ``2 sqrt(m) B W1``, Theorem 4.2's bound on every ``|alpha_i|`` at the fixed point.

    Valid with ``gap`` either ``W1(p, p_G)`` or the generator-average gap ``W1(p, p_C)``
    (then conservative, since ``||E_p l|| <= B W1(p, p_C)``).

    Example:
        >>> alpha_bound(2.0, 0.5, 16)
        8.0
    """
    return 2.0 * math.sqrt(state_dim) * lipschitz * gap


def _w1(x: Tensor, y: Tensor) -> float:
    """Exact W1 (Euclidean ground metric) between uniform empirical measures on rows of x and y."""
    from scipy.optimize import linear_sum_assignment  # optional dependency: import only when used

    g = math.gcd(len(x), len(y))
    # Replicating atoms keeps each measure unchanged and makes the transport an assignment.
    xs, ys = x.double().repeat(len(y) // g, 1), y.double().repeat(len(x) // g, 1)
    # Direct differences: the matrix-product shortcut leaves ~1e-8 where a distance is exactly 0.
    cost = torch.cdist(xs, ys, compute_mode="donot_use_mm_for_euclid_dist").cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _subsample(stacked: Tensor, max_points: int, generator: torch.Generator | None) -> Tensor:
    """Keep at most ``max_points`` copies and ``max_points // copies`` units: at most ``max_points`` atoms a side."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if stacked.shape[0] - 1 > max_points:  # more copies than the cap: a uniform subset of them (identity kept)
        pick = 1 + torch.randperm(stacked.shape[0] - 1, generator=g)[:max_points]
        stacked = stacked[torch.cat([torch.zeros(1, dtype=pick.dtype), pick]).to(stacked.device)]
    copies, units = stacked.shape[0] - 1, stacked.shape[1]
    keep = max(1, max_points // max(copies, 1))
    if units <= keep:
        return stacked
    idx = torch.randperm(units, generator=g)[:keep]
    return stacked[:, idx.to(stacked.device)]


def _gap_elements(group: Group, n_elements: int, max_points: int, generator: torch.Generator) -> Tensor:
    """Every element of a finite group of order <= ``max_points``; else ``n_elements`` uniform (Haar) samples."""
    if group.finite and group.order() <= max_points:
        return group.elements()
    return group.sample(max(1, min(n_elements, max_points)), generator)


def _flat_units(x: Tensor, rep: Representation) -> tuple[Tensor, tuple[int, ...]]:
    v, units = rep.unit_view(x)
    lead = tuple(units.values())
    return v.reshape(math.prod(lead), *v.shape[len(lead):]), lead


def _orbit_sample(tensors: Sequence[Tensor], reps: Sequence[Representation], group: Group, elements: Tensor) -> Tensor:
    """Stack ``(1 + |E|, S, d)``: the units of ``tensors`` and their images under ``elements``."""
    parts, lead = [], None
    for x, rep in zip(tensors, reps):
        flat, units = _flat_units(x, rep)
        if lead is not None and units != lead:
            raise ValueError(f"all tensors must have the same units, got {lead} and {units} ({rep!r})")
        lead = units
        flat = flat.to(torch.float64)
        stacked = torch.cat([flat[None], rep.act(group, elements, flat)])
        parts.append(stacked.reshape(len(stacked), len(flat), -1))  # scalars per unit become one feature
    return torch.cat(parts, -1)


def symmetry_gap(
    source: nn.Module | Tensor | Sequence[Tensor],
    group: Group | None = None,
    reps: Representation | Sequence[Representation] | None = None,
    *,
    n_elements: int = 16,
    max_points: int = 512,
    generator: torch.Generator | None = None,
) -> float:
    """Return the Wasserstein-1 distance between an empirical (z, y) sample and its symmetrised version.

    Two forms, with the same meaning: ``W1(p, mean_{g in E} g#p)`` for a set ``E`` of elements.

    - ``symmetry_gap(layer)`` (or a :class:`Modulation`, or a stacked ``(1 + k, S, d)``
      tensor, identity copy first): the sample the layer's ``h`` last saw
      (``recm_modulation.newest``), against its average over the generating set
      ``C_G``. This is ``W1(p, p_C)``: exact for every group, finite or not, and
      ``||l_theta|| <= B W1(p, p_C)`` holds for that sample.
    - ``symmetry_gap(tensors, group, reps)``: the units of ``tensors`` (e.g. ``(z, y)``,
      acted on by ``reps``) against their average over the whole group, ``W1(p, p_G)``.
      For a finite group of order <= ``max_points`` ``E`` is every element and the
      value is exact (on the units kept). For an infinite group, or a finite one
      with more elements than ``max_points`` (``S_7`` has 5040), ``E`` is
      ``n_elements`` uniform (Haar) samples, drawn without listing the group: the
      plug-in estimate ``W1(p, p_E)`` is consistent as ``n_elements`` grows and, W1
      being convex, its expectation is >= ``W1(p, p_G)``, so bounds built on it err
      on the safe side.

    W1 uses the Euclidean metric on the flattened per-unit features and is computed
    as an optimal assignment (scipy's ``linear_sum_assignment``) between the
    replicated atoms. The cap always holds: at most ``max_points`` copies (a
    uniform subset of a larger stacked sample's copies, identity kept) and
    ``max_points // copies`` units, so the assignment is at most
    ``max_points x max_points``.

    Args:
        source: a tagged layer, a :class:`Modulation`, a stacked sample, or tensors.
        group: the group, for tensors.
        reps: one representation per tensor.
        n_elements: Haar samples for an infinite group or a finite group of order > ``max_points``.
        max_points: cap on the atoms of the symmetrised measure (cost ~ max_points^3).
        generator: random source for Haar samples and subsampling (default: seed 0).

    Returns:
        The W1 distance (0 when the sample is symmetric).

    Raises:
        ValueError: if a layer has no captured sample yet, or reps/group are missing.

    Example:
        >>> from recm_opt.groups import CyclicGenerators
        >>> from recm_opt.reps import Vector
        >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # closed under C_4
        >>> symmetry_gap(z, CyclicGenerators(4), Vector("b xy", axis="xy", size=2)) < 1e-12
        True
        >>> round(symmetry_gap(z[:1], CyclicGenerators(4), Vector("b xy", axis="xy", size=2)), 4)
        1.2071
    """
    if isinstance(source, nn.Module):
        stacked = _modulation(source).newest
        if stacked is None:
            raise ValueError("the layer has no captured sample yet: run a training step first")
    elif reps is None:
        stacked = torch.as_tensor(source)
        if stacked.dim() != 3 or stacked.shape[0] < 2:
            raise ValueError(f"expected a stacked (1 + k, S, d) sample, got shape {tuple(stacked.shape)}")
    else:
        if group is None:
            raise ValueError("symmetry_gap over tensors needs the group")
        tensors = (source,) if isinstance(source, Tensor) else tuple(source)
        rep_list = (reps,) if isinstance(reps, Representation) else tuple(reps)
        if len(rep_list) != len(tensors):
            raise ValueError(f"need one representation per tensor, got {len(rep_list)} for {len(tensors)}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        stacked = _orbit_sample(tensors, rep_list, group, _gap_elements(group, n_elements, max_points, g))
    stacked = _subsample(stacked.detach(), max_points, generator)
    return _w1(stacked[0], stacked[1:].flatten(0, 1))


def _act_tensor(rep: Representation, group: Group, elements: Tensor, x: Tensor) -> Tensor:
    """Apply each element to a whole tensor in its own layout: ``(k, *x.shape)``."""
    flat, lead = _flat_units(x, rep)
    moved = rep.act(group, elements, flat)
    moved = moved.reshape(len(elements), *lead, *flat.shape[1:])
    back = f"{rep._target} -> {rep.pattern}"  # the inverse of unit_view
    return torch.stack([rearrange(m, back, **rep.sizes) for m in moved])


def _declared_reps(module: Any, n_inputs: int) -> list[Representation | None]:
    tag = get_relaxation(module) if isinstance(module, nn.Module) else None
    if tag is None:
        raise ValueError("module is not @relaxed: pass input_reps (one Representation or None per input)")
    import inspect

    params = [p for p in inspect.signature(module.equivariant).parameters if p != "self"]
    return [tag.inputs.get(params[i]) if i < len(params) else None for i in range(n_inputs)]


@torch.no_grad()
def equivariance_error(
    module: Callable[..., Tensor],
    inputs: Tensor | Sequence[Any],
    group: Group,
    *,
    output_rep: Representation | None = None,
    input_reps: Sequence[Representation | None] | None = None,
    elements: Tensor | None = None,
    n_elements: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """Return ``max_g ||f(rho_in(g) x) - rho_out(g) f(x)|| / ||f(x)||`` (Frobenius norms).

    Each element is applied with the representations' own convention
    (``x' = x @ D(g).T`` on the declared axis) and ``f`` runs once per element, so
    no reshape ever mixes group copies with the features. Put the module in
    ``eval()`` first if it has random terms (noise).

    Args:
        module: the map, e.g. a ``@relaxed`` layer or its export.
        inputs: a tensor or the tuple of positional arguments.
        group: the group whose elements act.
        output_rep: the output's representation; default: the input's, when there is one.
        input_reps: one representation (or ``None`` for untouched arguments) per input;
            default: the ``@relaxed`` tag's declared inputs.
        elements: ``(k, dim, dim)`` elements to check; default: ``C_G`` plus
            ``n_elements`` Haar samples (continuity extends invariance under ``C_G``
            to its closure).
        n_elements: Haar samples in the default element set.
        generator: random source for the Haar samples (default: seed 0).

    Returns:
        The worst relative error (absolute when ``f(x) = 0``); ~1e-15 for an exact map in float64.

    Example:
        >>> from recm_opt.groups import SO3Generators
        >>> from recm_opt.reps import Vector
        >>> rep = Vector("b c xyz")
        >>> x = torch.randn(4, 2, 3, dtype=torch.float64)
        >>> equivariance_error(lambda z: z.flip(1), x, SO3Generators(), input_reps=[rep]) < 1e-12
        True
        >>> equivariance_error(lambda z: z.flip(2), x, SO3Generators(), input_reps=[rep]) > 0.1
        True
    """
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    reps = list(input_reps) if input_reps is not None else _declared_reps(module, len(args))
    if output_rep is None:
        declared = [r for r in reps if r is not None]
        if len(declared) != 1:
            raise ValueError(f"pass output_rep: it defaults to the input's only with one input rep, got {declared}")
        output_rep = declared[0]
    if elements is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        elements = torch.cat([group.generators(), group.sample(n_elements, g)])
    moved = [
        _act_tensor(r, group, elements, a) if r is not None and isinstance(a, Tensor) else None
        for r, a in zip(reps, args)
    ]
    fx = module(*args)
    expected = _act_tensor(output_rep, group, elements, fx)
    scale = float(fx.norm()) or 1.0
    worst = 0.0
    for k in range(len(elements)):
        out = module(*[a if m is None else m[k] for a, m in zip(args, moved)])
        worst = max(worst, float((out - expected[k]).norm()) / scale)
    return worst


def coupling_gap(
    fn: Callable[[Tensor], Tensor | Sequence[Tensor]],
    x: Tensor,
    group: Group,
    input_rep: Representation,
    reps: Representation | Sequence[Representation],
    *,
    n_elements: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """Estimate ``E_{x,g} ||q(x) - T_g q(g^-1 x)||``, a coupling upper bound on ``W1(p, p_G)``.

    ``q(x) = (z(x), y(x))`` are the tensors ``fn`` returns for the inputs ``x`` (e.g. a
    layer's input and the target), ``T_g`` acts on them by ``reps`` and ``g^-1`` on ``x``
    by ``input_rep``; ``p`` is the law of ``q(x)``. The norm is Euclidean over each
    unit's flattened features (the metric of :func:`symmetry_gap`).

    How it is computed: one set of group elements is drawn, every element of a finite
    group or ``n_elements`` Haar samples of an infinite one (from ``generator``), and
    every element is applied to every input. For each element ``g`` the distances are
    averaged over the units of the batch; the result is the mean of those averages over
    the elements.

    When the expectation is a bound: the law of ``x`` is G-invariant (``g x ~ x`` for
    every ``g``) and ``z`` and ``y`` are deterministic functions of ``x`` (put the model in
    ``eval()``). Then, for each ``g``, ``(q(x), T_g q(g^-1 x))`` is a coupling of ``p`` and
    ``g#p``, and averaging over Haar ``g`` couples ``p`` with ``p_G``, so the expectation
    bounds ``W1(p, p_G)`` from above. For a non-invariant input law it is not a bound.

    The returned value is a Monte-Carlo estimate of that expectation, not a certificate:
    the mean over the batch estimates the expectation over ``x``, and on an infinite group
    the mean over the ``n_elements`` drawn elements estimates the expectation over ``g``.
    The elements are shared by every unit, so the error from drawing them shrinks like
    ``n_elements^-1/2`` and does not shrink with the batch. On SO(3) with the default 8
    rotations it was measured at about 5-6 % of the value (one standard deviation over
    the rotation draw, on the data of ``benchmarks.symmetry_gap`` at 1024 inputs; about
    2.6 % with 64 rotations), so an estimate can fall below the expectation it
    estimates. It is exactly 0 when ``q`` is equivariant (symmetric data: then ``q(g^-1 x) = T_g^-1 q(x)``),
    whatever elements are drawn, unlike the plug-in :func:`symmetry_gap`, whose value on
    ``n`` samples stays positive for an infinite group and shrinks slowly with ``n``.

    Args:
        fn: maps a batch of inputs to one tensor or a tuple of tensors, e.g. ``(z, y)``.
        x: the inputs, a sample from a G-invariant law.
        group: the group.
        input_rep: the representation of ``x``.
        reps: one representation per output of ``fn``; all must have the same units.
        n_elements: Haar samples per input for an infinite group.
        generator: random source of the Haar samples (default: seed 0).

    Returns:
        The estimated mean distance (0 for an exactly symmetric ``q``).

    Example:
        >>> from recm_opt.groups import SO3Generators
        >>> from recm_opt.reps import Vector
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> rep = Vector("b xyz")
        >>> coupling_gap(lambda v: (v, 2 * v), x, SO3Generators(), rep, (rep, rep)) < 1e-12   # equivariant
        True
        >>> coupling_gap(lambda v: v + torch.tensor([1.0, 0, 0], dtype=v.dtype), x, SO3Generators(), rep, rep) > 0.5
        True
    """
    out_reps = (reps,) if isinstance(reps, Representation) else tuple(reps)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    elements = group.elements() if group.finite else group.sample(n_elements, g)
    elements = elements.to(torch.float64)

    def features(out: Tensor | Sequence[Tensor]) -> Tensor:
        outs = (out,) if isinstance(out, Tensor) else tuple(out)
        if len(outs) != len(out_reps):
            raise ValueError(f"need one representation per output of fn, got {len(out_reps)} for {len(outs)}")
        parts, lead = [], None
        for t, rep in zip(outs, out_reps):
            flat, units = _flat_units(t.detach().to(torch.float64), rep)
            if lead is not None and units != lead:
                raise ValueError(f"all outputs must have the same units, got {lead} and {units} ({rep!r})")
            lead = units
            parts.append(flat.reshape(len(flat), -1))
        return torch.cat(parts, -1)

    def act(out: Tensor | Sequence[Tensor], element: Tensor) -> list[Tensor]:
        outs = (out,) if isinstance(out, Tensor) else tuple(out)
        return [_act_tensor(rep, group, element[None], t.detach().to(torch.float64))[0]
                for t, rep in zip(outs, out_reps)]

    with torch.no_grad():
        q = features(fn(x))
        inverses = elements.transpose(-1, -2)  # orthogonal natural representation
        total = 0.0
        for e, inv in zip(elements, inverses):
            moved = _act_tensor(input_rep, group, inv[None], x.to(torch.float64))[0].to(x.dtype)
            image = features(act(fn(moved), e))
            total += float((q - image).norm(dim=-1).mean())
    return total / len(elements)
