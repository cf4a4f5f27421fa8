"""The training step of each checkpoint of a run: its own record or its name (``--steps-from``), counts of
saves or epochs made steps (``--step-every``) or every step given (``--steps``). Split from discover.py,
which finds and checks the run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from ema_average.checkpoints.base import Checkpoint, StepInfo
from ema_average.checkpoints.contents.keys import STEP_KEYS
from ema_average.checkpoints.contents.steps import (
    PATTERN_NAMES,
    checked_step,
    first_count,
    stated_step,
    stem_of,
    step_of_count,
)
from ema_average.checkpoints.reading.json_file import read_json
from ema_average.checkpoints.registry import side_step_problem
from ema_average.errors import CheckpointError, ConfigurationError

StepsFrom = Literal["auto", "metadata", "filename"]  # options.STEPS_FROM, as a type


def step_of(ckpt: Checkpoint, steps_from: StepsFrom) -> StepInfo:
    """The checkpoint's own record first, then its name. A count of saves or epochs gives way to a real
    step in the name, unless the name only repeats it (timm's ``checkpoint-3`` holding ``epoch`` 3)."""
    sources: dict[str, Callable[[], StepInfo | None]] = {
        "metadata": lambda: ckpt.metadata_step() or json_step(ckpt.path),
        "filename": ckpt.name_step,
    }
    if steps_from != "auto":
        info = sources[steps_from]()
    else:
        meta, name = sources["metadata"](), ckpt.name_step()
        info = meta
        if meta is None or (
            meta.counter and name is not None and not name.counter and name.step != meta.step
        ):
            info = name
    if info is not None:
        return info
    where = {
        "auto": "in its contents or its name",
        "metadata": "in its contents (--steps-from metadata)",
        "filename": f"in its name (--steps-from filename; patterns {', '.join(PATTERN_NAMES)})",
    }[steps_from]
    raise CheckpointError(ckpt.path, f"no training step found {where}")


# A JSON record beside a checkpoint is read when it is small: a step is a few bytes, not a dataset.
_MAX_JSON_BYTES = 1 << 20


def json_step(path: Path) -> StepInfo | None:
    """A step stated in a JSON object beside the checkpoint: ``<name>.json`` for a file (``model_7.json``
    beside ``model_7.safetensors``), any ``*.json`` directly in a folder; the listed keys first, then any
    key that names a step record. None where there is none, or the records disagree."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.is_file())
    else:
        files = [
            p for p in (path.with_name(stem_of(path) + ".json"), path.with_suffix(".json")) if p.is_file()
        ]
    found = {info.step: info for file in dict.fromkeys(files) if (info := _json_file_step(file, path))}
    return next(iter(found.values())) if len(found) == 1 else None


def _json_file_step(file: Path, ckpt: Path) -> StepInfo | None:
    try:
        record = read_json(file, _MAX_JSON_BYTES)
    except CheckpointError:  # a hint only: an unreadable record (a FIFO, deep nesting, not JSON) says nothing
        return None
    if not isinstance(record, dict):
        return None
    where = file.name if file.parent == ckpt else f"{file.name} beside it"
    for key in STEP_KEYS:
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return StepInfo(checked_step(ckpt, value, f"{where}:{key}"), f"{where}:{key}")
    return stated_step(ckpt, record, where)


def note_unread_step(ckpt: Checkpoint, steps_from: StepsFrom) -> None:
    """A step taken from the name while the trainer's own record was there but unusable is said in the
    plan (a ``trainer_state.json`` that is not an object was once ignored silently)."""
    if steps_from != "auto" or not ckpt.step_origin.startswith("filename:") or not ckpt.path.is_dir():
        return
    problem = side_step_problem(ckpt.path)
    if problem is not None:
        ckpt.notes.append(f"{problem}: step {ckpt.step} taken from the name ({ckpt.step_origin})")


def real_steps(
    root: Path,
    checkpoints: list[Checkpoint],
    step_every: int | None,
    steps: Sequence[int] | None,
    notices: list[str],
) -> None:
    """Counts of saves or epochs made steps (``step_every``), or every step given (``steps``); a count
    left as it is gets a notice saying how to give the steps."""
    counted = [c for c in checkpoints if c.step_is_counter]
    if steps is not None:
        _given_steps(root, checkpoints, steps)
    elif step_every is not None:
        if not counted:
            source = checkpoints[0].step_origin
            raise ConfigurationError(
                f"{root}: --step-every applies to checkpoints numbered by a count of saves or epochs; "
                f"these record their training steps ({source})"
            )
        for ckpt in counted:
            assert ckpt.step is not None
            ckpt.step, ckpt.step_origin = step_of_count(ckpt.path, ckpt.step, ckpt.step_origin, step_every)
            ckpt.step_is_counter = False
        checkpoints.sort(key=lambda c: c.step if c.step is not None else -1)
    elif counted:
        first = first_count(counted[0].step_origin)
        notices.append(
            f"the steps of {len(counted)} checkpoint(s) count saves or epochs, not training steps "
            f"({counted[0].step_origin}); give the training steps between saves with --step-every N "
            f"(step = {'count' if first else '(count + 1)'} x N, the first save counted {first}), "
            "or each checkpoint's step with --steps"
        )


def _given_steps(root: Path, checkpoints: list[Checkpoint], steps: Sequence[int]) -> None:
    if len(steps) != len(checkpoints):
        raise ConfigurationError(f"{root}: {len(steps)} steps given for {len(checkpoints)} checkpoints")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ConfigurationError(f"{root}: the steps given must increase, got {list(steps)[:8]}")
    for ckpt, step in zip(checkpoints, steps, strict=True):
        ckpt.step = checked_step(ckpt.path, step, "given")
        ckpt.step_origin, ckpt.step_is_counter = "given", False
