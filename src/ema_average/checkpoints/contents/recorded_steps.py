"""The step a saved dict records: each trainer's key tried in turn (Lightning, fairseq, composer, the nested
trainer-state containers, epoch counts), every value checked; the keys are the trainer vocabulary's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.contents.keys import COUNTED_FROM_1, EPOCH_COUNTERS, NESTED_STEP_KEYS, STEP_KEYS
from ema_average.checkpoints.contents.steps import StepInfo, checked_step, stated_step
from ema_average.checkpoints.reading.tensor_state import numel_of

Materialise = Callable[[torch.Tensor], torch.Tensor]  # a file's tensor, its values read


def step_value(path: Path, value: Any, where: str, read: Materialise) -> int | None:
    """The step ``value`` holds, checked; ``None`` where it is no step (absent, a flag, a float, a container)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, str)):
        return checked_step(path, value, where)
    if isinstance(value, torch.Tensor) and numel_of(value) == 1 and not value.dtype.is_floating_point:
        return checked_step(path, read(value), where)  # refuses complex, bool, meta and out-of-range values
    return None


def find_step(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """The step the saved dict records, trying each trainer's key in turn; ``read`` gives a tensor's value."""
    for key in STEP_KEYS:
        step = step_value(path, obj.get(key), f"metadata:{key}", read)
        if step is not None:
            return StepInfo(step, f"metadata:{key}")
    history = obj.get("optimizer_history")  # fairseq
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        source = "metadata:optimizer_history[-1].num_updates"
        step = step_value(path, history[-1].get("num_updates"), source, read)
        if step is not None:
            return StepInfo(step, source)
    composer = _composer_step(path, obj, read)
    if composer is not None:
        return composer
    for keys in NESTED_STEP_KEYS:  # trainer-state containers: ignite, mmengine, torchtnt, litgpt...
        source = "metadata:" + ".".join(keys)
        step = step_value(path, nested_value(obj, keys), source, read)
        if step is not None:
            return StepInfo(step, source)
    if final_copy(obj):
        return None
    plain = {k: v for k, v in obj.items() if isinstance(v, int | str)}  # a step key off the lists
    return stated_step(path, plain, "metadata") or _epoch_count(path, obj, read)


def final_copy(obj: Mapping[str, Any]) -> str | None:
    """Why the file is a final copy of the run's weights rather than a step of it, or ``None``.

    ultralytics' ``strip_optimizer`` rewrites ``last.pt`` and ``best.pt`` at the end of training with the
    EMA as ``model``, no optimizer, and ``epoch`` -1: no step, a copy of an epoch's weights."""
    epoch = obj.get("epoch")
    if isinstance(epoch, int) and epoch == -1 and obj.get("optimizer") is None and "train_args" in obj:
        return "a final copy of the weights (epoch -1: ultralytics' strip_optimizer)"
    return None


def nested_value(obj: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value at ``keys`` down nested mappings; ``None`` where the path is not there."""
    value: Any = obj
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _epoch_count(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """An epoch count (timm, open_clip), flagged as a counter; its origin says where a count starts at 1."""
    for keys, beside, first in EPOCH_COUNTERS:
        if not all(key in obj for key in beside):
            continue
        source = "metadata:" + ".".join(keys)
        step = step_value(path, nested_value(obj, keys), source, read)
        if step is not None:
            return StepInfo(step, source + (COUNTED_FROM_1 if first == 1 else ""), counter=True)
    return None


def _composer_step(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """MosaicML composer: ``state.timestamp`` is ``{"Timestamp": Timestamp.state_dict()}``; ``batch`` is
    the count of optimizer steps (the ``baN`` of its file names)."""
    state = obj.get("state")
    timestamp = state.get("timestamp") if isinstance(state, Mapping) else None
    if not isinstance(timestamp, Mapping):
        return None
    record = timestamp.get("Timestamp", timestamp)
    if not isinstance(record, Mapping):
        return None
    source = "metadata:state.timestamp.batch"
    step = step_value(path, record.get("batch"), source, read)
    return StepInfo(step, source) if step is not None else None
