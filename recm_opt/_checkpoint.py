"""Checkpointing for :class:`~recm_opt.optimizer.RECMOptimizer`: ``state_dict``, ``load_state_dict``, resume.

The RECM state of each layer (``h``, ``t``, ``gamma_t``, the ``newest`` sample,
counters and the private generator's state) travels as ``recm_*`` keys inside the
inner state entry of that layer's ``w_beta``, so the dict keeps the standard
``{state, param_groups}`` shape. Loading updates the shared param groups and state
in place, accepts a plain inner-optimizer checkpoint (fresh RECM state, with a
warning), and schedules the rebuild of the batched coefficients that the saved run
held for its next forward, so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import modulation
from ._layers import _Layer
from .modulation import Modulation, _stacked_coefficients


class _CheckpointMixin:
    """Checkpoint half of :class:`~recm_opt.optimizer.RECMOptimizer`: save, load, restore and reset RECM state."""

    inner: Optimizer
    param_groups: Any
    state: Any
    skipped_steps: int
    _rng: torch.Generator
    _layers: list[_Layer]
    _pending_rebuild: list[_Layer]
    _optimizer_state_dict_pre_hooks: Any
    _optimizer_state_dict_post_hooks: Any
    _optimizer_load_state_dict_pre_hooks: Any
    _optimizer_load_state_dict_post_hooks: Any

    if TYPE_CHECKING:
        def _refresh_live(self) -> None: ...

        def _l_means(self) -> tuple[list[Tensor | None], list[tuple[list[_Layer], Tensor, Tensor]]]: ...

    def state_dict(self) -> dict[str, Any]:
        """Return the inner state dict with each layer's RECM state under its ``w_beta`` entry.

        Keys are ``recm_*`` inside ``state[i]``, so the dict keeps the standard
        ``{state, param_groups}`` shape that distributed checkpointing expects, and
        holds only tensors and plain Python values.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner.state_dict()
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        for layer in self._layers:
            i = index[id(layer.mod.w_beta)]
            sd["state"][i] = {**sd["state"].get(i, {}), **self._layer_state(layer)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = result if result is not None else sd
        return sd

    def _layer_state(self, layer: _Layer) -> dict[str, Tensor]:
        mod = layer.mod
        newest = mod.newest if mod.newest is not None else torch.zeros(0)
        return {"recm_h": mod.h.clone(), "recm_t": mod.t.clone(), "recm_gamma": mod.gamma_t.clone(),
                "recm_newest": newest.clone(), "recm_skipped": torch.tensor(layer.skipped),
                "recm_skipped_steps": torch.tensor(self.skipped_steps), "recm_rng": self._rng.get_state(),
                "recm_batched": torch.tensor(_has_precomputed(mod))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or a plain inner-optimizer one (fresh RECM state).

        The param groups and the state stay the same objects (updated in place), so
        schedulers and wrappers that hold them keep seeing the inner optimizer's.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = result if result is not None else state_dict
        groups = [dict(g) for g in state_dict["param_groups"]]
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        recm = {k: {n: v.pop(n) for n in list(v) if n.startswith("recm_")} for k, v in state.items()}
        state = {k: v for k, v in state.items() if v}
        if self._layers and not any(g.get("recm") for g in groups):
            warnings.warn("state dict has no RECM param group (a plain optimizer checkpoint?): "
                          "loading the inner state and starting fresh RECM state", stacklevel=2)
            groups = self._with_fresh_recm_group(groups)
        self._load_inner({"state": state, "param_groups": groups})
        saved = list(chain.from_iterable(g["params"] for g in groups))
        current = [id(p) for p in chain.from_iterable(g["params"] for g in self.param_groups)]
        batched = []
        for layer in self._layers:
            entry = recm.get(saved[current.index(id(layer.mod.w_beta))], {})
            if entry:
                self._restore(layer, entry)
                batched += [layer] if bool(entry.get("recm_batched", False)) else []
            else:
                self._reset(layer)
        self._refresh_live()
        # Rebuilt at the next training forward: DCP's set_state_dict loads the model after
        # the optimizer, and loading parameters invalidates what a rebuild now would make.
        self._pending_rebuild = batched
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_inner(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict replaces param_groups and state with new objects;
        # copy them back into the shared ones so that the sharing survives a resume.
        groups, state = self.param_groups, self.state
        self.inner.load_state_dict(state_dict)
        for old, new in zip(groups, self.inner.param_groups):
            old.clear()
            old.update(new)
        state.clear()
        state.update(self.inner.state)
        self.inner.param_groups, self.inner.state = groups, state

    def _with_fresh_recm_group(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        pos = next(i for i, g in enumerate(self.param_groups) if g.get("recm"))
        start = 1 + max(chain.from_iterable(g["params"] for g in groups), default=-1)
        ours = {k: v for k, v in self.param_groups[pos].items() if k != "params"}
        ours["params"] = list(range(start, start + len(self.param_groups[pos]["params"])))
        return groups[:pos] + [ours] + groups[pos:]

    def _restore(self, layer: _Layer, entry: dict[str, Tensor]) -> None:
        mod = layer.mod
        mod.h.copy_(entry["recm_h"])
        mod.t.copy_(entry["recm_t"])
        mod.gamma_t.copy_(entry["recm_gamma"])
        newest = entry["recm_newest"]
        mod.newest = newest.to(device=mod.h.device, dtype=mod.h.dtype) if newest.numel() else None
        layer.skipped = int(entry["recm_skipped"])
        self.skipped_steps = int(entry.get("recm_skipped_steps", self.skipped_steps))
        self._rng.set_state(entry["recm_rng"])
        layer.inputs, layer.input_epochs, layer.samples, layer.sample_epochs = [], [], [], []

    def _rebuild_precomputed(self, layers: list[_Layer]) -> None:
        """Rebuild the batched training coefficients the saved run held for its next forward.

        ``step()`` leaves each layer's next-forward ``(alpha, beta)`` computed in one batched
        graph (:func:`~recm_opt.modulation._stacked_coefficients`); a freshly loaded optimizer
        would compute them per layer, which rounds differently. They are a function of the
        restored state, so the same code path as in ``step()`` (``_l_means`` on the newest
        sample, grouped alike) rebuilds them bit for bit, and a resumed run continues exactly.
        """
        if not layers or not modulation.PRECOMPUTE:
            return
        pending = [(layer, layer.samples) for layer in self._layers]
        for layer in self._layers:
            newest = layer.mod.newest
            layer.samples = [(newest, newest.shape[1])] if layer in layers and newest is not None else []
        try:
            _, stacked = self._l_means()
            for group, x, r in stacked:
                if r.requires_grad:
                    for layer, sample in zip(group, x.unbind()):
                        layer.mod.newest = sample
                    _stacked_coefficients([layer.mod for layer in group], r)
        finally:
            for layer, samples in pending:
                layer.samples = samples

    def _reset(self, layer: _Layer) -> None:
        """Fresh RECM state (t = 0, h = 0), for a checkpoint that has none for this layer."""
        mod = layer.mod
        mod.h.zero_()
        mod.t.zero_()
        mod.gamma_t.zero_()
        mod.newest = None
        layer.skipped = 0
        layer.inputs, layer.input_epochs, layer.samples, layer.sample_epochs = [], [], [], []


def _has_precomputed(mod: Modulation) -> bool:
    """Whether ``mod``'s next training forward would use coefficients precomputed by ``step()``."""
    pre = getattr(mod, "_precomputed", None)
    if pre is None:
        return False
    with torch.enable_grad():
        return pre.get(mod) is not None

