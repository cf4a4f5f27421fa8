"""An EMA of the weights while Lightning trains: ``trainer = Trainer(callbacks=[EMACallback(decay=0.999)])``.

After every optimizer step (not every batch: with gradient accumulation, once per accumulated step) the
engine's ``apply(num_updates=trainer.global_step)``. Validation and test run on the averages by default,
swapped in and the training weights put back bit for bit after; ``evaluate="both"`` also logs every
metric of the raw weights, its name suffixed ``_raw``. The ``.ckpt`` holds the averaged model under
``ema`` (the model's ``state_dict`` with float32 averages for its parameters, so
``model.load_state_dict(ckpt["ema"])`` and ``ema-average RUN --submodel ema`` read it) and the callback's counter in its own state: ``trainer.fit(ckpt_path=...)`` resumes both.

Under DDP each rank keeps its own average (equal across ranks: DDP keeps the weights equal). Under
``ModelParallelStrategy`` (FSDP2's ``fully_shard`` and tensor parallel in ``configure_model``) each rank keeps
the float32 averages of its own shards, updated with no collective. Its checkpoint folder (a DCP save, the
strategy's default) then holds them sharded, as DTensors under the top-level key ``ema`` beside
``state_dict`` (``--state-dict-key ema`` reads them; Lightning's ``consolidate_checkpoint`` gives a ``.ckpt``
whose ``ema`` is the whole averaged model); with ``save_distributed_checkpoint=False`` they are gathered
into the one ``.ckpt`` as the weights are. DeepSpeed ZeRO-3 and FSDP's flat parameters are refused when
training starts, with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

if TYPE_CHECKING:
    from ema_average.checkpoints.layouts.dcp_folder import DcpCheckpoint

from ema_average.engine.averages import ExponentialMovingAverage, is_dtensor
from ema_average.errors import CheckpointError, ConfigurationError
from ema_average.online import DEFAULT_NAME, EmaTracker, average_model_state
from ema_average.online.posthoc_callbacks import DEFAULT_FOLDER, DEFAULT_SIGMA_RELS, STATE_KEY, SnapshotKeeper

__all__ = ["EMA_KEY", "EMACallback"]

# The averaged model's top-level key in the .ckpt: a name checkpoints/contents/keys.py knows as an average's, and the
# one --submodel ema names in the Hugging Face callback's folders.
EMA_KEY = "ema"
# What ModelParallelStrategy writes beside the DCP files of a sharded save (lightning.fabric's
# _METADATA_FILENAME): every key of the checkpoint that is neither weights nor optimizer state.
_SHARDED_SAVE_META = "meta.pt"
# The compatibility seam with Lightning's internals: _save_averages_with_the_shards does what this method does
# for a sharded save (lightning 2.6, checked by the SHA-256 of its source), reading the strategy's private
# _save_distributed_checkpoint and writing lightning.fabric's _METADATA_FILENAME (_SHARDED_SAVE_META).
# test_the_fsdp2_save_seam_is_the_lightning_it_copies fails when a Lightning release changes any of them.
LIGHTNING_SAVE_SEAM = "lightning.pytorch.strategies.ModelParallelStrategy.save_checkpoint"
LIGHTNING_SAVE_SEAM_SHA256 = "e2b5a459fe87a28c818d38cd08f8cbd2b2f8a96c3fb2a794416ff560107cbbad"
# With at_end="ema" the .ckpt's state_dict is the EMA, and the training weights (to resume from) are here.
TRAINING_WEIGHTS_KEY = "ema_average_training_state_dict"


class EMACallback(pl.Callback):
    """Keeps an exponential moving average of the LightningModule's trainable parameters on the one engine.

    ``decay``, ``numerator``, ``denominator``: the engine's rule, ``min(decay, (numerator + n) /
    (denominator + n))`` at global step ``n``. ``device``: where the float32 averages live (e.g. ``"cpu"``
    to spare GPU memory, at the cost of a copy per update). ``every``: update every N optimizer steps.
    ``evaluate``: ``"ema"`` (default), ``"raw"``, or ``"both"`` (the raw weights' metrics suffixed
    ``raw_suffix``). ``at_end``: what the model holds when training ends: ``"raw"`` (default: the training
    weights) or ``"ema"`` (the first EMA, also written as each ``.ckpt``'s ``state_dict``, so that
    ``load_from_checkpoint`` and ``Trainer().test(ckpt_path=...)`` give it; the training weights are kept
    under ``ema_average_training_state_dict`` and put back when this callback resumes the run).

    Several decays (``decay=[0.999, 0.9999]``) keep several EMAs, updated at the same steps and saved each
    under its own top-level key of the ``.ckpt`` (``names``, by default ``ema``, ``ema_0.9999``...); the first
    is the one validation and test run on, any of them ``with callback.average_parameters(name):``.

    ``posthoc_every=N`` also keeps power EMAs of widths ``posthoc_sigma_rels`` (EDM2's 0.05 and 0.10) and
    writes a snapshot of each every N steps into ``posthoc-ema/`` beside the checkpoints (the
    ``ModelCheckpoint``'s ``dirpath``, else ``default_root_dir``; ``posthoc_dtype``; global rank 0), their
    state in each ``.ckpt`` under ``posthoc_ema``: ``ema-average DIRPATH --method posthoc`` reconstructs.

    ``average_dtype=torch.bfloat16`` keeps the averages in bf16 with stochastic rounding (opt-in: half the
    memory, less accuracy; docs/library.md measures it); the default keeps them in float32.
    """

    def __init__(
        self,
        decay: float | Sequence[float] = 0.9999,
        numerator: float = 1.0,
        denominator: float = 10.0,
        *,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
        every: int = 1,
        evaluate: str = "ema",
        raw_suffix: str = "_raw",
        names: Sequence[str] | None = None,
        at_end: str = "raw",
        buffers: str = "average",
        start_step: int = 0,
        should_update: Callable[[int], bool] | None = None,
        posthoc_every: int | None = None,
        posthoc_sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        posthoc_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._tracker = EmaTracker(
            decay,
            numerator,
            denominator,
            device=device,
            average_dtype=average_dtype,
            every=every,
            evaluate=evaluate,
            names=names,
            at_end=at_end,
            buffers=buffers,
            start_step=start_step,
            should_update=should_update,
        )
        self._posthoc = SnapshotKeeper(posthoc_every, posthoc_sigma_rels, posthoc_dtype)
        self._tracker.beside = self._posthoc.step
        self.raw_suffix = raw_suffix
        self._loaded: tuple[Callable[[str], Any], str] = (_nothing, "the checkpoint")
        self._unanswered: str | None = None  # a checkpoint restored that held no state of this callback

    @property
    def moving_average(self) -> ExponentialMovingAverage | None:
        """The (first) EMA's engine instance, once training (or evaluation) has started."""
        return self._tracker.average

    def ema_model(self, name: str | None = None) -> torch.nn.Module | None:
        """A copy of the model holding that EMA (the first by default), for inference; None before training."""
        return self._tracker.ema_model(name)

    @property
    def moving_averages(self) -> dict[str, ExponentialMovingAverage]:
        """Every EMA's engine instance by name, once training (or evaluation) has started."""
        return self._tracker.averages()

    def average_parameters(self, name: str | None = None) -> AbstractContextManager[None]:
        """That EMA (the first by default) in the model for the ``with`` block, the training weights after."""
        return self._tracker.average_parameters(name)

    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state: the class's own for the one ``ema`` (as saved before
        several EMAs existed), with the names otherwise, so that instances with other names compose."""
        if self._tracker.names == [DEFAULT_NAME]:
            return super().state_key
        return self._generate_state_key(names=",".join(self._tracker.names))

    # --- building and updating ----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under a strategy that saves sharded, have its saves hold the sharded averages too."""
        self._unanswered = None
        if self._tracker.at_end == "ema" and _saves_shards(trainer.strategy):
            raise ConfigurationError(
                "at_end='ema' writes the EMA as the checkpoint's state_dict, which a sharded (DCP) save does "
                "not take from a callback; use at_end='raw' and --state-dict-key ema, or "
                "save_distributed_checkpoint=False"
            )
        if _saves_shards(trainer.strategy):
            _save_averages_with_the_shards(trainer.strategy, self._tracker.names)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the average once the strategy has placed the model and restored the loops."""
        self._refuse_a_checkpoint_without_state()
        self._tracker.start(pl_module, trainer.global_step, training=True, owner=trainer)
        folder = _posthoc_folder(trainer)
        self._posthoc.start(
            self._tracker.tracked,
            folder,
            trainer.global_step,
            rank_zero=trainer.is_global_zero,
            device=self._tracker.device,
        )

    def _refuse_a_checkpoint_without_state(self) -> None:
        """A checkpoint saved without this callback holds no average to continue: refused, as the Hugging
        Face callback refuses one, rather than silently starting a new EMA at the restored step."""
        if self._unanswered is None:
            return
        where, self._unanswered = self._unanswered, None
        if any(
            self._loaded[0](name) for name in self._tracker.names
        ):  # Lightning skips an empty state: the averages are there, their counter is not
            raise CheckpointError(
                where,
                f"holds the EMA under {EMA_KEY!r} but the EMA callback's saved state is empty or absent: "
                "the average cannot be continued without its update count; resume from a checkpoint the "
                "callback saved whole",
            )
        raise CheckpointError(
            where,
            "holds no state of the EMA callback: it cannot continue an average it did not save (was "
            "the run started without it?); fit from these weights without ckpt_path to start a new EMA",
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``at_end="ema"``: the model ends holding the (first) EMA, for ``predict``/``test`` after fit."""
        if self._tracker.at_end == "ema":
            self._tracker.put_in()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tracker.step(trainer.global_step)  # no-op on a batch that only accumulated gradients

    # --- evaluation on the averages -----------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_a_checkpoint_without_state()
        self._tracker.start(pl_module, trainer.global_step, training=False, owner=trainer)
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
        posthoc = self._posthoc.state()
        if posthoc is not None:
            checkpoint[STATE_KEY] = posthoc
        for name, average in self._tracker.averages().items():
            averaged = average_model_state(pl_module, average.averages())
            if not _saves_shards(trainer.strategy) and any(is_dtensor(t) for t in averaged.values()):
                averaged = _gathered(
                    averaged, keep=trainer.is_global_zero
                )  # the one file the strategy writes
            checkpoint[name] = averaged
        if self._tracker.at_end == "ema" and self._tracker.names[0] in checkpoint:
            # load_from_checkpoint, Trainer().test(ckpt_path=...) read state_dict: the EMA; a resume with
            # this callback puts the training weights back (on_load_checkpoint)
            checkpoint[TRAINING_WEIGHTS_KEY] = checkpoint["state_dict"]
            checkpoint["state_dict"] = checkpoint[self._tracker.names[0]]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if TRAINING_WEIGHTS_KEY in checkpoint and trainer.state.fn == "fit":
            trainer.strategy.load_model_state_dict({"state_dict": checkpoint[TRAINING_WEIGHTS_KEY]})
        path = getattr(trainer, "ckpt_path", None)
        where = str(path or "the checkpoint")
        if STATE_KEY in checkpoint:
            self._posthoc.load(checkpoint[STATE_KEY], where)
        self._unanswered = where  # until load_state_dict receives this callback's state
        if path and _is_sharded_save(Path(path)):
            folder = Path(path)
            self._loaded = (lambda name: _ShardedAverages(folder, name), where)
        else:
            self._loaded = (lambda name: checkpoint.get(name, {}), where)

    def state_dict(self) -> dict[str, Any]:
        """The one EMA's record, or each EMA's under its name."""
        names = self._tracker.names
        if len(names) == 1 or self._tracker.average is None:
            return self._tracker.state()
        return {name: self._tracker.state(name) for name in names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        averages_of, where = self._loaded
        self._unanswered = None
        names = self._tracker.names
        if len(names) == 1:
            self._tracker.load(state_dict, averages_of(names[0]), where)
        else:
            for name in names:
                state = state_dict.get(name) if isinstance(state_dict, Mapping) else state_dict
                self._tracker.load(state, averages_of(name), f"{where} ({name})", name)
        self._loaded = (_nothing, "the checkpoint")


def _posthoc_folder(trainer: pl.Trainer) -> Path:
    """``posthoc-ema/`` beside the checkpoints: the checkpoint callback's folder, else the run's root."""
    saver = trainer.checkpoint_callback
    dirpath = getattr(saver, "dirpath", None) if saver is not None else None
    return Path(dirpath or trainer.default_root_dir) / DEFAULT_FOLDER


def _saves_shards(strategy: pl.strategies.Strategy) -> bool:
    """Whether the strategy writes a DCP folder (``ModelParallelStrategy``'s default), where each rank saves
    its own shards; other strategies write one file from rank 0."""
    return isinstance(strategy, pl.strategies.ModelParallelStrategy) and bool(
        getattr(strategy, "_save_distributed_checkpoint", False)
    )


def _is_sharded_save(path: Path) -> bool:
    return path.is_dir() and (path / _SHARDED_SAVE_META).is_file()


def _gathered(averaged: dict[str, torch.Tensor], *, keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU for a strategy that writes one file from rank 0, as it gathers the weights.

    Every rank takes part in each gather (a collective); only the rank that keeps them holds the whole
    model, one tensor more at a time on the others.
    """
    whole = {}
    for name, tensor in averaged.items():
        value = tensor.full_tensor().cpu() if is_dtensor(tensor) else tensor
        if keep:
            whole[name] = value
    return whole


def _save_averages_with_the_shards(strategy: pl.strategies.Strategy, names: Sequence[str]) -> None:
    """Make ``strategy.save_checkpoint`` write the averages into its DCP save, under the top-level ``ema``.

    ``ModelParallelStrategy`` saves only ``state_dict`` and the optimizer states with DCP and pickles every
    other key into ``meta.pt`` on rank 0, which would keep rank 0's shards alone. This does what its sharded
    save does (lightning 2.6, ``ModelParallelStrategy.save_checkpoint``) with ``ema`` among the DCP keys;
    every other save goes to the strategy's own method.
    """
    original = strategy.save_checkpoint
    keys: set[str] | None = getattr(original, "ema_average_keys", None)
    if keys is not None:  # installed by another EMA callback: its keys and these
        keys.update(names)
        return
    keys = set(names)

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not keys & set(checkpoint) or storage_options is not None or not _saves_shards(strategy):
            original(checkpoint, filepath, storage_options=storage_options)
            return
        from torch.distributed.checkpoint import save

        path = Path(strategy.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        optimizers = checkpoint.pop("optimizer_states", [])
        state = {
            "state_dict": checkpoint.pop("state_dict"),
            **{f"optimizer_{i}": optimizer for i, optimizer in enumerate(optimizers)},
            **{key: checkpoint.pop(key) for key in sorted(keys) if key in checkpoint},
        }
        save(state, checkpoint_id=path)
        if strategy.global_rank == 0:
            torch.save(checkpoint, path / _SHARDED_SAVE_META)

    save_checkpoint.ema_average_keys = keys  # type: ignore[attr-defined]  # a mark, read back above
    strategy.save_checkpoint = save_checkpoint


class _ShardedAverages(Mapping[str, torch.Tensor]):
    """The averages in a sharded save's ``ema``, read one whole tensor at a time when asked for.

    Read through the project's DCP reader (its ``.metadata`` checked, never unpickled with plain pickle);
    the tracker keeps only this rank's shard of each. Every rank reads the same names in the same order.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self._checkpoint: DcpCheckpoint | None = None

    def _opened(self) -> DcpCheckpoint:
        if self._checkpoint is None:
            from ema_average.checkpoints.layouts.dcp_folder import DcpCheckpoint

            self._checkpoint = DcpCheckpoint(self.folder, state_dict_key=self.key)
        return self._checkpoint

    def __contains__(self, name: object) -> bool:
        return name in self._opened().specs()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        return self._opened().read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._opened().specs())

    def __len__(self) -> int:
        return len(self._opened().specs())


def _nothing(name: str) -> dict[str, torch.Tensor]:
    return {}


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
