"""An EMA of the weights while the Hugging Face ``Trainer`` trains: ``Trainer(..., callbacks=[EMACallback()])``.

After every optimizer step (``on_step_end``: with gradient accumulation, once per accumulated step) the
engine's ``apply(num_updates=state.global_step)``. Evaluations the Trainer runs while training
(``eval_strategy``) see the averages: they are swapped in once the Trainer has decided to evaluate, and
the training weights put back, bit for bit, before it saves them or takes its next step.

Every ``checkpoint-N/`` also gets ``ema/``: ``model.safetensors`` (the model's state dict with the float32
averages for its parameters, tied names once, as ``save_pretrained`` writes them) beside the model's
``config.json``, so ``AutoModel...from_pretrained("checkpoint-N/ema")`` loads the EMA at step N and
``ema-average RUN --submodel ema`` averages these copies. The file's metadata holds the callback's counter:
``trainer.train(resume_from_checkpoint=...)`` continues the average from it.

Under DDP each rank keeps its own average (equal across ranks) and rank 0 writes ``ema/``. DeepSpeed ZeRO
1-2 keep whole parameters on every rank and work as DDP does; ZeRO-3 (parameters empty outside forward) is
refused when training starts. So are FSDP2's sharded (DTensor) parameters: the Trainer's FSDP2 runs through
accelerate on accelerators only (on the CPU accelerate drops the FSDP plugin and wraps the model in DDP), so
the gathering save of ``ema/`` it would need cannot be tested here; the Lightning callback keeps them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.engine.averages import ExponentialMovingAverage
from ema_average.errors import CheckpointError, ConfigurationError
from ema_average.online import (
    EmaTracker,
    average_model_state,
    averaged_tensors,
    unwrap_model,
    weights_digest,
)
from ema_average.online.peft_adapters import (
    ADAPTER_WEIGHTS,
    adapter_keys,
    adapter_state,
    is_peft_model,
    save_adapter_config,
)
from ema_average.online.posthoc_callbacks import DEFAULT_FOLDER, DEFAULT_SIGMA_RELS, SnapshotKeeper
from ema_average.output import SafetensorsWriter, TensorEntry

__all__ = ["EMA_FOLDER", "STATE_METADATA_KEY", "EMACallback"]

# Why FSDP2's DTensor parameters are refused at the start of training (see the module's docstring).
DTENSOR_REFUSAL = (
    "the Hugging Face EMA callback does not average sharded parameters (accelerate runs FSDP2 on "
    "accelerators only, where its ema/ save is untested); use Lightning's EMA callback, "
    "ExponentialMovingAverage(model) in the loop, or DDP"
)

EMA_FOLDER = "ema"  # checkpoint-N/ema/
WEIGHTS_NAME = "model.safetensors"
# Beside a copy saved in a lower precision than the averages (bf16 weights): the float32 averages themselves,
# which a resume continues exactly.
STATE_NAME = "ema_average_state.safetensors"
SAVE_DTYPES = ("model", "float32")
STATE_METADATA_KEY = "ema_average.callback"  # the callback's counter, in the weights file's metadata
# In that record: the SHA-256 of the training weights saved beside the EMA (see weights_digest), compared on
# resume with the weights the Trainer restored.
DIGEST_KEY = "weights_sha256"
# The compatibility seam with transformers' internals: Trainer.train (and _inner_training_loop, 4.x-5.x)
# hold the checkpoint being resumed, ``True`` resolved to a path, in this local.
_RESUME_LOCAL = "resume_from_checkpoint"
_CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


class EMACallback(TrainerCallback):
    """Keeps an exponential moving average of the model's trainable parameters on the one engine.

    ``decay``, ``numerator``, ``denominator``: the engine's rule, ``min(decay, (numerator + n) /
    (denominator + n))`` at global step ``n``. ``device``: where the float32 averages live (``"cpu"`` spares
    GPU memory, at the cost of a copy per update). ``every``: update every N optimizer steps. ``evaluate``:
    ``"ema"`` (default) or ``"raw"`` for the Trainer's own evaluations; to have both, evaluate the raw
    weights yourself after training (``trainer.evaluate(metric_key_prefix="eval_raw")``), or the averages
    with ``with callback.average_parameters(): trainer.evaluate()``.

    ``at_end``: what the model holds when training ends: ``"raw"`` (default: the training weights) or
    ``"ema"`` (the first EMA; with ``load_best_model_at_end``, the best checkpoint's EMA), so that the
    final ``trainer.save_model()`` writes it. ``save_dtype``: the dtype of the ``ema/`` copy: ``"model"``
    (default: the model's own, bf16 weights give a bf16 copy, with the float32 averages beside it in
    ``ema_average_state.safetensors`` for an exact resume) or ``"float32"``; its ``config.json`` says which.

    Several decays (``decay=[0.999, 0.9999]``) keep several EMAs, updated at the same steps and saved each
    in its own folder of ``checkpoint-N/`` (``names``, by default ``ema``, ``ema_0.9999``...); the first is
    the one the Trainer's evaluations see, any of them ``with callback.average_parameters(name):``.

    ``posthoc_every=N`` also keeps power EMAs of widths ``posthoc_sigma_rels`` (EDM2's 0.05 and 0.10) and
    writes a snapshot of each every N steps into ``<output_dir>/posthoc-ema/`` (``posthoc_dtype``; rank 0),
    their state in each ``checkpoint-N/posthoc_ema_state.pt``: ``ema-average RUN --method posthoc``.

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
        names: Sequence[str] | None = None,
        at_end: str = "raw",
        buffers: str = "average",
        start_step: int = 0,
        should_update: Callable[[int], bool] | None = None,
        save_dtype: str = "model",
        posthoc_every: int | None = None,
        posthoc_sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        posthoc_dtype: torch.dtype = torch.float32,
    ) -> None:
        if save_dtype not in SAVE_DTYPES:
            raise ConfigurationError(
                f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}"
            )
        self.save_dtype = save_dtype
        if evaluate == "both":
            raise ConfigurationError(
                "evaluate='both' is for Lightning: the Trainer has no hook before an evaluation to run a "
                "second one; evaluate='ema' and trainer.evaluate(metric_key_prefix='eval_raw') after "
                "training give both"
            )
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
            dtensor_refusal=DTENSOR_REFUSAL,
        )
        self._posthoc = SnapshotKeeper(posthoc_every, posthoc_sigma_rels, posthoc_dtype)
        self._tracker.beside = self._posthoc.step

    @property
    def moving_average(self) -> ExponentialMovingAverage | None:
        """The (first) EMA's engine instance, once training has started."""
        return self._tracker.average

    def ema_model(self, name: str | None = None) -> torch.nn.Module | None:
        """A copy of the model holding that EMA (the first by default), for inference; None before training."""
        return self._tracker.ema_model(name)

    @property
    def moving_averages(self) -> dict[str, ExponentialMovingAverage]:
        """Every EMA's engine instance by name, once training has started."""
        return self._tracker.averages()

    def average_parameters(self, name: str | None = None) -> AbstractContextManager[None]:
        """``with callback.average_parameters(name): trainer.evaluate()``: that EMA (the first by default)
        in the model for the block, the training weights put back after, bit for bit."""
        return self._tracker.average_parameters(name)

    # --- building and updating ----------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Average the model as the Trainer prepared it; on a resumed run, continue the saved average.

        Every ``train()`` starts afresh, also with a callback used before: its average belongs to another
        run, or to a later step than the checkpoint resumed.
        """
        assert model is not None
        self._tracker.reset()
        if state.global_step > 0:
            unwrapped = unwrap_model(model)
            restored = weights_digest(averaged_tensors(unwrapped, self._tracker.buffers))
            for name in self._tracker.names:
                self._resume(unwrapped, name, restored, args, state.global_step)
            folders = _candidate_folders(trainer_resume_folder(), args, state.global_step)
            self._posthoc.load_file(folders, restored)
        self._tracker.start(model, state.global_step, training=True, owner=state)
        folder, zero = Path(args.output_dir) / DEFAULT_FOLDER, state.is_world_process_zero
        self._posthoc.start(
            self._tracker.tracked, folder, state.global_step, rank_zero=zero, device=self._tracker.device
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tracker.step(state.global_step)
        if control.should_evaluate:  # set by DefaultFlowCallback, which runs before user callbacks
            self._tracker.swap_in()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tracker.swap_out()  # an evaluation that never reported back: never train on the averages

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tracker.swap_out()  # still in after the last step's evaluation: an epoch-end save may follow
        if control.should_evaluate:
            self._tracker.swap_in()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tracker.swap_out()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The training weights back before the Trainer saves them; when it will not save now, they come back
        at the next step instead, so that every dataset of a dict of eval datasets is evaluated on the EMA."""
        if control.should_save or args.save_strategy == "best":  # "best" decides to save only after this
            self._tracker.swap_out()

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """With ``at_end="ema"`` the model ends holding the EMA (the Trainer's final ``save_model`` writes
        it); with ``load_best_model_at_end``, the EMA saved beside the best checkpoint's weights, which the
        Trainer has just loaded (verified by their digest)."""
        tracker = self._tracker
        tracker.swap_out()
        if tracker.at_end != "ema" or tracker.average is None:
            return
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if not best:
            tracker.put_in()
            return
        path = _ema_file(Path(best) / tracker.names[0])
        record = _read_record(path)
        loaded = weights_digest(tracker.tracked)
        if not isinstance(record, Mapping) or record.get(DIGEST_KEY) != loaded:
            raise CheckpointError(
                path,
                "is not the EMA of the best checkpoint's weights the Trainer loaded: not put in the model",
            )
        tracker.put_in(_read_averages(path, tracker.model))

    # --- saving and resuming ------------------------------------------------------------------------

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """``checkpoint-N/ema/`` beside the Trainer's save of step N (rank 0 writes it)."""
        tracker = self._tracker
        saved = model or tracker.model
        if tracker.average is None or saved is None or not state.is_world_process_zero:
            return
        tracker.swap_out()
        folder = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        for name in tracker.names:
            save_ema_folder(unwrap_model(saved), tracker, folder / name, name, self.save_dtype)
        self._posthoc.save_file(folder, weights_digest(tracker.tracked))

    def _resume(
        self, model: torch.nn.Module, name: str, restored: str, args: TrainingArguments, global_step: int
    ) -> None:
        """Continue the EMA ``name`` saved beside exactly the weights the Trainer has just restored.

        The Trainer does not say which folder it resumed from; the one it was given (read through
        :func:`trainer_resume_folder`), ``args.resume_from_checkpoint`` and ``output_dir/checkpoint-N`` are
        looked in, and an EMA is taken only if the digest of the training weights recorded beside it is
        that of the weights now in the model: another run's ``checkpoint-N`` is refused, never continued.
        """
        resumed = trainer_resume_folder()
        other: Path | None = None
        for folder in _candidate_folders(resumed, args, global_step):
            path = _ema_file(folder / name)
            if not path.is_file():
                continue
            record = _read_record(path)
            saved = record.get(DIGEST_KEY) if isinstance(record, Mapping) else None
            if saved == restored or (saved is None and resumed is not None and folder == resumed):
                self._tracker.load(record, _read_averages(path, model), str(path), name)
                return
            other = other or path
        if other is not None:
            raise CheckpointError(
                other,
                "holds the EMA of other training weights than those the Trainer resumed (another run's "
                "checkpoint?): it is not continued; resume from the checkpoint folder the EMA callback saved "
                "with these weights",
            )
        raise CheckpointError(
            resumed or Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{global_step}",
            f"holds no {name}/{WEIGHTS_NAME}: the EMA callback cannot continue an average it did "
            "not save (was the run started without it?); train from these weights without "
            "resume_from_checkpoint to start a new EMA",
        )


def trainer_resume_folder() -> Path | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` is resuming, read from its frame.

    The compatibility seam with transformers' internals: the Trainer passes the folder to no callback, and
    keeps it (``True`` already resolved to the last checkpoint) in the local ``resume_from_checkpoint`` of
    the methods that run training. ``None`` when no frame of a running ``Trainer`` holds it; then the
    weights digest still refuses any other run's EMA. ``test_the_resume_seam_finds_the_folder_the_trainer_
    resumed`` fails loudly if transformers changes this.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), Trainer):
            value = frame.f_locals.get(_RESUME_LOCAL)
            if isinstance(value, str | os.PathLike) and str(value):
                return Path(value)
        frame = frame.f_back
    return None


def _candidate_folders(resumed: Path | None, args: TrainingArguments, global_step: int) -> list[Path]:
    """Where the resumed checkpoint's ``ema/`` may be, the folder the Trainer resumed first."""
    named = args.resume_from_checkpoint
    found = [
        resumed,
        Path(named) if isinstance(named, str) and named else None,
        Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{global_step}",
    ]
    unique: list[Path] = []
    for folder in found:
        if folder is not None and all(not _same(folder, seen) for seen in unique):
            unique.append(folder)
    return unique


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _read_record(path: Path) -> object:
    """The callback's record in ``path``'s metadata, parsed from JSON (any JSON: checked by the tracker)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(STATE_METADATA_KEY)
        if recorded is None:
            raise CheckpointError(
                path, f"has no {STATE_METADATA_KEY!r} record: not saved by the EMA callback"
            )
        return json.loads(recorded)
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors' own errors are of these kinds
        raise CheckpointError(path, f"cannot be read as the EMA callback's save ({exc})") from None


def _read_averages(path: Path, model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The saved averages by the model's own names (a PEFT adapter's keys mapped back by PEFT's mapping)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - no __iter__
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"cannot be read as the EMA callback's save ({exc})") from None
    if path.name == ADAPTER_WEIGHTS and model is not None and is_peft_model(model):
        return {key: saved[peft_key] for key, peft_key in adapter_keys(model).items() if peft_key in saved}
    return saved


def _ema_file(folder: Path) -> Path:
    """What a resume reads in an EMA folder: the float32 averages saved beside a rounded copy, or the copy
    (``model.safetensors``, or a PEFT adapter's ``adapter_model.safetensors``)."""
    if (folder / STATE_NAME).is_file():
        return folder / STATE_NAME
    adapter = folder / ADAPTER_WEIGHTS
    return adapter if adapter.is_file() and not (folder / WEIGHTS_NAME).is_file() else folder / WEIGHTS_NAME


def save_ema_folder(
    model: torch.nn.Module,
    tracker: EmaTracker,
    folder: Path,
    name: str | None = None,
    save_dtype: str = "model",
) -> Path:
    """``folder`` as ``save_pretrained`` would write the averaged model, written aside and renamed whole.

    The weights stream from the live averages one tensor at a time: no copy of the model is made. A PEFT
    model's folder is what PEFT's ``save_pretrained`` writes for the adapter (``adapter_model.safetensors``
    under PEFT's keys, ``adapter_config.json``; no ``config.json``, which would load as a base model whose
    weights are all missing).
    """
    average = tracker.averages()[name or tracker.names[0]]
    averages = average.averages()
    peft = is_peft_model(model)
    full = average_model_state(model, averages)
    own = {key: t.dtype for key, t in model.state_dict(keep_vars=True).items()}
    if peft:
        keys = adapter_keys(model)
        state, dtypes = adapter_state(model, full), {keys[k]: own[k] for k in keys}
    else:
        state, dtypes = _untied(model, full), own
    dtypes = {key: _saved_dtype(dtypes[key], tensor, save_dtype) for key, tensor in state.items()}
    record = {
        **tracker.state(name),
        DIGEST_KEY: weights_digest(tracker.tracked),
    }  # the raw weights: swapped out
    metadata = {"format": "pt", STATE_METADATA_KEY: json.dumps(record)}
    rounded = any(dtypes[key] != tensor.dtype for key, tensor in state.items())
    aside = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    try:
        weights = ADAPTER_WEIGHTS if peft else WEIGHTS_NAME
        _write(aside / weights, {k: (t, dtypes[k]) for k, t in state.items()}, metadata)
        if rounded:  # the float32 averages, for a resume that continues them exactly
            _write(aside / STATE_NAME, {k: (t, t.dtype) for k, t in averages.items()}, metadata)
        config = getattr(model, "config", None)
        if peft:
            save_adapter_config(model, aside)
        elif config is not None and hasattr(config, "save_pretrained"):
            _saying_dtype(config, set(dtypes.values())).save_pretrained(aside)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(aside, folder)
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    return folder


def _saved_dtype(model_dtype: torch.dtype, tensor: torch.Tensor, save_dtype: str) -> torch.dtype:
    """The dtype a tensor is written in: the model's own (``"model"``), or float32 for a floating-point one."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return model_dtype if save_dtype == "model" else torch.float32


def _write(
    path: Path, tensors: dict[str, tuple[torch.Tensor, torch.dtype]], metadata: dict[str, str]
) -> None:
    """One safetensors file, each tensor cast to its dtype as it is written (one at a time)."""
    entries = [TensorEntry(k, TensorSpec(tuple(t.shape), dtype)) for k, (t, dtype) in tensors.items()]
    writer = SafetensorsWriter(path, entries, metadata, overwrite=False)
    for key, (tensor, dtype) in tensors.items():
        writer.write(key, tensor.detach().to(dtype))
    writer.commit()


def _saying_dtype(config: Any, dtypes: set[torch.dtype]) -> Any:
    """A copy of the model's config whose ``dtype`` is what the weights file holds, so that
    ``from_pretrained`` loads it as written rather than rounding it to what the config claims."""
    floating = {d for d in dtypes if d.is_floating_point}
    if len(floating) != 1:
        return config
    said = copy.deepcopy(config)
    said.dtype = floating.pop()
    return said


def _untied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each parameter under its first name only: tied weights (GPT-2's ``lm_head`` and
    ``wte``) are saved once, as ``save_pretrained`` saves them, and ``from_pretrained`` ties them again."""
    first: dict[int, str] = {}
    kept = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter):
            if id(value) in first:
                continue
            first[id(value)] = key
        kept[key] = state[key]
    return kept
