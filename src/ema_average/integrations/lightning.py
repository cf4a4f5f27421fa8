"""An EMA of the weights while Lightning trains: ``trainer = Trainer(callbacks=[EMACallback(decay=0.999)])``.

After every optimizer step (not every batch: with gradient accumulation, once per accumulated step) the
engine's ``apply(num_updates=trainer.global_step)``. Validation and test run on the averages by default,
swapped in and the training weights put back bit for bit after; ``evaluate="both"`` also logs every
metric of the raw weights, its name suffixed ``_raw``. The ``.ckpt`` holds the averaged model under
``ema`` (the model's ``state_dict`` with float32 averages for its parameters, so
``model.load_state_dict(ckpt["ema"])`` and ``ema-average RUN --submodel ema`` read it) and the callback's counter in its own state: ``trainer.fit(ckpt_path=...)`` resumes both.

Under DDP each rank keeps its own average (equal across ranks: DDP keeps the weights equal). Sharded
parameters (DeepSpeed ZeRO-3, FSDP2's DTensors) are refused when training starts, with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch

from ema_average.integrations import EmaTracker, average_model_state
from ema_average.moving_average import ExponentialMovingAverage

__all__ = ["EMA_KEY", "EMACallback"]

# The averaged model's top-level key in the .ckpt: a name checkpoints/keys.py knows as an average's, and the
# one --submodel ema names in the Hugging Face callback's folders.
EMA_KEY = "ema"


class EMACallback(pl.Callback):
    """Keeps an exponential moving average of the LightningModule's trainable parameters on the one engine.

    ``decay``, ``numerator``, ``denominator``: the engine's rule, ``min(decay, (numerator + n) /
    (denominator + n))`` at global step ``n``. ``device``: where the float32 averages live (e.g. ``"cpu"``
    to spare GPU memory, at the cost of a copy per update). ``every``: update every N optimizer steps.
    ``evaluate``: ``"ema"`` (default), ``"raw"``, or ``"both"`` (the raw weights' metrics suffixed
    ``raw_suffix``).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        numerator: float = 1.0,
        denominator: float = 10.0,
        *,
        device: torch.device | str | None = None,
        every: int = 1,
        evaluate: str = "ema",
        raw_suffix: str = "_raw",
    ) -> None:
        self._tracker = EmaTracker(
            decay, numerator, denominator, device=device, every=every, evaluate=evaluate
        )
        self.raw_suffix = raw_suffix
        self._loaded: tuple[Mapping[str, torch.Tensor], str] = ({}, "the checkpoint")

    @property
    def moving_average(self) -> ExponentialMovingAverage | None:
        """The engine instance, once training (or evaluation) has started."""
        return self._tracker.average

    # --- building and updating ----------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the average once the strategy has placed the model and restored the loops."""
        self._tracker.start(pl_module, trainer.global_step, training=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tracker.step(trainer.global_step)  # no-op on a batch that only accumulated gradients

    # --- evaluation on the averages -----------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tracker.start(pl_module, trainer.global_step, training=False)
        self._tracker.swap_in()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tracker.swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tracker.swap_out()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._tracker.swap_out()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loaders = len(trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches)
        self._raw_step(pl_module.validation_step, pl_module, batch, batch_idx, dataloader_idx, loaders)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loaders = len(trainer.num_test_batches)
        self._raw_step(pl_module.test_step, pl_module, batch, batch_idx, dataloader_idx, loaders)

    def _raw_step(
        self,
        step: Callable[..., Any],
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        loaders: int,
    ) -> None:
        """``evaluate="both"``: the same step again on the training weights, its logs renamed. The step is
        called as Lightning calls it: with ``dataloader_idx`` only when there are several loaders."""
        if self._tracker.evaluate != "both" or not self._tracker.swapped:
            return
        args = (batch, batch_idx, dataloader_idx) if loaders > 1 else (batch, batch_idx)
        self._tracker.swap_out()
        try:
            with torch.no_grad(), _renamed_logs(pl_module, self.raw_suffix):
                step(*args)
        finally:
            self._tracker.swap_in()

    # --- saving and resuming ------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The averaged model beside the raw one, up to the step being saved."""
        if self._tracker.average is None:
            return
        if not self._tracker.swapped:
            self._tracker.step(trainer.global_step)  # a checkpoint saved before our batch-end hook ran
        checkpoint[EMA_KEY] = average_model_state(pl_module, self._tracker.average.averages())

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        where = str(getattr(trainer, "ckpt_path", None) or "the checkpoint")
        self._loaded = (checkpoint.get(EMA_KEY) or {}, where)

    def state_dict(self) -> dict[str, Any]:
        return self._tracker.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        averages, where = self._loaded
        self._tracker.load(state_dict, averages, where)
        self._loaded = ({}, "the checkpoint")


@contextmanager
def _renamed_logs(pl_module: pl.LightningModule, suffix: str) -> Iterator[None]:
    """``self.log(name, ...)`` inside the block logs ``name + suffix`` (``log_dict`` goes through it)."""
    original = pl_module.log

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        original(name + suffix, value, *args, **kwargs)

    object.__setattr__(pl_module, "log", log)
    try:
        yield
    finally:
        object.__delattr__(pl_module, "log")
