"""The h update of one step, as functions over the layers and their paired samples.

For each layer with samples, ``l_theta`` is the unit-weighted mean over its samples
(:func:`l_means`), ``h`` commits it (:func:`commit`; a non-finite ``l`` leaves ``h``
unchanged), the newest sample is kept for the next forward's gradient into theta
(:func:`newest`), and the kept/pruned flags follow the new alphas (:func:`live_flags`).
Standard modulations with equal shapes are batched across layers; the others take
the per-layer reference path (:func:`l_mean`, ``Modulation.commit``,
``Modulation.coefficients``), which tests compare with the batched path in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import modulation
from ._device import _host_flags, _isfinite_each, _nonfinite_probes, _to_device
from ._distributed import all_reduce_mean
from ._layers import _Layer
from .modulation import _foreach_commit, _stacked_alpha, _stacked_r_theta, is_standard

Samples = list[tuple[Tensor, int]]  # (stacked sample (1 + k, S, d), units it stands for)


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


def stacked_l_mean(items: list[tuple[_Layer, Samples]], with_grad: bool = False
                   ) -> tuple[list[Tensor], Tensor, Tensor]:
    """:func:`l_mean` of layers whose samples have equal shapes, in one ``r_theta`` call.

    Returns:
        Each layer's l (no grad), the stacked samples ``(G, 1 + k, R, d)`` and their
        ``r_theta`` output ``(G, 1 + k, R, m)``, with grad if ``with_grad``.
    """
    mods = [layer.mod for layer, _ in items]
    dtype = mods[0].w_beta.dtype
    rows = [s[0][0] if len(s) == 1 else torch.cat([t for t, _ in s], 1) for _, s in items]
    x = (rows[0][None] if len(rows) == 1 else torch.stack(rows)).to(dtype)  # (G, 1 + k, R, d)
    g, c, r, d = x.shape
    with torch.set_grad_enabled(with_grad):
        flat = x.reshape(g, c * r, d)
        out = (mods[0].r_theta(flat) if g == 1 else _stacked_r_theta(mods, flat)).reshape(g, c, r, -1)
    diff = out.detach()[:, 0] - out.detach()[:, 1:].mean(1)
    if all(len(s) == 1 for _, s in items):  # one capture each: equal weights 1/S, a scalar
        return list((diff * (1.0 / r)).sum(1).unbind()), x, out
    weights = _to_device(torch.stack([_weights(s) for _, s in items]).to(dtype), x.device)
    return list((weights[..., None] * diff).sum(1).unbind()), x, out


Stacked = list[tuple[list[_Layer], Tensor, Tensor]]


def l_means(items: list[tuple[_Layer, Samples]]) -> tuple[list[Tensor], Stacked]:
    """Each layer's ``l_theta``, and the stacked groups of single captures (with grad).

    Standard modulations whose samples have equal shapes share one batched ``r_theta``
    call; a group of single captures keeps its stacked sample and ``r_theta`` output:
    they become ``newest`` and the next forward's coefficients.
    """
    out: list[Tensor | None] = [None] * len(items)
    stacked: Stacked = []
    groups: dict[tuple, list[int]] = {}
    for i, (layer, samples) in enumerate(items):
        mod = layer.mod
        if not is_standard(mod):
            out[i] = l_mean(layer, samples)
            continue
        first = samples[0][0]
        key = (tuple(s.shape[1] for s, _ in samples), first.shape[0], first.shape[2], first.device,
               mod.w_beta.dtype, mod.r_theta[0].weight.shape, mod.r_theta[2].weight.shape)
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        group = [items[i] for i in idx]
        ls, x, r = stacked_l_mean(group, with_grad=modulation.PRECOMPUTE and len(key[0]) == 1)
        for i, l in zip(idx, ls):
            out[i] = l
        if len(key[0]) == 1:
            stacked.append(([layer for layer, _ in group], x, r))
    return [l for l in out if l is not None], stacked


def commit(pending: list[tuple[_Layer, Tensor]], a: float, b: float) -> list[Tensor]:
    """Commit each layer's l into its h; return a bool tensor per layer, True where h was updated."""
    ok: list[Tensor | None] = [None] * len(pending)
    groups: dict[tuple, list[int]] = {}
    for i, (layer, l) in enumerate(pending):
        mod = layer.mod
        if is_standard(mod) and l.shape == mod.h.shape and l.device == mod.h.device:
            groups.setdefault((mod.h.dtype, mod.h.device, l.dtype), []).append(i)
            continue
        finite = bool(torch.isfinite(l).all())  # the per-layer reference: one host sync each
        if finite:
            mod.commit(l, a, b)
        ok[i] = torch.tensor([finite], device=mod.h.device)
    for idx in groups.values():
        ls = torch.stack([pending[i][1] for i in idx])
        flags = _foreach_commit([pending[i][0].mod for i in idx], ls, a, b)
        for i, f in zip(idx, flags.split(1)):
            ok[i] = f
    return [f for f in ok if f is not None]


def newest(layer: _Layer, samples: Samples, max_units: int, rng: torch.Generator) -> Tensor:
    """The sample behind h's newest term: the step's samples, subsampled to ``max_units`` units."""
    if len(samples) == 1:  # one capture: the sample itself, no copy
        return samples[0][0].to(layer.mod.w_beta.dtype)
    sample = torch.cat([s for s, _ in samples], 1).to(layer.mod.w_beta.dtype)
    if sample.shape[1] > max_units:
        keep = torch.randperm(sample.shape[1], generator=rng)[:max_units]
        sample = sample[:, keep.to(sample.device)]
    return sample


def live_flags(layers: list[_Layer], prune_eps: float) -> list[Tensor]:
    """``|alpha_i| >= prune_eps`` for every layer's terms, in layer order, still on the device."""
    slots: list[Tensor | None] = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        mod = layer.mod
        if is_standard(mod):
            groups.setdefault((mod.h.dtype, mod.h.device, mod.h.shape), []).append(i)
        else:
            slots[i] = mod.coefficients()[0].abs() >= prune_eps
    for idx in groups.values():
        mods = [layers[i].mod for i in idx]
        flags = _stacked_alpha(mods).abs() >= prune_eps
        for i, f in zip(idx, flags.split([len(m.terms) for m in mods])):
            slots[i] = f
    return [f for f in slots if f is not None]


def apply_live(layers: list[_Layer], flags: list[bool]) -> None:
    """Store each layer's kept/pruned flags (``flags`` in the order of :func:`live_flags`)."""
    for layer in layers:
        k = len(layer.mod.terms)
        layer.mod.live, flags = tuple(flags[:k]), flags[k:]


def rebuild_precomputed(layers: list[_Layer]) -> None:
    """Rebuild the batched training coefficients a saved run held for its next forward.

    ``step()`` leaves each layer's next-forward ``(alpha, beta)`` computed in one batched
    graph (:func:`~recm_opt.modulation._stacked_coefficients`); a freshly loaded optimizer
    would compute them per layer, which rounds differently. They are a function of the
    restored state, so the same code path as in ``step()`` (:func:`l_means` on the newest
    samples, grouped alike) rebuilds them bit for bit, and a resumed run continues exactly.
    """
    if not modulation.PRECOMPUTE:
        return
    items = [(layer, [(layer.mod.newest, layer.mod.newest.shape[1])]) for layer in layers
             if layer.mod.newest is not None]
    if not items:
        return
    _, stacked = l_means(items)
    for group, x, r in stacked:
        if r.requires_grad:
            for layer, sample in zip(group, x.unbind()):
                layer.mod.newest = sample
            modulation._stacked_coefficients([layer.mod for layer in group], r)


def finite_samples(layers: list[_Layer], captures: dict[_Layer, list[Any]]) -> list[tuple[_Layer, Samples]]:
    """The captures' samples by layer, in layer order; a sample with NaN/Inf is counted and left out."""
    flat = [(layer, c) for layer in layers for c in captures.get(layer, [])]
    if not flat:
        return []
    # One host sync for every sample, not one per layer: a NaN/Inf batch never reaches h.
    finite = _host_flags([_isfinite_each(_nonfinite_probes([c.sample for _, c in flat]))])
    out: dict[_Layer, Samples] = {}
    for (layer, c), ok in zip(flat, finite):
        if ok:
            out.setdefault(layer, []).append((c.sample, c.units))
        else:
            layer.skipped += 1
    return list(out.items())


def update_states(layers: list[_Layer], items: list[tuple[_Layer, Samples]], *, a: float, b: float,
                  prune_eps: float, max_units: int, rng: torch.Generator, any_grad: Callable[[], bool]) -> None:
    """One step's h update of every layer, from ``items`` (``(layer, samples)`` in layer order).

    ``l_theta`` per layer (batched where possible), averaged over DDP ranks, committed into
    ``h`` (a non-finite ``l`` leaves ``h`` unchanged and is counted), the newest sample kept
    for the next forward, and the kept/pruned flags refreshed; one host sync in all.
    """
    have = {layer for layer, _ in items}
    for layer in layers:
        if layer not in have and not layer.warned and (items or any_grad()):
            why = ("ran in training mode, but no backward went through it since the last step (does its output "
                   "reach the loss?)" if layer.ran_unbacked else "did not run in training mode since the last step")
            warnings.warn(f"layer {layer.name!r} {why}; its h is unchanged", stacklevel=4)
            layer.warned = True
        layer.ran_unbacked = False
    ls, stacked = l_means(items)
    index = {layer: i for i, layer in enumerate(layers)}
    full: list[Tensor | None] = [None] * len(layers)
    for (layer, _), l in zip(items, ls):
        full[index[layer]] = l
    full = all_reduce_mean(full)  # DDP: the same l on every rank
    pending = [(layer, l) for layer, l in zip(layers, full) if l is not None]
    committed = commit(pending, a, b)  # decided on the device: a non-finite l leaves h unchanged
    flags = _host_flags(committed + live_flags(layers, prune_eps))  # one host sync for the whole update
    ok = {layer: f for (layer, _), f in zip(pending, flags)}
    done = set()
    for group, x, r in stacked:  # newest = this step's sample, already stacked and passed through r_theta
        if r.requires_grad and all(ok.get(layer) for layer in group) \
                and all(layer.mod.beta_fn is group[0].mod.beta_fn for layer in group):
            for layer, sample in zip(group, x.unbind()):
                layer.mod.newest = sample
                done.add(layer)
            modulation._stacked_coefficients([layer.mod for layer in group], r)
    samples = dict(items)
    for (layer, _), f in zip(pending, flags):
        if not f:
            layer.skipped += 1
        elif layer in samples and layer not in done:
            layer.mod.newest = newest(layer, samples[layer], max_units, rng)
    apply_live(layers, flags[len(pending):])
