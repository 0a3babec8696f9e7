"""The h update of one step, as functions over the layers and their paired samples.

For each layer with samples, ``l_theta`` is the unit-weighted mean over its samples,
``h`` commits it (a non-finite ``l`` leaves ``h`` unchanged), the step's sample is kept
as the newest term for the next forward's gradient into theta, and the kept/pruned
flags follow the new alphas. Layers whose modulations have equal shapes and whose
samples were stacked together (:func:`split`) are updated as one batch: one ``r_theta``
call (:func:`stacked_l`), one commit, one draw of the newest term's units. The others,
and every layer with ``RECMOptimizer(foreach=False)``, take the per-layer reference
(:func:`l_mean`, ``Modulation.commit``, :func:`newest`), which tests compare with the
batched path in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._device import _host_flags, _to_device
from ._distributed import _distributed, all_reduce_mean
from ._layers import _Layer
from ._warn import warn
from .modulation import _foreach_commit, _stacked_alpha, _stacked_r_theta, is_standard, kept_terms

Samples = list[tuple[Tensor, int]]  # (stacked sample (1 + k, S, d), units it stands for)
Split = tuple[list[tuple[list[_Layer], Tensor]], list[tuple[_Layer, Samples]]]  # batched groups, per-layer samples


def l_mean(layer: _Layer, samples: Samples) -> Tensor:
    """``l_theta`` of one layer over its samples, weighted by the units each stands for (the reference)."""
    xs = [s.to(layer.mod.w_beta.dtype) for s, _ in samples]
    # float64 weights: a float32 1/S would cap a float64 l_theta at float32 precision.
    weights = _weights(samples).to(xs[0])
    r = layer.mod.r_theta(torch.cat(xs, 1))  # one batched call over copies and captures
    return (weights[:, None] * (r[0] - r[1:].mean(0))).sum(0)


def _weights(samples: Samples) -> Tensor:
    """Per-row weights of :func:`l_mean` (float64, on the host)."""
    weights = torch.cat([torch.full((s.shape[1],), u / s.shape[1], dtype=torch.float64) for s, u in samples])
    return weights / weights.sum()


def _mod_key(layer: _Layer) -> tuple | None:
    """Layers with equal keys share one batched ``r_theta`` call and commit; ``None``: per layer."""
    mod = layer.mod
    if not is_standard(mod):
        return None
    return (mod.w_beta.dtype, mod.h.device, tuple(mod.h.shape), tuple(mod.w_alpha.shape),
            tuple(mod.r_theta[0].weight.shape), tuple(mod.r_theta[2].weight.shape))


def stacked_l(layers: list[_Layer], x: Tensor) -> Tensor:
    """``l_theta`` of G layers with equal keys, one capture each: ``x`` is ``(G, 1 + k, S, d)``, returns ``(G, m)``."""
    g, c, r, d = x.shape
    flat = x.reshape(g, c * r, d)
    mods = [layer.mod for layer in layers]
    out = (mods[0].r_theta(flat) if g == 1 else _stacked_r_theta(mods, flat)).reshape(g, c, r, -1)
    # the mean over units as a sum times 1/S, as l_mean weighs one capture's rows
    return ((out[:, 0] - out[:, 1:].mean(1)) * (1.0 / r)).sum(1)


def commit(pending: list[tuple[_Layer, Tensor]], a: float, b: float, foreach: bool = True) -> list[Tensor]:
    """Commit each layer's l into its h; return ``(2, n)`` bool tensors: h updated, and l capped as an outlier."""
    ok: list[Tensor | None] = [None] * len(pending)
    groups: dict[tuple, list[int]] = {}
    for i, (layer, l) in enumerate(pending):
        mod = layer.mod
        if foreach and is_standard(mod) and l.shape == mod.h.shape and l.device == mod.h.device:
            groups.setdefault((mod.h.dtype, mod.h.device, l.dtype), []).append(i)
            continue
        finite = bool(torch.isfinite(l).all())  # the per-layer reference: one host sync each
        capped = mod.commit(l, a, b) if finite else torch.tensor(False, device=mod.h.device)
        ok[i] = torch.stack([torch.tensor(finite, device=mod.h.device), capped]).reshape(2, 1)
    for idx in groups.values():
        ls = torch.stack([pending[i][1] for i in idx])
        flags = _foreach_commit([pending[i][0].mod for i in idx], ls, a, b)
        for i, f in zip(idx, flags.split(1, dim=1)):
            ok[i] = f
    return [f for f in ok if f is not None]


def newest(layer: _Layer, samples: Samples, keep: dict[int, Tensor]) -> Tensor:
    """The sample behind h's newest term: the step's samples, their units subsampled by ``keep`` (see :func:`draws`)."""
    if len(samples) == 1:  # one capture: the sample itself, no copy
        return samples[0][0].to(layer.mod.w_beta.dtype)
    sample = torch.cat([s for s, _ in samples], 1).to(layer.mod.w_beta.dtype)
    index = keep.get(sample.shape[1])
    return sample if index is None else sample[:, _to_device(index, sample.device)]


def draws(layers: list[_Layer], units: dict[_Layer, int], max_units: int, rng: torch.Generator) -> dict[int, Tensor]:
    """The units each newest sample of more than ``max_units`` units keeps, drawn once per number of units.

    ``units`` gives each layer's number of units in the step (several captures, e.g. gradient
    accumulation); layers with the same number share one draw, made in layer order, so the
    batched and the per-layer path consume the generator alike.
    """
    out: dict[int, Tensor] = {}
    for layer in layers:
        n = units.get(layer, 0)
        if n > max_units and n not in out:
            out[n] = torch.randperm(n, generator=rng)[:max_units]
    return out


def live_flags(layers: list[_Layer], foreach: bool = True) -> list[Tensor]:
    """Every layer's kept/pruned flags (:func:`~recm_opt.modulation.kept_terms`), in layer order, on the device."""
    slots: list[Tensor | None] = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        mod = layer.mod
        if foreach and is_standard(mod):
            key = (mod.h.dtype, mod.h.device, mod.h.shape, mod.w_alpha.shape, mod.alpha_fn, mod.prune_eps, mod.prune_z)
            groups.setdefault(key, []).append(i)
        else:
            slots[i] = mod.kept()
    for idx in groups.values():
        mods = [layers[i].mod for i in idx]
        h = torch.stack([m.h for m in mods])  # (G, m), shared by alpha and the noise test
        alpha = _stacked_alpha(mods, h).reshape(len(mods), -1)  # (G, K): the group has one w_alpha shape
        v = torch.stack([m.noise_var for m in mods]) if mods[0].prune_z > 0 else None
        flags = kept_terms(alpha, h, v, mods[0].prune_eps, mods[0].prune_z)
        for i, f in zip(idx, flags.unbind(0)):
            slots[i] = f
    return [f for f in slots if f is not None]


def apply_live(layers: list[_Layer], flags: list[bool]) -> None:
    """Store each layer's kept/pruned flags (``flags`` in the order of :func:`live_flags`)."""
    for layer in layers:
        k = len(layer.mod.terms)
        layer.mod.live, flags = tuple(flags[:k]), flags[k:]


def split(batches: list[tuple[list[Any], Tensor]], finite: list[bool], foreach: bool) -> Split:
    """Sort the step's stacked samples into batched groups and per-layer samples.

    A sample with NaN/Inf (``finite`` is False) is counted and left out. Layers whose
    modulations share a key and whose captures sit next to each other in one batch (one
    capture, or ``k`` micro-batches of equal shapes) keep their samples stacked, the ``k``
    captures' units side by side: ``(G, 1 + |C_G|, k S, d)``, for one batched update. The
    others, and everything when ``foreach`` is False, take the per-layer path.

    Returns:
        The batched groups ``(layers, samples)`` and the per-layer ``(layer, samples)``, in layer order.
    """
    flags = iter(finite)
    where: dict[_Layer, list[tuple[int, int]]] = {}  # each layer's kept captures: (batch, row)
    for b, (captures, _) in enumerate(batches):
        for i, c in enumerate(captures):
            if next(flags):
                where.setdefault(c.layer, []).append((b, i))
            else:
                c.layer.skipped += 1
    groups: list[tuple[list[_Layer], Tensor]] = []
    per_layer: dict[_Layer, list[tuple[int, Tensor, int]]] = {}
    for b, (captures, x) in enumerate(batches):
        by_key: dict[tuple, list[tuple[_Layer, int]]] = {}
        rows: tuple[Tensor, ...] | None = None
        for layer, pos in where.items():
            mine = [i for bb, i in pos if bb == b]
            if not mine:
                continue
            key = _mod_key(layer) if foreach and len(mine) == len(pos) else None
            if key is not None and mine == list(range(mine[0], mine[0] + len(mine))) \
                    and len({captures[i].units for i in mine}) == 1:
                by_key.setdefault((key, len(mine)), []).append((layer, mine[0]))
                continue
            rows = x.unbind(0) if rows is None else rows
            per_layer.setdefault(layer, []).extend((captures[i].seq, rows[i], captures[i].units) for i in mine)
        for (key, k), members in by_key.items():
            idx = [start + j for _, start in members for j in range(k)]
            xs = x if idx == list(range(len(captures))) else x[torch.tensor(idx, device=x.device)]
            if k > 1:  # each layer's k captures side by side along the units
                n, c, units, d = xs.shape
                xs = xs.reshape(n // k, k, c, units, d).transpose(1, 2).reshape(n // k, c, k * units, d)
            groups.append(([layer for layer, _ in members], xs.to(key[0])))
    items = [(layer, [(sample, units) for _, sample, units in sorted(per_layer[layer], key=lambda e: e[0])])
             for layer in where if layer in per_layer]
    return groups, items


def update_states(layers: list[_Layer], groups: list[tuple[list[_Layer], Tensor]],
                  items: list[tuple[_Layer, Samples]], *, a: float, b: float, max_units: int,
                  rng: torch.Generator, any_grad: Callable[[], bool], foreach: bool = True) -> list[Tensor]:
    """One step's h update of every layer, from the batched ``groups`` and per-layer ``items`` (see :func:`split`).

    ``l_theta`` per layer (one ``r_theta`` call per batched group), averaged over DDP
    ranks, committed into ``h`` (a non-finite ``l`` leaves ``h`` unchanged and is
    counted), the step's sample kept as the newest term, and the kept/pruned flags
    refreshed; one host sync in all.

    Returns:
        The stacked samples of the batched groups whose every layer took its row as ``newest``.
    """
    have = {layer for layer, _ in items} | {layer for group, _ in groups for layer in group}
    for layer in layers:
        if layer not in have and not layer.warned and (have or any_grad()):
            why = ("ran in training mode, but no backward went through it since the last step (does its output "
                   "reach the loss?)" if layer.ran_unbacked else "did not run in training mode since the last step")
            warn(f"layer {layer.name!r} {why}; its h is unchanged")
            layer.warned = True
        layer.ran_unbacked = False
    units = {layer: x.shape[2] for group, x in groups for layer in group}
    units.update({layer: sum(sample.shape[1] for sample, _ in samples) for layer, samples in items if len(samples) > 1})
    keep = draws(layers, units, max_units, rng)
    with torch.no_grad():
        group_ls = [stacked_l(group, x) for group, x in groups]
        ls = [l_mean(layer, samples) for layer, samples in items]
    if _distributed():  # DDP: the same l on every rank, averaged over the ranks that captured each layer
        index = {layer: i for i, layer in enumerate(layers)}
        full: list[Tensor | None] = [None] * len(layers)
        for (group, _), gl in zip(groups, group_ls):
            for layer, l in zip(group, gl.unbind(0)):
                full[index[layer]] = l
        for (layer, _), l in zip(items, ls):
            full[index[layer]] = l
        full = all_reduce_mean(full)
        group_ls = [torch.stack([full[index[layer]] for layer in group]) for group, _ in groups]
        ls = [full[index[layer]] for layer, _ in items]
    committed = [_foreach_commit([layer.mod for layer in group], gl, a, b) for (group, _), gl in zip(groups, group_ls)]
    committed += commit([(layer, l) for (layer, _), l in zip(items, ls)], a, b, foreach)
    # one host sync for the whole update: which layers committed, which were capped, which terms are kept
    flags = _host_flags([c[0] for c in committed] + [c[1] for c in committed] + live_flags(layers, foreach))
    done = sum(len(group) for group, _ in groups) + len(items)
    ok = iter(flags[:done])
    order = [layer for group, _ in groups for layer in group] + [layer for layer, _ in items]
    for layer, capped in zip(order, flags[done:2 * done]):
        layer.capped += capped
    stacked = []
    for group, x in groups:
        took = True
        index = keep.get(x.shape[2])
        if index is not None:  # the newest term keeps max_units of the k S units
            x = x[:, :, _to_device(index, x.device)]
        for layer, sample, f in zip(group, x.unbind(0), ok):
            if f:
                layer.mod.newest = sample
            else:
                layer.skipped += 1
                took = False
        if took:
            stacked.append(x)
    for (layer, samples), f in zip(items, ok):
        if f:
            layer.mod.newest = newest(layer, samples, keep)
        else:
            layer.skipped += 1
    apply_live(layers, flags[2 * done:])
    return stacked
