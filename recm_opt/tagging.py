"""The ``relaxed`` decorator: marks a module as a relaxed-equivariant RECM layer.

A tagged layer defines two methods and the decorator supplies ``forward``::

    equivariant(*inputs)          -> the exactly equivariant term f_eq
    unconstrained(term, *inputs)  -> the unconstrained term f_un_i named ``term``

and computes ``f(z) = beta * f_eq(z) + sum_i alpha_i * f_un_i(z)``. With no
optimizer attached it returns ``f_eq(z)`` (alpha = 0, beta = 1). In eval mode it
uses the committed alpha and beta and skips pruned terms, exactly as
:func:`recm_opt.export` bakes them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from torch import Tensor, nn

from .reps import Representation

if TYPE_CHECKING:
    from .modulation import Modulation

__all__ = ["Relaxation", "get_relaxation", "is_relaxed", "relaxed"]

_TAG = "_recm_relaxation"
_MODULATION = "recm_modulation"
_BAKED = "_recm_baked"

M = TypeVar("M", bound="type[nn.Module] | nn.Module")


@dataclass(frozen=True)
class Relaxation:
    """What the ``relaxed`` decorator records about a layer.

    Attributes:
        inputs: representation of each tensor argument of ``equivariant``, by name.
        terms: for each unconstrained term, the attribute names of the parameters
            or submodules it owns (projected to the weight radius, removed on export).
    """

    inputs: Mapping[str, Representation]
    terms: Mapping[str, tuple[str, ...]]

    @property
    def term_names(self) -> tuple[str, ...]:
        """The K term names, in declaration order."""
        return tuple(self.terms)


def equivariant_parameters(target: Any) -> list[inspect.Parameter]:
    """The input parameters of ``target.equivariant``: on a class, without its first (``self``) one."""
    params = list(inspect.signature(target.equivariant).parameters.values())
    if isinstance(target, type) and not isinstance(inspect.getattr_static(target, "equivariant"), staticmethod):
        params = params[1:]  # the instance argument, whatever it is called
    return params


def _normalise_inputs(target: Any, inputs: Any) -> dict[str, Representation]:
    params = equivariant_parameters(target)
    if isinstance(inputs, Representation):
        inputs = {params[0].name: inputs} if params else {}
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a Representation or a mapping name -> Representation, got {inputs!r}")
    names = {p.name for p in params}
    for name, rep in inputs.items():
        if name not in names:
            raise ValueError(f"inputs names {name!r}, which is not an argument of equivariant{tuple(sorted(names))}")
        if not isinstance(rep, Representation):
            raise TypeError(f"inputs[{name!r}] must be a Representation, got {rep!r}")
    if not inputs:
        raise ValueError("inputs must declare at least one input representation")
    return dict(inputs)


def _normalise_terms(terms: Any) -> dict[str, tuple[str, ...]]:
    if isinstance(terms, Mapping):
        out = {str(k): (v,) if isinstance(v, str) else tuple(v) for k, v in terms.items()}
    elif isinstance(terms, Sequence) and not isinstance(terms, str):
        out = {str(k): () for k in terms}
    else:
        raise TypeError(f"terms must be a mapping term -> attribute name(s) or a sequence of names, got {terms!r}")
    if not out:
        raise ValueError("terms must name at least one unconstrained term")
    return out


def relaxed(target: M | None = None, *, inputs: Any, terms: Any = ("weight",)) -> Any:
    """Tag a module class or instance as a relaxed-equivariant layer.

    Args:
        target: an ``nn.Module`` subclass or instance; omit to use as a decorator factory.
        inputs: a :class:`~recm_opt.reps.Representation` for the first argument of
            ``equivariant``, or a mapping ``argument name -> Representation``.
            Arguments without a representation (and non-tensors) are ignored.
        terms: the unconstrained terms, as ``{name: attribute or (attributes, ...)}``
            naming the parameters/submodules each term owns, or just a list of names.

    Returns:
        The same class (or instance), tagged, with ``forward`` supplied.

    Raises:
        TypeError: if ``target`` is not an ``nn.Module`` class or instance, or lacks
            ``equivariant``/``unconstrained`` methods.

    Example:
        >>> import torch
        >>> from recm_opt.reps import Vector
        >>> @relaxed(inputs=Vector("b xyz"), terms={"weight": "un"})
        ... class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.un = nn.Linear(3, 3)
        ...     def equivariant(self, z):
        ...         return 2 * z
        ...     def unconstrained(self, term, z):
        ...         return self.un(z)
        >>> Scale()(torch.ones(1, 3))   # no optimizer attached: the equivariant part
        tensor([[2., 2., 2.]])
    """
    if target is None:
        return lambda t: relaxed(t, inputs=inputs, terms=terms)
    is_class = isinstance(target, type)
    if not (issubclass(cast(type, target), nn.Module) if is_class else isinstance(target, nn.Module)):
        raise TypeError(f"relaxed needs an nn.Module subclass or instance, got {target!r}")
    for method in ("equivariant", "unconstrained"):
        if not callable(getattr(target, method, None)):
            raise TypeError(f"{target!r} must define {method}(...) to be tagged as relaxed")
    tag = Relaxation(_normalise_inputs(target, inputs), _normalise_terms(terms))
    obj = cast(Any, target)
    if is_class:
        setattr(obj, _TAG, tag)
        obj.forward = _relaxed_forward
        if not getattr(obj, "_recm_loads_modulation", False):
            # Loading a checkpoint with RECM state into a fresh layer first creates its modulation.
            obj._recm_loads_modulation = True
            original = obj._load_from_state_dict

            def _load_from_state_dict(self: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
                _modulation_from_checkpoint(self, state_dict, prefix)
                original(self, state_dict, prefix, *args)

            obj._load_from_state_dict = _load_from_state_dict
    else:
        object.__setattr__(obj, _TAG, tag)
        # partial, not a bound method: deep copies and pickles of the instance keep working
        object.__setattr__(obj, "forward", functools.partial(_relaxed_forward, obj))
        if not obj.__dict__.get("_recm_loads_modulation", False):
            object.__setattr__(obj, "_recm_loads_modulation", True)
            obj.register_load_state_dict_pre_hook(_modulation_from_checkpoint_hook)
    return target


def _modulation_from_checkpoint(module: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Give a tagged layer the modulation a checkpoint holds for it, before its tensors load.

    A model saved with RECM state has ``<layer>.recm_modulation.*`` keys; a freshly built
    model has no modulation until an optimizer attaches one. Creating it here lets
    ``model.load_state_dict`` restore a trained model without an optimizer (evaluation,
    Lightning's resume, which restores the model before ``configure_optimizers``). An
    optimizer built afterwards adopts it, state included.

    The saved modulation is checked first (:func:`~recm_opt.modulation.check_saved`), and a
    new one is sized by the saved tensors, never by the saved configuration alone: a file
    of a few kB cannot make the load allocate more. (torch hands each layer only its own
    keys: with an optimizer attached, its pre-hook checks every layer before any loads.)
    """
    from .modulation import check_saved, modulation_from_config

    key = f"{prefix}{_MODULATION}."
    if _MODULATION in module._modules or not any(k.startswith(key) for k in state_dict):
        return
    tag = get_relaxation(module)
    assert tag is not None
    config = check_saved(state_dict, key, tag.term_names, rebuild=True)
    mod = modulation_from_config(tag.term_names, config)
    ref = next(iter(module.parameters()), None)
    if ref is not None and ref.is_floating_point():
        mod.to(device=ref.device, dtype=ref.dtype)
    module.add_module(_MODULATION, mod)


def _modulation_from_checkpoint_hook(module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                                     *_: Any) -> None:
    _modulation_from_checkpoint(module, state_dict, prefix)


def is_relaxed(module: nn.Module) -> bool:
    """Return whether ``module`` (class or instance) carries a ``relaxed`` tag."""
    return get_relaxation(module) is not None


def get_relaxation(module: nn.Module) -> Relaxation | None:
    """Return the :class:`Relaxation` recorded on ``module``, or ``None`` if it is not tagged."""
    tag = getattr(module, _TAG, None)
    return tag if isinstance(tag, Relaxation) else None


def is_trainable(module: nn.Module) -> bool:
    """Whether some parameter of the tagged layer itself (not of its modulation) requires grad.

    A layer none of whose parameters requires grad is frozen: the optimizer does not
    capture it, and its alpha and beta stay constant, so its output does not change.
    """
    for name, child in module.named_children():
        if name != _MODULATION and any(p.requires_grad for p in child.parameters()):
            return True
    return any(p is not None and p.requires_grad for p in module._parameters.values())


def _relaxed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``beta * f_eq + sum_i alpha_i f_un_i`` over the live terms (see module docstring).

    A layer with several outputs returns a tuple (or list) from both methods; each output
    is modulated by the same alpha and beta.
    """
    out = self.equivariant(*args, **kwargs)  # type: ignore[operator]
    baked = getattr(self, _BAKED, None)
    if baked is not None:  # an exported layer: constants, pruned terms removed
        alpha, beta, names = self.recm_alpha, self.recm_beta, baked
        live = (True,) * len(names)
    else:
        mod = cast("Modulation | None", self._modules.get(_MODULATION))
        if mod is None:  # no optimizer attached: the equivariant part alone
            return out
        # a frozen layer's modulation is frozen too: constant alpha and beta, no gradient into them
        alpha, beta = mod.term_coefficients(with_grad=self.training and is_trainable(self))
        names = mod.terms
        live = (True,) * len(names) if self.training and mod.train_all_live else mod.live
    out = _scaled(beta, out)
    for i, (name, on) in enumerate(zip(names, live)):
        if on:
            out = _added(out, alpha[i], self.unconstrained(name, *args, **kwargs), name)  # type: ignore[operator]
    return out


def _scaled(c: Tensor, out: Any) -> Any:
    """``c * out`` for a tensor output, elementwise for a tuple or list of them (a layer with several outputs)."""
    if isinstance(out, (tuple, list)):
        return type(out)(_scaled(c, o) for o in out)
    return c * out


def _added(out: Any, c: Tensor, term: Any, name: str) -> Any:
    """``out + c * term``, elementwise over tuples and lists of the same structure."""
    if isinstance(out, (tuple, list)):
        if not isinstance(term, (tuple, list)) or len(term) != len(out):
            raise TypeError(f"unconstrained({name!r}, ...) must return what equivariant(...) returns: a "
                            f"{type(out).__name__} of {len(out)} outputs, got {_kind(term)}")
        return type(out)(_added(o, c, u, name) for o, u in zip(out, term))
    if not isinstance(term, Tensor):
        raise TypeError(f"unconstrained({name!r}, ...) must return what equivariant(...) returns: a tensor, got "
                        f"{_kind(term)}")
    return out + c * term


def _kind(x: Any) -> str:
    return f"a {type(x).__name__} of {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
