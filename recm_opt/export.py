"""Export (prune and bake) a trained model, and report what each layer kept.

``export(model)`` returns a deep copy in which every tagged layer computes
``beta * f_eq(z) + sum_{kept i} alpha_i f_un_i(z)`` with alpha and beta stored
as constant buffers ``recm_alpha``/``recm_beta``; terms with ``|alpha| < eps`` are
gone together with their parameters, and no hook or modulation remains.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .tagging import _BAKED, _MODULATION, get_relaxation

if TYPE_CHECKING:
    from .modulation import Modulation

__all__ = ["export", "format_report", "layer_row", "parameter_overhead"]


def _count(module: nn.Module, exclude: set[int]) -> int:
    return sum(
        p.numel()
        for p in module.parameters()
        if id(p) not in exclude and not isinstance(p, nn.parameter.UninitializedParameter)
    )


def _term_param_ids(module: nn.Module, attrs: tuple[str, ...]) -> set[int]:
    out: set[int] = set()
    for a in attrs:
        obj = getattr(module, a, None)
        if isinstance(obj, nn.Parameter):
            out.add(id(obj))
        elif isinstance(obj, nn.Module):
            out |= {id(p) for p in obj.parameters()}
    return out


def layer_row(name: str, module: nn.Module, skipped: int = 0, dropped: int = 0, gaps: bool = False,
              capped: int = 0) -> dict[str, Any]:
    """Return the report row of one tagged layer (attached to an optimizer or not).

    Keys: ``name``, ``alpha`` (term -> value), ``beta``, ``h_norm``, ``t``, ``kept``,
    ``pruned``, ``skipped`` (captures with NaN/Inf), ``capped`` (captures whose ``l`` was capped
    as an outlier), ``dropped`` (captures whose backward never ran), ``params_before`` (the layer with every term),
    ``params_after`` (after export) and ``params_equivariant`` (no terms); with
    ``gaps`` and once the layer has a sample also ``lipschitz``, ``gap_w1`` and
    ``alpha_bound`` (see :mod:`recm_opt.diagnostics`).
    """
    tag = get_relaxation(module)
    if tag is None:
        raise ValueError(f"{name!r} is not a @relaxed layer")
    mod = cast("Modulation | None", module._modules.get(_MODULATION))
    mod_ids = {id(p) for p in mod.parameters()} if mod is not None else set()
    term_ids = {t: _term_param_ids(module, attrs) for t, attrs in tag.terms.items()}
    with torch.no_grad():
        if mod is not None:
            alpha_t, beta_t = mod.coefficients()
            alpha, beta = dict(zip(mod.terms, alpha_t.tolist())), float(beta_t)
            h_norm, t = float(mod.h.norm()), int(mod.t)
            kept = [n for n, k in zip(mod.terms, mod.kept().tolist()) if k]
        else:
            alpha, beta, h_norm, t = {n: 0.0 for n in tag.terms}, 1.0, 0.0, 0
            kept = []
    all_terms = set().union(*term_ids.values())
    pruned_ids = set().union(*(term_ids[n] for n in tag.terms if n not in kept))
    return {
        "name": name, "alpha": alpha, "beta": beta, "h_norm": h_norm, "t": t,
        "kept": kept, "pruned": [n for n in tag.terms if n not in kept], "skipped": skipped, "capped": capped,
        "dropped": dropped,
        "params_before": _count(module, mod_ids),
        "params_after": _count(module, mod_ids | pruned_ids),
        "params_equivariant": _count(module, mod_ids | all_terms),
        **(_symmetry_keys(mod) if mod is not None and gaps else {}),
    }


def _symmetry_keys(mod: nn.Module) -> dict[str, float]:
    """``lipschitz`` (B), ``gap_w1`` (W1 of the newest sample to its C_G-average) and ``alpha_bound``.

    Present once the layer has a captured sample and scipy is installed. The gap is
    cached per sample, because the exact W1 is an assignment problem.
    """
    newest = getattr(mod, "newest", None)
    if newest is None:
        return {}
    from .diagnostics import alpha_bound, lipschitz_bound, symmetry_gap

    cached = getattr(mod, "_recm_gap", None)
    try:
        gap = cached[1] if cached is not None and cached[0] is newest else symmetry_gap(mod)
        B = lipschitz_bound(mod)
    except (ImportError, RuntimeError):  # scipy is optional; a policy's modulation has no r_theta
        return {}
    object.__setattr__(mod, "_recm_gap", (newest, gap))
    return {"lipschitz": B, "gap_w1": gap, "alpha_bound": alpha_bound(B, gap, mod.get_buffer("h").numel())}


def parameter_overhead(rows: list[dict[str, Any]], model: nn.Module | None = None) -> float:
    """Inference-parameter overhead of the exported model against the equivariant-only one.

    ``(params_after - params_equivariant) / params_equivariant`` summed over the model
    (paper Table 4). With ``model`` given, its untagged parameters join the denominator.
    """
    extra = sum(r["params_after"] - r["params_equivariant"] for r in rows)
    base = sum(r["params_equivariant"] for r in rows)
    if model is not None:
        tagged = sum(r["params_before"] for r in rows)
        mod_params = sum(p.numel() for n, p in model.named_parameters() if _MODULATION in n.split("."))
        base += _count(model, set()) - mod_params - tagged
    return extra / base if base else 0.0


def format_report(rows: list[dict[str, Any]]) -> str:
    """Format report rows as a fixed-width table (one line per layer).

    Example:
        >>> print(format_report([]).splitlines()[0].split())
        ['layer', 'alpha', 'beta', '|h|', 'kept', 'pruned', 'params']
    """
    gaps = any("gap_w1" in r for r in rows)  # symmetry gap and alpha bound, when measured
    lines = [f"{'layer':<20} {'alpha':<40} {'beta':>7} {'|h|':>9} {'kept':<18} {'pruned':<18} {'params':>13}"
             + (f" {'W1':>9} {'bound':>9}" if gaps else "")]
    for r in rows:
        alpha = " ".join(f"{k}={v:+.4f}" for k, v in r["alpha"].items())
        gap = f" {r['gap_w1']:9.2e} {r['alpha_bound']:9.2e}" if "gap_w1" in r else f" {'-':>9} {'-':>9}"
        lines.append(
            f"{r['name']:<20} {alpha:<40} {r['beta']:7.4f} {r['h_norm']:9.2e} {','.join(r['kept']) or '-':<18} "
            f"{','.join(r['pruned']) or '-':<18} {r['params_before']:>6}->{r['params_after']:<6}"
            + (gap if gaps else "")
        )
    return "\n".join(lines)


def _remove_capture_hooks(module: nn.Module) -> None:
    from ._capture import _Hook

    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _Hook)]:
            del hooks[key]


@torch.no_grad()
def export(model: nn.Module, eps: float | None = None) -> nn.Module:
    """Return a plain copy of ``model`` with alpha/beta baked in and pruned terms removed.

    Args:
        model: a model whose ``@relaxed`` layers may carry RECM modulation.
        eps: the ``|alpha|`` threshold; defaults to each layer's ``prune_eps``. The
            layer's noise test (``prune_z``) applies as well.

    Returns:
        A deep copy with no hooks and no modulation. Its tagged layers compute
        ``beta * f_eq + sum_{kept} alpha_i f_un_i``; pruned terms' parameters are deleted.
    """
    out = copy.deepcopy(model)
    for module in out.modules():
        tag = get_relaxation(module)
        mod = cast("Modulation | None", module._modules.get(_MODULATION) if tag is not None else None)
        if tag is None or mod is None:
            continue
        alpha, beta = mod.coefficients()
        kept = [i for i, k in enumerate(mod.kept(eps).tolist()) if k]
        for i, name in enumerate(mod.terms):
            if i not in kept:
                for attr in tag.terms[name]:
                    delattr(module, attr)
        del module._modules[_MODULATION]
        _remove_capture_hooks(module)
        module.register_buffer("recm_alpha", alpha[kept].clone())
        module.register_buffer("recm_beta", beta.clone())
        object.__setattr__(module, _BAKED, tuple(mod.terms[i] for i in kept))
    return out
