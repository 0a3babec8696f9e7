"""What a modulation's settings and saved state may hold: the checks shared by the constructor and the loaders.

The optimizer's constructor and every loader (the model's ``load_state_dict``, a fresh
model rebuilding its modulations from a checkpoint) apply the same rules, so that a
checkpoint cannot set what the constructor refuses. Each check raises a ``ValueError``
(``TypeError`` for a wrong type in the constructor) that names the setting or key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: The maps ``s`` of ``alpha = s(w_alpha . h)`` (see :func:`recm_opt.modulation.alpha_map`).
ALPHA_FNS = ("gelu", "odd_gelu")

# Integer sizes a configuration may carry (the policies add ``total_steps``).
_SIZES = ("state_dim", "hidden", "in_features", "total_steps")


def check_number(key: str, value: Any, low: float, strict: bool) -> None:
    """A finite number ``> low`` (``strict``) or ``>= low``.

    Raises:
        TypeError: if ``value`` is not a number (bools are not).
        ValueError: naming ``key`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number, got {value!r}")
    if not (value > low if strict else value >= low):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")


def check_int(key: str, value: Any, low: int) -> None:
    """An int ``>= low`` (bools are not ints here).

    Raises:
        TypeError: if ``value`` is not an int.
        ValueError: naming ``key`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{key} must be an int >= {low}, got {value!r}")


def check_settings(prune_eps: Any, prune_z: Any, alpha_fn: Any) -> None:
    """The pruning and alpha-map settings, as ``RECMOptimizer`` and a loaded configuration both take them.

    Raises:
        TypeError: if ``prune_z`` is not a number.
        ValueError: naming the setting and its value.
    """
    check_number("prune_z", prune_z, 0, False)
    if alpha_fn not in ALPHA_FNS:
        raise ValueError(f"alpha_fn must be one of {ALPHA_FNS}, got {alpha_fn!r}")
    if isinstance(prune_eps, bool) or not isinstance(prune_eps, (int, float)):
        raise TypeError(f"prune_eps must be a number in [0, 1), got {prune_eps!r}")
    if not 0 <= prune_eps < 1:
        raise ValueError(f"prune_eps must be in [0, 1), got {prune_eps!r}")


def decode_config(value: Any, key: str) -> Any:
    """The configuration a checkpoint holds (a uint8 tensor of UTF-8 JSON, or a plain dict); other values unchanged.

    Raises:
        ValueError: naming ``key`` when the bytes are not UTF-8 JSON.
    """
    if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        return value
    try:
        return json.loads(bytes(value.tolist()).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{key}: the stored configuration is not UTF-8 JSON ({type(err).__name__}: {err}); "
                         "the checkpoint is corrupt") from err


def check_config(config: Any, key: str, kinds: Mapping[str, Any], terms: tuple[str, ...] | None = None) -> None:
    """A saved configuration: a known kind, the layer's terms, sizes ``>= 1`` and valid settings.

    The settings are checked by :func:`check_settings`, the constructor's own check.

    Raises:
        ValueError: naming ``key`` and the entry.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{key}: expected the modulation's configuration (a JSON object), got "
                         f"{type(config).__name__}")
    kind = config.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"{key}: the checkpoint holds a modulation of kind {kind!r}; known kinds: {sorted(kinds)} "
                         "(import the module that defines it before loading)")
    saved = config.get("terms")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(t, str) for t in saved)):
        raise ValueError(f"{key}: terms must be a list of names, got {saved!r}")
    if terms is not None and saved is not None and tuple(saved) != tuple(terms):
        raise ValueError(f"{key}: the checkpoint's terms {tuple(saved)} differ from the layer's {tuple(terms)}")
    for size in _SIZES:
        v = config.get(size)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{key}: {size} must be an int >= 1, got {v!r}")
    if "peak" in config:
        _as_value_error(key, lambda: check_number("peak", config["peak"], 0, False))
    _as_value_error(key, lambda: check_settings(config.get("prune_eps", 0.01), config.get("prune_z", 0.0),
                                                config.get("alpha_fn", "gelu")))
    live = config.get("train_all_live", True)
    if not isinstance(live, bool):
        raise ValueError(f"{key}: train_all_live must be true or false, got {live!r}")
    beta = config.get("beta_fn", "one_plus_tanh")
    if beta is not None and not isinstance(beta, str):
        raise ValueError(f"{key}: beta_fn must be a name, got {beta!r}")


def _as_value_error(key: str, check: Any) -> None:
    try:
        check()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from err


def check_shapes(state_dict: Mapping[str, Any], prefix: str, expected: Mapping[str, tuple[tuple[int, ...], bool]],
                 required: set[str], source: str) -> None:
    """Each saved tensor under ``prefix`` has its expected shape and kind (float or not).

    ``expected`` maps a key to ``(shape, is_float)``, as ``source`` (named in the error) gives
    it; keys in ``required`` must be present.

    Raises:
        ValueError: naming the key.
    """
    for key, (shape, is_float) in expected.items():
        value = state_dict.get(prefix + key)
        if value is None:
            if key in required:
                raise ValueError(f"{prefix}{key} is missing: the modulation cannot be rebuilt without it")
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{prefix}{key}: expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape) or value.is_floating_point() != is_float or value.is_complex():
            kind = "float" if is_float else "integer"
            raise ValueError(f"{prefix}{key}: {source} gives a {kind} tensor of shape {tuple(shape)}, the "
                             f"checkpoint holds {value.dtype} of shape {tuple(value.shape)}")


#: How far ``||h||^2`` may exceed ``t * noise_var`` (its Cauchy-Schwarz bound) before a checkpoint is refused.
H_HISTORY_SLACK = 2.0


def check_state(state_dict: Mapping[str, Any], prefix: str, state_dim: int | None = None) -> None:
    """Check a checkpoint's RECM state under ``prefix`` before anything is loaded.

    ``h`` must be finite (and of size ``state_dim`` when given), ``t`` a non-negative
    integer, ``gamma_t`` a float in [0, 1] and ``noise_var`` a float ``>= 0``. An infinite
    ``noise_var`` loads: a capture whose ``||l||^2`` overflowed leaves one in the model, and a
    model's own ``state_dict`` must always load back.

    Raises:
        ValueError: naming the key and what is wrong with it.
    """
    h, t, g = (state_dict.get(prefix + k) for k in ("h", "t", "gamma_t"))
    if isinstance(h, Tensor):
        if not h.is_floating_point() or h.dim() != 1 or (state_dim is not None and h.numel() != state_dim):
            raise ValueError(f"{prefix}h must be a float vector of size {state_dim}, got {h.dtype} "
                             f"of shape {tuple(h.shape)}")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{prefix}h holds NaN/Inf values: the checkpoint is corrupt")
    if isinstance(t, Tensor) and (t.numel() != 1 or t.is_floating_point() or t.is_complex() or int(t) < 0):
        raise ValueError(f"{prefix}t must be one integer >= 0, got {t.dtype} {t.tolist()}")
    if isinstance(g, Tensor) and (g.numel() != 1 or not g.is_floating_point() or not 0 <= float(g) <= 1):
        raise ValueError(f"{prefix}gamma_t must be one float in [0, 1], got {g.dtype} {g.tolist()}")
    v = state_dict.get(prefix + "noise_var")
    if isinstance(v, Tensor) and (v.numel() != 1 or not v.is_floating_point() or not float(v) >= 0):
        raise ValueError(f"{prefix}noise_var must be one float >= 0, got {v.dtype} {v.tolist()}")
    # h = sum_k w_k l_k over the t commits and noise_var = sum_k w_k^2 ||l_k||^2, so by Cauchy-Schwarz
    # ||h||^2 <= t noise_var (equality for a constant l); twice that leaves room for rounding.
    if all(isinstance(x, Tensor) for x in (h, t, v)) and float(v) > 0 and math.isfinite(float(v)):
        bound = H_HISTORY_SLACK * int(t) * float(v)
        h_sq = float(h.double().pow(2).sum())
        if h_sq > bound:
            raise ValueError(f"{prefix}h is larger than its own history allows: ||h||^2 = {h_sq:.3g} > "
                             f"{H_HISTORY_SLACK:g} t noise_var = {bound:.3g} (h is a weighted sum of t captures whose "
                             "squared weights and norms give noise_var). The checkpoint was edited, or noise_var "
                             f"started mid-run; to load it anyway, set {prefix}noise_var to 0")
