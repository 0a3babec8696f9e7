"""The per-layer RECM state: ``h``, ``r_theta``, ``l_theta``, ``alpha``/``beta`` and ``gamma_t``.

Maths, for one tagged layer with state ``h in R^m``::

    gamma_t = a / (b + a t)                                  t = 1, 2, ...
    h_t     = (1 - gamma_t) h_{t-1} + gamma_t l_theta(z_t, y_t)
    l_theta(z, y) = mean_units[ r_theta(z, y) - mean_{g in C_G} r_theta(rho(g) z, rho(g) y) ]
    alpha_i = GELU(w_alpha_i . h_t),   beta = k(w_beta . h_t),   k(x) = 1 + tanh(x)

The only gradient path into ``theta`` is the newest term ``gamma_t l_theta``; the
history ``h_{t-1}`` is a constant. The forward pass uses the *value* of the
committed ``h_t`` and adds the newest term's gradient with a straight-through
construction (``h_t + gamma_t (l - stop_grad(l))``), so training, evaluation and
export all see the same alpha and beta, also across DDP ranks.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, cast

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ._validation import ALPHA_FNS, check_config, check_shapes, check_state, decode_config
from ._warn import warn

__all__ = ["ALPHA_FNS", "GELU_LIPSCHITZ", "Modulation", "alpha_map", "gamma", "kept_terms", "one_plus_tanh",
           "project_norm_"]

# Fast paths (``_foreach_*``, ``_stacked_*``, ``stacked_r_theta``) batch the per-layer
# maths across layers; each has a per-layer reference (``project_norm_``,
# ``Modulation.commit``, ``Modulation.reference_coefficients``, ``r_theta``) that
# tests/test_fast_path.py checks it against in float64. On a GPU they turn O(layers)
# small kernels and host syncs into O(1), which is what RECM's step costs there.

# max_x |d/dx GELU(x)| = max_x Phi(x) + x phi(x), attained at x = sqrt(2) (1.12890...); rounded up.
GELU_LIPSCHITZ = 1.129

# ALPHA_FNS, the maps ``s`` of ``alpha = s(w_alpha . h)``: ``"gelu"`` (the default), and ``"odd_gelu"``,
# ``s(x) = sign(x) GELU(|x|)``, odd and increasing, so it has no flat minimum where alpha can settle
# (GELU's, -0.16997 at x = -0.7518). Both have ``s(0) = 0``, ``|s(x)| <= |x|`` and ``|s'| <= GELU_LIPSCHITZ``.


def alpha_map(x: Tensor, alpha_fn: str = "gelu") -> Tensor:
    """``alpha = s(x)`` for the map named ``alpha_fn`` (see ``ALPHA_FNS``).

    Example:
        >>> alpha_map(torch.tensor([-1.0, 1.0]), "odd_gelu")
        tensor([-0.8413,  0.8413])
    """
    if alpha_fn == "odd_gelu":
        return torch.sign(x) * nn.functional.gelu(x.abs())
    return nn.functional.gelu(x)


def alpha_map_backward(grad: Tensor, x: Tensor, alpha_fn: str = "gelu") -> Tensor:
    """``grad * s'(x)``: the gradient through :func:`alpha_map` (``s'(x) = GELU'(|x|)`` for ``"odd_gelu"``)."""
    return torch.ops.aten.gelu_backward(grad, x.abs() if alpha_fn == "odd_gelu" else x)


def kept_terms(alpha: Tensor, h: Tensor, noise_var: Tensor | None, prune_eps: float, prune_z: float) -> Tensor:
    """Which terms are kept: ``|alpha_i| >= prune_eps``, and the layer's ``||h||^2 >= prune_z^2 noise_var``.

    ``noise_var`` is the realised variance of ``h`` under the hypothesis that the data are
    symmetric (see :meth:`Modulation.commit`), so the second test asks whether ``h`` stands
    out of its own sampling noise, whatever the scale of ``r_theta``. Batched: ``alpha``
    ``(..., K)``, ``h`` ``(..., m)``, ``noise_var`` ``(...)``. ``prune_z = 0`` (or no ``noise_var``):
    the first test alone.

    Example:
        >>> kept_terms(torch.tensor([0.5]), torch.tensor([0.1, 0.0]), torch.tensor(0.01), 0.01, 3.0)
        tensor([False])
    """
    keep = alpha.abs() >= prune_eps
    if prune_z > 0 and noise_var is not None:
        keep = keep & (torch.linalg.vecdot(h, h) >= prune_z ** 2 * noise_var)[..., None]
    return keep


def ranks_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over the DDP ranks (``x`` itself in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return x
    x = x.contiguous().clone()
    torch.distributed.all_reduce(x)
    return x / torch.distributed.get_world_size()


class _GlobalGrad(torch.autograd.Function):
    """Identity whose backward averages the incoming gradient over the DDP ranks.

    The newest term of ``h`` is ``gamma_t`` times the ranks' mean ``l``; each rank differentiates
    its own ``l``, so ``theta``'s gradient is ``J_r^T dL/dl`` with ``dL/dl`` of the whole batch
    (the ranks' mean), and the ranks' mean of that (the optimizer's gradient sync) is the
    one-process gradient. Without it, the mean of the per-rank products would differ.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        return ranks_mean(grad)


def gamma(t: int | Tensor, a: float, b: float = 1.0) -> float | Tensor:
    """Return the step size ``gamma_t = a / (b + a t)`` of the h recurrence (t counts from 1).

    Example:
        >>> gamma(1, a=1.0, b=1.0)
        0.5
    """
    return a / (b + a * t)


def one_plus_tanh(x: Tensor) -> Tensor:
    """The default beta map ``k(x) = 1 + tanh(x)``: ``k(0) = 1`` and beta stays in (0, 2)."""
    return 1 + torch.tanh(x)


def _inside(radius: float, n: Tensor) -> float:
    # Aim a few ulps inside the ball: scaled to exactly ``radius``, the recomputed norm
    # lands one ulp above it about one time in ten, and a second projection would then
    # move the tensor again. Projected points must be fixed points (a step that moves
    # nothing must change nothing), so they are placed where rounding cannot push them out.
    return radius * (1 - 8 * torch.finfo(n.dtype).eps) if n.dtype in (torch.float32, torch.float64) else radius


@torch.no_grad()
def project_norm_(tensors: Sequence[Tensor], radius: float, dim: int | None = None) -> None:
    """Project each tensor in place onto the ball ``norm <= radius`` (Euclidean / Frobenius).

    With ``dim`` set, each slice along ``dim`` is projected separately (rows of
    ``w_alpha``). Projection is idempotent, and tensors inside the ball are untouched.

    Example:
        >>> w = torch.tensor([3.0, 4.0]); project_norm_([w], 1.0); w
        tensor([0.6000, 0.8000])
    """
    for x in tensors:
        # An inf entry times the 0-scale below would be NaN; as the largest finite value it
        # gives an overflowing (inf) norm like any other too-large tensor, which is reset to 0.
        x.clamp_(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
        n = x.norm() if dim is None else x.norm(dim=dim, keepdim=True)
        # where() rather than clamp on the scale so that an inf norm yields a finite 0-scale
        scale = torch.where(n > radius, _inside(radius, n) / n, torch.ones_like(n))
        x.mul_(torch.nan_to_num(scale, nan=0.0))


@torch.no_grad()
def _foreach_project_norm_(tensors: Sequence[Tensor], radius: float, rows: bool = False) -> None:
    """Batched :func:`project_norm_`: the same projections with a fixed number of kernels.

    Whole-tensor norms (``rows=False``) use one ``_foreach_norm``; row norms
    (``rows=True``, 2-D tensors of equal width, i.e. ``project_norm_(..., dim=1)``)
    are taken on the concatenated rows. Tensors are grouped by dtype and device
    (and width), so any mix is accepted.
    """
    groups: dict[tuple, list[Tensor]] = {}
    for x in tensors:
        key = (_is_dtensor(x), x.dtype, x.device, x.shape[-1] if rows else None)  # FSDP2's DTensors apart
        groups.setdefault(key, []).append(x)
    for xs in groups.values():
        top = torch.finfo(xs[0].dtype).max  # inf entries -> largest finite: 0-scaled to 0, not NaN
        torch._foreach_clamp_min_(xs, -top)
        torch._foreach_clamp_max_(xs, top)
        if rows:
            n = torch.cat(list(xs)).norm(dim=1, keepdim=True)
        else:
            n = torch.stack(torch._foreach_norm(xs))
        # n > radius is False for a NaN norm (kept) and r / inf = 0 for an infinite one (reset to 0)
        scale = torch.where(n > radius, _inside(radius, n) / n, 1.0)
        parts = scale.split([x.shape[0] for x in xs]) if rows else scale.unbind()
        torch._foreach_mul_(xs, list(parts))


def _is_dtensor(x: Tensor) -> bool:
    """Whether ``x`` is a DTensor (FSDP2 shards parameters as DTensors; foreach ops cannot mix them with tensors)."""
    return type(x).__name__ == "DTensor" and hasattr(x, "full_tensor")


def _in_backward() -> bool:
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _in_reentrant_recompute() -> bool:
    """Whether this forward is reentrant activation checkpointing's recomputation (inside its backward)."""
    if not _in_backward():
        return False
    code = torch.utils.checkpoint.CheckpointFunction.backward.__code__
    frame: FrameType | None = sys._getframe(1)
    for _ in range(64):  # a forward hook or module call sits a few frames below the checkpoint's backward
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """``nn.Linear`` initialised from a private seeded generator, ``U(-1/sqrt(in), 1/sqrt(in))``.

    The private generator keeps the initialisation identical across DDP ranks and off
    the user's global RNG stream.
    """
    layer = nn.Linear(in_features, out_features)
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)
    return layer


# Modulation classes by ``kind``: a checkpoint names the kind, so that loading it into a fresh
# model rebuilds the right class (policies register their own kinds by subclassing).
_KINDS: dict[str, type[Modulation]] = {}


def config_to_tensor(config: dict[str, Any]) -> Tensor:
    """A configuration as a uint8 tensor of its compact, key-sorted JSON."""
    return torch.tensor(list(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()), dtype=torch.uint8)


def config_from(value: Any, key: str = "_extra_state") -> Any:
    """The configuration a checkpoint holds (a uint8 JSON tensor, or a plain dict); other values unchanged.

    Raises:
        ValueError: naming ``key`` when the stored bytes are not UTF-8 JSON.
    """
    return decode_config(value, key)


def saved_config(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The configuration of the modulation saved under ``prefix``, checked (:func:`check_saved` checks the rest).

    A checkpoint from recm_opt 0.1 has no configuration: only the standard kind existed,
    and its sizes are read from the saved ``w_beta`` and ``r_theta``.

    Raises:
        ValueError: naming the key, for corrupt bytes, an unknown kind or a value the
            constructor would refuse.
    """
    key = prefix + "_extra_state"
    config = config_from(state_dict.get(key), key)
    if config is None:
        weight, w_beta = state_dict.get(prefix + "r_theta.0.weight"), state_dict.get(prefix + "w_beta")
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(w_beta, Tensor):
            raise ValueError(f"{prefix[:-1]}: the checkpoint's modulation has no configuration and no "
                             "materialised r_theta; it cannot be rebuilt (train one step before saving)")
        config = {"kind": "recm", "state_dim": w_beta.numel(), "hidden": weight.shape[0],
                  "in_features": weight.shape[1]}
    check_config(config, key, _KINDS)
    return dict(config)


# (kind, terms, config) -> {key: (shape, is_float)} and the parameter keys: shapes read from a meta-device build
_SHAPES: dict[str, tuple[dict[str, tuple[tuple[int, ...], bool]], set[str]]] = {}


def expected_shapes(terms: Sequence[str], config: dict[str, Any], prefix: str = ""
                    ) -> tuple[dict[str, tuple[tuple[int, ...], bool]], set[str]]:
    """The tensors a modulation of ``config`` holds, ``{key: (shape, is_float)}``, and its parameters' keys.

    Built on the meta device: nothing is allocated, whatever sizes the configuration names.

    Raises:
        ValueError: if the configuration does not build.
    """
    cache_key = json.dumps([list(terms), config], sort_keys=True, default=str)
    if cache_key not in _SHAPES:
        try:
            with torch.device("meta"):
                mod = _KINDS[config["kind"]].from_config(tuple(terms), config)
        except Exception as err:  # a configuration no constructor accepts
            raise ValueError(f"{prefix}_extra_state: the saved configuration does not build a modulation "
                             f"({type(err).__name__}: {err})") from err
        shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in mod.state_dict().items()
                  if isinstance(v, Tensor) and not k.endswith("_extra_state")}
        _SHAPES[cache_key] = (shapes, {k for k, _ in mod.named_parameters()})
    return _SHAPES[cache_key]


def check_saved(state_dict: Mapping[str, Any], prefix: str, terms: Sequence[str] | None = None,
                rebuild: bool = False) -> dict[str, Any]:
    """Check everything a checkpoint holds for one modulation, allocating nothing; return its configuration.

    The configuration as the constructor checks its arguments, every saved tensor's shape
    against the configuration, and the state's values (:func:`check_state`). With
    ``rebuild`` (a fresh layer about to create the modulation) every parameter must be saved,
    so that no size is taken from the configuration alone.

    Raises:
        ValueError: naming the key.
    """
    config = saved_config(state_dict, prefix)
    saved_terms = config.get("terms", ())
    if not isinstance(saved_terms, (list, tuple)) or not all(isinstance(n, str) for n in saved_terms):
        raise ValueError(f"{prefix}_extra_state: terms must be a list of names, got {saved_terms!r}")
    names = tuple(terms) if terms is not None else tuple(saved_terms)
    w_alpha = state_dict.get(prefix + "w_alpha")
    if terms is None and "terms" not in config and isinstance(w_alpha, Tensor) and w_alpha.dim() == 2:
        names = tuple(f"term{i}" for i in range(w_alpha.shape[0]))  # recm_opt 0.1 saved no names
    if terms is not None and "terms" in config and tuple(config["terms"]) != names:
        raise ValueError(f"{prefix}_extra_state: the checkpoint's terms {tuple(config['terms'])} differ from the "
                         f"layer's {names}")
    shapes, params = expected_shapes(names, config, prefix)
    check_shapes(state_dict, prefix, shapes, params if rebuild else set(),
                 f"the saved configuration ({prefix}_extra_state)")
    check_state(state_dict, prefix, shapes["h"][0][0] if "h" in shapes else None)
    return config


def modulation_from_config(terms: Sequence[str], config: dict[str, Any]) -> Modulation:
    """Rebuild an (untrained) modulation from the ``config()`` a checkpoint carries.

    Loaders call :func:`check_saved` first, so that the sizes are those of the saved tensors.

    Raises:
        ValueError: if the checkpoint names a kind no imported class registered.
    """
    check_config(config, "_extra_state", _KINDS, tuple(terms))
    return _KINDS[config["kind"]].from_config(terms, config)


class Modulation(nn.Module):
    """RECM's learned modulation of one tagged layer (created by ``RECMOptimizer``).

    Parameters (trained by the wrapped optimizer): ``r_theta`` (2-layer GELU MLP),
    ``w_alpha`` (K x m) and ``w_beta`` (m). Buffers, saved in the model's
    ``state_dict`` like BatchNorm's running statistics: ``h``, ``gamma_t``, ``t`` and
    ``noise_var`` (h's realised noise variance, for pruning).
    The configuration (kind, sizes, ``prune_eps``, ``prune_z``, ``alpha_fn``) travels as the module's extra
    state, so that loading a checkpoint into a fresh model rebuilds the modulation.

    Args:
        terms: the names of the K unconstrained terms.
        state_dim: m, the size of ``h``.
        hidden: width of ``r_theta``'s hidden layer.
        seed: seed of the private generator that initialises the parameters.
        beta_fn: the map ``k`` with ``k(0) = 1``.
        in_features: width of ``r_theta``'s input: the per-unit features of the
            layer's inputs and of the target.
    """

    kind = "recm"

    # Buffers and parameters, typed for readers and mypy (nn.Module.__getattr__ is untyped).
    h: Tensor
    gamma_t: Tensor
    t: Tensor
    newest: Tensor | None
    w_alpha: nn.Parameter
    w_beta: nn.Parameter
    r_theta: nn.Sequential
    beta_fn: Callable[[Tensor], Tensor]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    def __init__(
        self,
        terms: Sequence[str],
        state_dim: int = 16,
        hidden: int = 16,
        seed: int = 0,
        beta_fn: Callable[[Tensor], Tensor] = one_plus_tanh,
        *,
        in_features: int,
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        g = torch.Generator().manual_seed(seed)
        self.terms = tuple(terms)
        self.r_theta = nn.Sequential(_seeded_linear(in_features, hidden, seed + 1), nn.GELU(),
                                     nn.Linear(hidden, state_dim))
        bound = 1 / math.sqrt(hidden)
        with torch.no_grad():
            for p in self.r_theta[2].parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        w = torch.randn(len(self.terms), state_dim, generator=g) / math.sqrt(state_dim)
        self.w_alpha = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp(min=1.0))
        self._init_state(state_dim, beta_fn)

    def _init_state(self, state_dim: int, beta_fn: Callable[[Tensor], Tensor]) -> None:
        """``w_beta`` (zero: beta = 1), the buffers ``h``, ``gamma_t``, ``t`` and the optimizer's slots."""
        self.w_beta = nn.Parameter(torch.zeros(state_dim))
        self.beta_fn = beta_fn
        self.register_buffer("h", torch.zeros(state_dim))
        self.register_buffer("gamma_t", torch.zeros(()))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))
        # sum_t (gamma_t prod_{s>t} (1 - gamma_s))^2 ||l_t||^2: what E ||h||^2 is when E[l_theta] = 0
        self.register_buffer("noise_var", torch.zeros(()))
        # Filled by the optimizer: the stacked (1 + |C_G|, S, d) sample behind h's newest term.
        # Not a buffer (its shape is the last batch's, and AveragedModel copies buffers between
        # models); _apply moves it with .to() / .double(); the optimizer's state_dict saves it.
        self.newest = None
        self.live: tuple[bool, ...] = (False,) * len(self.terms)
        self.train_all_live = True
        self.prune_eps = 0.01
        self.prune_z = 3.0
        self.alpha_fn = "gelu"

    # ----------------------------------------------------------- configuration
    @property
    def in_features(self) -> int:
        """Width of ``r_theta``'s input (per-unit features of the inputs and the target)."""
        return int(cast(nn.Linear, self.r_theta[0]).in_features)

    def config(self) -> dict[str, Any]:
        """The plain-value description that rebuilds this modulation (:func:`modulation_from_config`)."""
        return {"kind": self.kind, "terms": list(self.terms), "state_dim": self.h.numel(),
                "hidden": cast(nn.Linear, self.r_theta[0]).out_features, "in_features": self.in_features,
                **self._eval_config()}

    def _eval_config(self) -> dict[str, Any]:
        beta = getattr(self.beta_fn, "__qualname__", None) if self.beta_fn is not one_plus_tanh else "one_plus_tanh"
        return {"prune_eps": float(self.prune_eps), "prune_z": float(self.prune_z), "alpha_fn": self.alpha_fn,
                "train_all_live": bool(self.train_all_live), "beta_fn": beta}

    @classmethod
    def from_config(cls, terms: Sequence[str], config: dict[str, Any]) -> Modulation:
        """Build an untrained modulation of this kind from :meth:`config` (its tensors load afterwards)."""
        return cls(terms, int(config["state_dim"]), int(config["hidden"]), in_features=int(config["in_features"]))

    def get_extra_state(self) -> Tensor:
        """The configuration as UTF-8 JSON bytes in a uint8 tensor.

        A tensor, so that every checkpoint format takes it: ``weights_only`` loading,
        safetensors (the Hugging Face Trainer's default) and distributed checkpointing.
        """
        return config_to_tensor(self.config())

    def set_extra_state(self, state: Any) -> None:
        """Apply a saved configuration's settings (``prune_eps``, ``prune_z``, ``alpha_fn``, ``train_all_live``).

        One rule, whatever the order of building and loading: while an optimizer drives
        this layer, its own settings stay (a checkpoint that differs gets a warning naming
        them); otherwise the checkpoint's apply. An optimizer built after the load likewise
        replaces them with its own (:meth:`adopt_settings`).

        Raises:
            ValueError: for another kind, or a value the constructor would refuse.
        """
        state = config_from(state)
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            kind = state.get("kind") if isinstance(state, dict) else state
            raise ValueError(f"checkpoint holds a modulation of kind {kind!r}, this layer has {self.kind!r}")
        check_config(state, "_extra_state", _KINDS, self.terms)
        saved = {"prune_eps": float(state.get("prune_eps", self.prune_eps)),
                 "prune_z": float(state.get("prune_z", 0.0)),  # a checkpoint from before the noise test: eps alone
                 "alpha_fn": state.get("alpha_fn", "gelu"),
                 "train_all_live": bool(state.get("train_all_live", self.train_all_live))}
        ref = self.__dict__.get("_owner")
        if ref is not None and ref() is not None:
            self._warn_replaced({k: saved[k] for k in ("prune_eps", "prune_z", "alpha_fn")}, "the checkpoint's",
                                "the optimizer's, which drives this layer")
        else:
            for k, v in saved.items():
                setattr(self, k, v)
        beta = state.get("beta_fn", "one_plus_tanh")
        if beta != "one_plus_tanh" and self.beta_fn is one_plus_tanh:
            warn(f"the checkpoint's modulation used beta_fn {beta!r}, which is not saved; pass it again "
                          "(RECMOptimizer(beta_fn=...)) before using the model")

    def adopt_settings(self, *, prune_eps: float, prune_z: float, alpha_fn: str, train_all_live: bool,
                       beta_fn: Callable[[Tensor], Tensor], warn: bool) -> None:
        """Take an optimizer's settings; with ``warn``, name those that replace different ones this layer held."""
        new = {"prune_eps": float(prune_eps), "prune_z": float(prune_z), "alpha_fn": alpha_fn,
               "train_all_live": bool(train_all_live)}
        if warn:  # the settings that change the model's function (train_all_live only changes training)
            self._warn_replaced({k: getattr(self, k) for k in ("prune_eps", "prune_z", "alpha_fn")},
                                "the layer's (loaded or left by an earlier optimizer)", "this optimizer's", current=new)
        for k, v in new.items():
            setattr(self, k, v)
        self.beta_fn = beta_fn

    def _warn_replaced(self, old: dict[str, Any], old_name: str, new_name: str,
                       current: dict[str, Any] | None = None) -> None:
        now = current if current is not None else {k: getattr(self, k) for k in old}
        differ = [f"{k}={old[k]!r} -> {now[k]!r}" for k in old if old[k] != now[k]]
        if differ:
            warn(f"{type(self).__name__}{self.terms}: {old_name} settings are replaced by {new_name} "
                          f"({', '.join(differ)}); build the optimizer with the settings you want in either "
                          "order of loading and building")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # Everything is checked before any tensor of this modulation loads.
        if all(prefix + k not in state_dict for k in ("h", "t", "gamma_t")) and prefix + "w_beta" in state_dict:
            # recm_opt 0.1 kept h, t and gamma_t in the optimizer's state_dict only (torch does not
            # tell this hook whether the load is strict: a strict one fails on the missing keys)
            warn(
                f"{prefix}h, {prefix}t, {prefix}gamma_t are missing: the checkpoint was saved by recm_opt 0.1, "
                "which kept them in the optimizer's state_dict. Convert it by loading both: "
                "model.load_state_dict(model_sd, strict=False), then opt.load_state_dict(opt_sd), which moves "
                "them into the model; save the model again to get the current format")
        if any(k.startswith(prefix) for k in state_dict):
            self.check_fits(state_dict, prefix)
        if prefix + "noise_var" not in state_dict and prefix + "h" in state_dict:
            # saved before h's noise variance was kept: start it at 0 (the noise test then waits for it to
            # build up again), as BatchNorm fills in num_batches_tracked for its old checkpoints
            state_dict[prefix + "noise_var"] = torch.zeros((), dtype=self.noise_var.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.refresh_live()

    def check_fits(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Check what a checkpoint holds under ``prefix`` (:func:`check_saved`) and that it fits this modulation.

        Raises:
            ValueError: naming the key.
        """
        if prefix + "_extra_state" in state_dict:
            config = check_saved(state_dict, prefix, self.terms)
            mine = self.config()
            for k in ("state_dim", "hidden", "in_features"):
                if k in config and k in mine and config[k] != mine[k]:
                    raise ValueError(f"{prefix}_extra_state: the checkpoint's modulation has {k}={config[k]!r}, "
                                     f"this layer's has {mine[k]!r}")
        shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in self.state_dict().items()
                  if isinstance(v, Tensor) and not k.endswith("_extra_state")}
        check_shapes(state_dict, prefix, shapes, set(), "this layer's modulation")
        check_state(state_dict, prefix, self.h.numel())

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Modulation:  # type: ignore[override]
        out = super()._apply(fn, recurse)
        if self.newest is not None:
            self.newest = fn(self.newest)
        return out

    @torch.no_grad()
    def kept(self, prune_eps: float | None = None) -> Tensor:
        """Which terms are kept (:func:`kept_terms`), with this layer's ``prune_eps`` unless one is given."""
        eps = self.prune_eps if prune_eps is None else prune_eps
        return kept_terms(self.coefficients()[0], self.h, self.noise_var, eps, self.prune_z)

    @torch.no_grad()
    def refresh_live(self) -> None:
        """Recompute which terms are kept (:meth:`kept`) from the current state."""
        self.live = tuple(bool(a) for a in self.kept().tolist())

    def __getstate__(self) -> dict[str, Any]:
        # The owning optimizer and the step-time graph belong to one process and one run.
        state = dict(self.__dict__)
        state.pop("_owner", None)
        return state

    def l_theta(self, sample: Tensor) -> Tensor:
        """Return ``l_theta`` for a stacked sample ``(1 + k, S, d)``: identity copy first.

        ``r_theta`` runs once over every generator copy (one batched call).
        """
        r = self.r_theta(sample)
        return r[0].mean(0) - r[1:].mean((0, 1))

    def state_value(self, with_grad: bool) -> Tensor:
        """Return ``h_t``; with ``with_grad`` its newest term carries the gradient into theta."""
        if not with_grad or self.newest is None:
            return self.h
        l = self.l_theta(self.newest)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            l = _GlobalGrad.apply(l)
        return self.h + self.gamma_t * (l - l.detach())

    def coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Return ``(alpha, beta)``: ``alpha = GELU(w_alpha h)`` (K,) and ``beta = k(w_beta . h)``.

        With ``with_grad``, the owning optimizer computes them for all its layers at once
        (one batched autograd function, see ``RECMOptimizer(foreach=...)``); without an
        owner, or with ``foreach=False``, this layer computes them alone
        (:meth:`reference_coefficients`). Both give the same values and gradients.
        """
        if with_grad and not torch.compiler.is_compiling():
            ref = self.__dict__.get("_owner")
            owner = ref() if ref is not None else None
            book = getattr(owner, "_coefficients", None)
            if book is not None:
                alpha, beta = book.term_coefficients(self)
                return torch.stack(list(alpha)), beta
        return self.reference_coefficients(with_grad)

    def term_coefficients(self, with_grad: bool = False) -> tuple[Sequence[Tensor], Tensor]:
        """:meth:`coefficients` with alpha as one 0-d tensor per term (what a tagged forward uses)."""
        if with_grad and not torch.compiler.is_compiling() and type(self).coefficients is Modulation.coefficients:
            ref = self.__dict__.get("_owner")
            owner = ref() if ref is not None else None
            book = getattr(owner, "_coefficients", None)
            if book is not None:
                return book.term_coefficients(self)
        alpha, beta = self.coefficients(with_grad)
        return alpha.unbind(0), beta

    def reference_coefficients(self, with_grad: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`coefficients` of this layer alone: the per-layer reference of the batched path."""
        h = self.state_value(with_grad)
        alpha = alpha_map(self.w_alpha @ h, self.alpha_fn)
        beta = self.beta_fn(self.w_beta @ h)
        return alpha, beta

    def cancelling_parameters(self) -> list[Tensor]:
        """Parameters whose exact gradient is 0: ``r_theta``'s output bias cancels in ``l_theta``.

        ``l_theta = r_theta(z) - mean_g r_theta(g z)`` subtracts the bias from itself, so RECM's own
        update does not step it (a scale-free step would turn the rounding noise of its computed
        gradient into motion).
        """
        return [self.r_theta[2].bias] if isinstance(getattr(self, "r_theta", None), nn.Sequential) else []

    def lipschitz_bound(self) -> float:
        """Return B, a certified Lipschitz constant of ``r_theta``: ``||W2|| * Lip(GELU) * ||W1||`` (spectral norms)."""
        w1, w2 = cast(Tensor, self.r_theta[0].weight), cast(Tensor, self.r_theta[2].weight)
        s = torch.linalg.matrix_norm(w1.detach().double(), 2) * torch.linalg.matrix_norm(w2.detach().double(), 2)
        return float(s) * GELU_LIPSCHITZ

    @torch.no_grad()
    def commit(self, l: Tensor, a: float, b: float) -> Tensor:
        """Advance one step: ``t += 1``, ``h <- (1 - gamma_t) h + gamma_t l`` and the noise variance.

        ``l`` is first capped at :func:`outlier_scale`'s bound (one capture far out of range must
        not steer ``h``); the returned bool tensor says whether it was.

        ``noise_var <- (1 - gamma_t)^2 noise_var + gamma_t^2 ||l||^2``: the realised variance of
        ``h``'s increments. When the data are symmetric, ``E[l_theta] = 0`` at every step whatever
        theta does, ``h`` is a martingale and ``E ||h||^2 = E noise_var``.
        """
        scale = outlier_scale(l.double().pow(2).sum(), self.t, self.gamma_t, self.noise_var)
        l = (l.double() * scale).to(self.h.dtype)
        self.t += 1
        self.gamma_t.copy_(cast(Tensor, gamma(self.t.to(self.h.dtype), a, b)))
        self.h.lerp_(l, self.gamma_t)  # (1 - gamma_t) h + gamma_t l
        g = self.gamma_t.to(self.noise_var.dtype)
        self.noise_var.mul_((1 - g) ** 2).add_(g ** 2 * l.pow(2).sum().to(self.noise_var.dtype))
        return scale < 1

    def extra_repr(self) -> str:  # noqa: D102
        return f"terms={self.terms}, state_dim={self.h.numel()}"


_KINDS[Modulation.kind] = Modulation


# --------------------------------------------------------------------------- fast paths
def is_standard(mod: Modulation) -> bool:
    """Return whether ``mod`` computes exactly the maths of :class:`Modulation` (batchable).

    Subclasses that override ``l_theta``, ``coefficients``, ``state_value`` or ``commit``,
    or an ``r_theta`` that is not ``Linear -> GELU -> Linear``, take the per-layer path.
    """
    r = getattr(mod, "r_theta", None)
    if r is not None and mod.__dict__.get("_standard_r") is r:  # checked before: only changes with r_theta
        return True
    standard = (
        all(getattr(type(mod), f) is getattr(Modulation, f)
            for f in ("l_theta", "coefficients", "term_coefficients", "reference_coefficients", "state_value",
                      "commit"))
        and isinstance(r, nn.Sequential) and len(r) == 3
        and isinstance(r[0], nn.Linear) and type(r[1]) is nn.GELU and isinstance(r[2], nn.Linear)
        and r[1].approximate == "none" and r[0].bias is not None and r[2].bias is not None
    )
    if standard:
        mod.__dict__["_standard_r"] = r
    return standard


def _r_theta_tensors(mod: Modulation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W1, b1, W2, b2)`` of a standard modulation's ``r_theta``."""
    first, last = cast(nn.Linear, mod.r_theta[0]), cast(nn.Linear, mod.r_theta[2])
    return first.weight, first.bias, last.weight, last.bias


def stacked_r_theta(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    """``r_theta`` of G layers from their stacked weights: ``(G, R, d) -> (G, R, m)``.

    Computed transposed (``W x^T``), so that the weights' gradients come out contiguous.
    """
    hidden = nn.functional.gelu(torch.baddbmm(b1.unsqueeze(2), w1, x.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(2), w2, hidden).transpose(1, 2)


def _stacked_r_theta(mods: Sequence[Modulation], x: Tensor) -> Tensor:
    """``r_theta`` of G standard modulations with equal shapes in one call: ``(G, R, d) -> (G, R, m)``."""
    w1, b1, w2, b2 = (torch.stack(list(ts)) for ts in zip(*(_r_theta_tensors(m) for m in mods)))
    return stacked_r_theta(w1, b1, w2, b2, x)


@torch.no_grad()
def _stacked_alpha(mods: Sequence[Modulation], h: Tensor | None = None) -> Tensor:
    """``alpha`` of G standard modulations (same dtype, device and m), concatenated: ``(sum K,)``.

    Same maths as ``coefficients()[0]`` (``GELU(w_alpha h)``) without the per-layer calls.
    """
    fn = mods[0].alpha_fn
    if all(m.w_alpha.shape == mods[0].w_alpha.shape for m in mods):  # the usual case: one bmm
        w = torch.stack([m.w_alpha for m in mods])  # (G, K, m)
        h = torch.stack([m.h for m in mods]) if h is None else h
        return alpha_map(torch.bmm(w, h[..., None]).reshape(-1), fn)
    w = torch.cat([m.w_alpha for m in mods])  # (sum K, m)
    h = torch.cat([m.h.expand(len(m.terms), -1) for m in mods])  # each layer's h once per term row
    return alpha_map((w * h).sum(1), fn)


#: A capture's ``||l||^2`` is capped at this many times the mean ``||l||^2`` of the captures before it.
OUTLIER_CAP = 100.0
#: Commits before the cap applies: the mean of the captures so far is its reference, and a mean of fewer
#: captures is too noisy (one small first capture would cap ordinary ones after it).
OUTLIER_AFTER = 10


def outlier_scale(q: Tensor, t: Tensor, gamma_t: Tensor, noise_var: Tensor) -> Tensor:
    """The factor in (0, 1] that caps a capture's ``||l||^2 = q`` at ``OUTLIER_CAP`` times its history's mean.

    With ``gamma_t = a / (b + a t)`` every committed ``l`` carries the same weight ``gamma_t`` in
    ``h_t`` (the closed form), so ``noise_var_t = gamma_t^2 sum_k ||l_k||^2`` and the mean square of
    the ``t`` captures so far is ``M = noise_var_t / (gamma_t^2 t)``; no new state is needed. A capture
    over the cap is scaled down to it: one sample far out of range (a 1e30 input) moves ``h`` by at
    most ``gamma_t sqrt(OUTLIER_CAP M)``, and a real change of scale passes after a few steps,
    since each capped capture raises ``M`` by up to ``OUTLIER_CAP / t`` of itself. Before
    ``OUTLIER_AFTER`` commits, or with ``noise_var = 0`` (no history), nothing is capped.
    Batched over leading dimensions; computed in float64.

    Example:
        >>> outlier_scale(torch.tensor(400.0), torch.tensor(10), torch.tensor(0.1), torch.tensor(0.1))
        tensor(0.5000, dtype=torch.float64)
    """
    q, g, v = q.double(), gamma_t.double(), noise_var.double()
    mean = v / (g.square() * t.double()).clamp(min=torch.finfo(torch.float64).tiny)
    cap = OUTLIER_CAP * mean
    over = (t >= OUTLIER_AFTER) & (v > 0) & (q > cap)
    return torch.where(over, (cap / q.clamp(min=torch.finfo(torch.float64).tiny)).sqrt(), torch.ones_like(q))


@torch.no_grad()
def _foreach_commit(mods: Sequence[Modulation], ls: Tensor, a: float, b: float) -> Tensor:
    """Batched :meth:`Modulation.commit` for G standard modulations (same dtype, device, m).

    A layer whose ``l`` (row of ``ls``, ``(G, m)``) is not finite is left unchanged,
    decided on the device so that no host sync is needed.

    Returns:
        The ``(2, G)`` bool tensor: the layers that committed, and those whose ``l`` was capped
        (:func:`outlier_scale`).
    """
    h = torch.stack([m.h for m in mods])
    ok = ls.mul(0).sum(1) == 0  # 0 * finite = 0 exactly; 0 * inf and 0 * nan are NaN
    t_old, v = torch.stack([m.t for m in mods]), torch.stack([m.noise_var for m in mods])
    scale = outlier_scale(torch.linalg.vecdot(ls.double(), ls.double()), t_old,
                          torch.stack([m.gamma_t for m in mods]), v)
    ls = (ls.double() * scale[:, None]).to(h.dtype)
    t = t_old + ok.long()
    g = torch.where(ok, gamma(t.to(h.dtype), a, b), torch.stack([m.gamma_t for m in mods]))
    new = torch.where(ok[:, None], torch.lerp(h, ls, g[:, None]), h)
    gv = g.to(v.dtype)  # (1 - g)^2 v + g^2 ||l||^2 on the committed rows
    v_new = torch.where(ok, torch.addcmul((1 - gv).square() * v, gv.square(), torch.linalg.vecdot(ls, ls)), v)
    torch._foreach_copy_([m.noise_var for m in mods], list(v_new.unbind()))
    torch._foreach_copy_([m.h for m in mods], list(new.unbind()))
    torch._foreach_copy_([m.t for m in mods], list(t.unbind()))
    torch._foreach_copy_([m.gamma_t for m in mods], list(g.unbind()))
    return torch.stack([ok, ok & (scale < 1)])
