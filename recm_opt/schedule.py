"""RECM's own step: how the modulation parameters learn, and the settings derived from the run length.

RECM trains its modulation parameters (``r_theta``, ``w_alpha``, ``w_beta``) with an update of its
own, whatever optimizer trains the model's weights: an Adam step (scale-free, so the tiny gradient
that reaches ``r_theta`` through ``gamma_t l_theta`` moves it as fast as the larger ones move
``w_alpha`` and ``w_beta``) with a step size that decays to zero at the end of the run. The user's
optimizer (AdamW, SGD, LBFGS, Muon, ...) trains the model's weights, unchanged.

Given the run length ``T`` (``total_steps=``, or read from an attached LR scheduler that knows it),
the defaults are::

    a       = min(1, 50 / T)                       # h reaches 98 % of its running mean by the end,
                                                   # half of it after 2 % of the run
    lr_0    = min(0.05, 0.5 / sqrt(T))             # the modulation's peak step size
    lr_k    = lr_0 * (1 + cos(pi * min(k, T) / T)) / 2     # k = steps taken so far: 0 at the end

Without a length RECM warns once and assumes an open-ended run: ``a = 5e-3`` (``T = 10^4``) and
the anytime step size ``lr_k = min(0.05, 0.5 / sqrt(k + 1))``, which also decays to zero. Explicit
values (``a=``, ``lr=``) win; ``lr=`` sets the peak and keeps the shape of the schedule.
"""

from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _sched

__all__ = ["RunDefaults", "modulation_lr", "run_defaults", "run_length"]

#: a * T: h keeps 1 / (1 + 50) of its zero start at the end of the run.
A_TIMES_T = 50.0
#: Peak step size times sqrt(T), and its cap for very short runs.
LR_TIMES_SQRT_T, LR_CAP = 0.5, 0.05
#: The run length assumed for ``a`` when none is known.
ASSUMED_STEPS = 10_000
BETAS = (0.9, 0.999)
#: Adam's epsilon: scale-free for gradients well above it (r_theta's, through gamma_t ~ 1 / t, stay
#: above 1e-7 for runs up to ~1e5 steps), and it damps rounding-level gradients whose exact value is 0.
EPS = 1e-8


@dataclass(frozen=True)
class RunDefaults:
    """The settings RECM derives from the run length (``total_steps=None``: an open-ended run).

    Example:
        >>> d = run_defaults(300)
        >>> round(d.a, 4), round(d.lr, 4), d.total_steps
        (0.1667, 0.0289, 300)
    """

    a: float
    lr: float
    total_steps: int | None


def run_defaults(total_steps: int | None) -> RunDefaults:
    """``a`` and the modulation's peak step size for a run of ``total_steps`` optimizer steps.

    Example:
        >>> run_defaults(None).a
        0.005
    """
    if total_steps is None:
        return RunDefaults(a=A_TIMES_T / ASSUMED_STEPS, lr=LR_CAP, total_steps=None)
    t = int(total_steps)
    return RunDefaults(a=min(1.0, A_TIMES_T / t), lr=min(LR_CAP, LR_TIMES_SQRT_T / math.sqrt(t)), total_steps=t)


def modulation_lr(k: int, peak: float, total_steps: int | None) -> float:
    """The modulation's step size at its ``k``-th step (``k = 0, 1, ...``).

    A half cosine from ``peak`` to 0 over ``total_steps`` (then 0: the modulation is frozen and ``h``
    converges for a fixed ``l_theta``); without a length, ``min(peak, 0.5 / sqrt(k + 1))``.

    Example:
        >>> modulation_lr(0, 0.01, 100), modulation_lr(100, 0.01, 100)
        (0.01, 0.0)
    """
    if total_steps is None:
        return min(peak, LR_TIMES_SQRT_T / math.sqrt(k + 1))
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(k, total_steps) / total_steps))


def run_length(scheduler: Any) -> int | None:
    """The number of optimizer steps a learning-rate scheduler runs for, when it says so.

    Known: ``OneCycleLR`` (``total_steps``), ``CosineAnnealingLR`` (``T_max``), ``PolynomialLR``
    (``total_iters``), ``LinearLR`` when it decays (``end_factor < start_factor``), ``SequentialLR``
    (its milestones plus its last scheduler's length), and ``LambdaLR`` whose lambdas are
    ``functools.partial`` with a ``num_training_steps`` keyword (the Hugging Face schedules).
    ``None`` for the others (warm-ups, restarts, plain lambdas, plateaus). The length is counted in
    the scheduler's own steps: a scheduler stepped once per epoch gives epochs.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> run_length(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500))
        500
    """
    if isinstance(scheduler, _sched.OneCycleLR):
        return int(scheduler.total_steps)
    if isinstance(scheduler, _sched.CosineAnnealingLR):
        return int(scheduler.T_max)
    if isinstance(scheduler, _sched.PolynomialLR):
        return int(scheduler.total_iters)
    if isinstance(scheduler, _sched.LinearLR):
        return int(scheduler.total_iters) if scheduler.end_factor < scheduler.start_factor else None
    if isinstance(scheduler, _sched.SequentialLR):
        last = run_length(scheduler._schedulers[-1])
        return None if last is None else int(scheduler._milestones[-1]) + last
    if isinstance(scheduler, _sched.LambdaLR):
        lengths = {int(n) for f in scheduler.lr_lambdas if isinstance(f, functools.partial)
                   if (n := f.keywords.get("num_training_steps")) is not None}
        return lengths.pop() if len(lengths) == 1 else None
    return None


def attached_schedulers(*optimizers: Optimizer) -> list[Any]:
    """The LR schedulers built on any of ``optimizers`` (found through the garbage collector's referrers).

    Only searched when a scheduler has patched an optimizer's ``step`` (torch's schedulers all do).
    """
    if not any(hasattr(getattr(o, "step", None), "_wrapped_by_lr_sched") for o in optimizers):
        return []
    ids = {id(o) for o in optimizers}
    out: list[Any] = []
    for ref in gc.get_referrers(*optimizers):
        owners = [ref] if not isinstance(ref, dict) else [r for r in gc.get_referrers(ref)
                                                            if getattr(r, "__dict__", None) is ref]
        for obj in owners:
            if isinstance(obj, _sched.LRScheduler) and id(obj.optimizer) in ids and obj not in out:
                out.append(obj)
    # the parts of a SequentialLR / ChainedScheduler are not schedules of their own
    parts = {id(s) for o in out for s in getattr(o, "_schedulers", [])}
    return [o for o in out if id(o) not in parts]


class ModulationStep:
    """Adam over the modulation parameters, with the step size set per step (no inner optimizer involved).

    Step counts are host integers, so a step reads nothing back from the device; parameters
    with the same count and dtype are updated together by ``torch._foreach_*`` ops (a handful
    of kernels per step, whatever the number of layers). The moments live here, keyed by
    parameter; :meth:`entry` and :meth:`load_entry` move one parameter's moments and step count
    in and out of its checkpoint entry (tensors of fixed shape, zeros before its first step).
    """

    def __init__(self) -> None:
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self.steps: dict[Tensor, int] = {}

    @torch.no_grad()
    def step(self, params: list[Tensor], lr: float, weight_decay: float = 0.0) -> None:
        """One Adam step on the parameters that have a gradient (decoupled weight decay)."""
        have = [p for p in params if p.grad is not None]
        if not have:
            return
        if weight_decay and lr:
            torch._foreach_mul_(have, 1.0 - lr * weight_decay)
        buckets: dict[tuple[torch.dtype, torch.device, int], list[Tensor]] = {}
        for p in have:
            if p not in self.state:
                self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            self.steps[p] = self.steps.get(p, 0) + 1
            buckets.setdefault((p.dtype, p.device, self.steps[p]), []).append(p)
        b1, b2 = BETAS
        for (dtype, _, k), ps in buckets.items():
            grads = [p.grad for p in ps]
            m = [self.state[p]["exp_avg"] for p in ps]
            v = [self.state[p]["exp_avg_sq"] for p in ps]
            eps = EPS if dtype in (torch.float32, torch.float64) else float(torch.finfo(dtype).eps)
            torch._foreach_lerp_(m, grads, 1 - b1)  # type: ignore[arg-type]
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1 - b2)  # type: ignore[arg-type]
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** k))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, m, denom, -lr / (1 - b1 ** k))

    def entry(self, p: Tensor) -> dict[str, Tensor]:
        """One parameter's moments and step count (zeros and 0 before its first step), for a checkpoint."""
        st = self.state.get(p)
        return {"recm_exp_avg": (st["exp_avg"] if st else torch.zeros_like(p)).detach().clone(),
                "recm_exp_avg_sq": (st["exp_avg_sq"] if st else torch.zeros_like(p)).detach().clone(),
                "recm_step": torch.tensor(float(self.steps.get(p, 0)))}

    @staticmethod
    def check_entry(where: str, p: Tensor, entry: dict[str, Any]) -> None:
        """Check one parameter's saved moments (all three keys or none).

        Raises:
            ValueError: naming the parameter and the key.
        """
        keys = ("recm_exp_avg", "recm_exp_avg_sq", "recm_step")
        present = [k for k in keys if k in entry]
        if not present:
            return
        if len(present) != 3:
            raise ValueError(f"{where}: has {present} but not {[k for k in keys if k not in present]}")
        for key, shape in zip(keys, (p.shape, p.shape, torch.Size())):
            v = entry[key]
            if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != shape:
                got = f"{v.dtype} of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{where}, {key}: expected a float tensor of shape {tuple(shape)}, got {got}")
            if not bool(torch.isfinite(v).all()) or (key != "recm_exp_avg" and bool((v < 0).any())):
                raise ValueError(f"{where}, {key}: holds NaN/Inf or negative values")
        if float(entry["recm_step"]) != int(float(entry["recm_step"])):
            raise ValueError(f"{where}, recm_step: expected a whole number, got {float(entry['recm_step'])}")
        moments = entry["recm_exp_avg"], entry["recm_exp_avg_sq"]
        if float(entry["recm_step"]) == 0 and any(bool(m.any()) for m in moments):
            raise ValueError(f"{where}, recm_exp_avg / recm_exp_avg_sq: not zero, but recm_step is 0")

    def load_entry(self, p: Tensor, entry: dict[str, Any]) -> bool:
        """Load one parameter's checked moments (:meth:`check_entry`); return whether the entry had them."""
        if "recm_step" not in entry:
            return False
        self.state.pop(p, None)
        self.steps.pop(p, None)
        k = int(float(entry["recm_step"]))
        if k > 0:
            self.steps[p] = k
            self.state[p] = {"exp_avg": entry["recm_exp_avg"].detach().to(p).clone(),
                             "exp_avg_sq": entry["recm_exp_avg_sq"].detach().to(p).clone()}
        return True

    def adopt(self, p: Tensor, state: dict[str, Any]) -> None:
        """Take an Adam-shaped state left by an inner Adam/AdamW (older checkpoints); ignore any other."""
        m, v, s = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
        if isinstance(m, Tensor) and isinstance(v, Tensor) and m.shape == p.shape == v.shape and s is not None:
            self.steps[p] = max(1, int(s))
            self.state[p] = {"exp_avg": m.detach().to(p).clone(), "exp_avg_sq": v.detach().to(p).clone()}
