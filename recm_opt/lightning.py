"""A Lightning ``Callback`` that logs RECM's flat metrics through whatever logger the Trainer has.

Importing this module imports Lightning (``lightning.pytorch`` if installed, else
``pytorch_lightning``); ``import recm_opt`` never does.

Example::

    from recm_opt.lightning import RECMMetrics

    trainer = pl.Trainer(callbacks=[RECMMetrics()], logger=CSVLogger("logs"))

Every ``every_n_steps`` optimizer steps the callback logs
:func:`recm_opt.monitoring.metrics` of each :class:`~recm_opt.RECMOptimizer` in
``trainer.optimizers`` through the module's ``log_dict``, so Lightning writes them
with its own metrics of that batch: the same row of a CSV, the same step in
TensorBoard, W&B, ... (Lightning writes at its ``log_every_n_steps``).
"""

from __future__ import annotations

from typing import Any

try:  # the unified package first, so that the Callback matches the Trainer users import from it
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError("recm_opt.lightning needs Lightning: pip install 'recm_opt[lightning]' (pytorch-lightning), "
                          "or pip install lightning") from err

from .monitoring import metrics
from .optimizer import RECMOptimizer

__all__ = ["RECMMetrics"]


class RECMMetrics(pl.Callback):
    """Log alpha per term, beta and ``|h|`` of every RECM layer to the Trainer's loggers.

    Args:
        every_n_steps: log after every n-th optimizer step; default: the Trainer's ``log_every_n_steps``.
        prefix: the first component of each key (``<prefix>/<layer>/alpha/<term>``, ...).
    """

    def __init__(self, every_n_steps: int | None = None, prefix: str = "recm") -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._last_logged = -1

    def _optimizers(self, trainer: Any) -> list[RECMOptimizer]:
        found = []
        for opt in trainer.optimizers:
            opt = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps the real one
            if isinstance(opt, RECMOptimizer):
                found.append(opt)
        return found

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the metrics, with the batch's own, when the optimizer has stepped a multiple of ``every_n_steps``."""
        step = trainer.global_step
        every = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 1)))
        if step == self._last_logged or step % every != 0 or not trainer.loggers:
            return
        flat: dict[str, float] = {}
        opts = self._optimizers(trainer)
        for i, opt in enumerate(opts):
            flat.update(metrics(opt, self.prefix if len(opts) == 1 else f"{self.prefix}{i}"))
        if not flat:
            return
        self._last_logged = step
        pl_module.log_dict(flat, on_step=True, on_epoch=False)
