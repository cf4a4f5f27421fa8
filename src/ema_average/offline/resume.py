"""The output contract: what an output records of how it was made, and reading one back to continue it.

An output's safetensors metadata says which tool wrote it (so it is never taken as an input), the
average's method and settings, the steps and files it holds. ``--resume`` (and ``--watch``) continue it
with newer checkpoints only. The metadata is read from a file that may have been edited, so it is checked
against itself before anything is trusted: a lowered ``last_step`` would re-apply checkpoints, and a
shortened ``steps`` list would give the uniform average wrong weights.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch

from ema_average._version import __version__
from ema_average.checkpoints.base import Checkpoint, TensorSpec
from ema_average.checkpoints.contents.own_outputs import TOOL_MARKER_KEY
from ema_average.checkpoints.contents.steps import MAX_STEP
from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint
from ema_average.errors import CheckpointError, CheckpointMismatchError
from ema_average.offline.plan import AverageSettings, OutputTensor, ResumedProgress

STEPS_KEY = "steps"
LAST_STEP_KEY = "last_step"
FILES_KEY = "sources"  # the checkpoint files the average holds, by name
# How many values the average holds, recorded only where the steps list holds fewer: an online export
# records its last step alone, where one entry per update would outgrow safetensors' 100 MB header.
COUNT_KEY = "values"


def output_metadata(
    settings: AverageSettings, dtype: str, steps: list[int], files: list[str], count: int | None = None
) -> dict[str, str]:
    """What an output records of how it was made (safetensors metadata values are strings); ``count``, the
    values it holds, where the ``steps`` list does not name each of them."""
    recorded = {
        "format": "pt",
        TOOL_MARKER_KEY: __version__,
        **settings.as_metadata(),
        "dtype": dtype,
        STEPS_KEY: json.dumps(steps),
        LAST_STEP_KEY: str(steps[-1]),
        FILES_KEY: json.dumps(files),
    }
    if count is not None and count != len(steps):
        recorded[COUNT_KEY] = str(count)
    return recorded


@dataclass
class Resumed:
    """An earlier output being continued: the file as a source, what it holds, how it was made."""

    average: ResumedAverage
    progress: ResumedProgress
    steps: list[int]
    files: list[str]


class ResumedAverage(Checkpoint):
    """An earlier output read as the first source of a run, by the checkpoints' own tensor names.

    Its tensors keep the dtype they were written in (float32 averages stay float32 even when the
    checkpoints are bf16): ``specs()`` says so, and the pipeline reads them in that dtype.
    """

    layout = "earlier average"

    def __init__(self, file: SafetensorsCheckpoint) -> None:
        super().__init__(file.path)
        self.file = file
        self._names: dict[str, str] = {}  # checkpoint name -> name in the output

    def use_names(self, outputs: list[OutputTensor]) -> None:
        self._names = {t.input_name: t.name for t in outputs}

    def specs(self) -> dict[str, TensorSpec]:
        held = self.file.specs()
        return {source: held[name] for source, name in self._names.items() if name in held}

    def read(self, name: str) -> torch.Tensor:
        return self.file.read(self._names[name])

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.file.read_into(self._names[name], out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self.file.read_range_into(self._names[name], start, out)

    def close(self) -> None:
        self.file.close()


def open_resumed(path: Path, settings: AverageSettings) -> Resumed:
    """An earlier output to continue, checked to be ours, made with these very settings, and consistent."""
    try:
        file = SafetensorsCheckpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(path, f"cannot be resumed: {exc.problem}") from exc
    meta = file.metadata
    if not file.written_by_this_tool or LAST_STEP_KEY not in meta:
        raise CheckpointMismatchError(path, "was not written by ema-average, so it cannot be resumed")
    for key, wanted in settings.as_metadata().items():
        recorded = meta.get(key)
        if recorded != wanted:
            raise CheckpointMismatchError(
                path, f"was made with {key} {recorded}, not {wanted}: resume with the same settings"
            )
    steps = _recorded_steps(path, meta)
    files = _recorded_files(path, meta, len(steps))
    count = _recorded_count(path, meta, len(steps))
    return Resumed(ResumedAverage(file), ResumedProgress(count, steps[-1]), steps, files)


def _recorded_steps(path: Path, meta: dict[str, str]) -> list[int]:
    """The steps list, increasing whole numbers, whose last entry is ``last_step``."""
    listed = _json_list(path, meta, STEPS_KEY)
    steps = [s for s in listed if _is_step(s)]
    if not steps or len(steps) != len(listed):
        raise _edited(path, f"its {STEPS_KEY!r} is not a list of steps")
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise _edited(path, f"its {STEPS_KEY!r} do not increase")
    if meta.get(LAST_STEP_KEY) != str(steps[-1]):
        raise _edited(
            path, f"its {LAST_STEP_KEY} {meta.get(LAST_STEP_KEY)!r} is not its last step {steps[-1]}"
        )
    return steps


def _recorded_count(path: Path, meta: dict[str, str], listed: int) -> int:
    """The values the average holds: its ``values`` entry where there is one, else one per listed step."""
    text = meta.get(COUNT_KEY)
    if text is None:
        return listed
    if not (text.isascii() and text.isdigit() and listed < int(text) <= MAX_STEP):
        raise _edited(path, f"its {COUNT_KEY!r} {text!r} is not a count above its {listed} listed steps")
    return int(text)


def _recorded_files(path: Path, meta: dict[str, str], count: int) -> list[str]:
    listed = _json_list(path, meta, FILES_KEY)
    files = [f for f in listed if isinstance(f, str)]
    if len(files) != count or len(files) != len(listed):
        raise _edited(path, f"its {FILES_KEY!r} do not name one file per step")
    return files


def _json_list(path: Path, meta: dict[str, str], key: str) -> list[object]:
    try:
        value = json.loads(meta.get(key, ""))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise _edited(path, f"its {key!r} is not a JSON list")
    return value


def _is_step(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def _edited(path: Path, problem: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(path, f"cannot be resumed: {problem} (was its metadata edited?)")


def check_resumable(resumed: Resumed, outputs: list[OutputTensor], notes: list[str]) -> None:
    """The earlier output must hold every averaged tensor, same shape; say when it was rounded."""
    resumed.average.use_names(outputs)
    specs = resumed.average.file.specs()
    for t in outputs:
        if not t.averaged or t.alias_of is not None:
            continue
        held = specs.get(t.name)
        if held is None or held.shape != t.spec.shape:
            problem = "has no tensor" if held is None else f"has shape {list(held.shape)} for"
            raise CheckpointMismatchError(resumed.average.path, f"{problem} {t.name!r}; it cannot be resumed")
    rounded = sorted({str(s.dtype).removeprefix("torch.") for s in specs.values() if s.dtype in _ROUNDED})
    if rounded:
        notes.append(
            f"{resumed.average.path.name} holds {'/'.join(rounded)} averages: the result equals one run over all "
            "checkpoints up to that rounding (write with --dtype float32 for bit-exact resumes)"
        )


def left_out(resumed: Resumed, steps: list[tuple[str, int]]) -> list[str]:
    """Notes for checkpoints at or before the output's last step that it does not hold.

    They are never applied (an average cannot take an older checkpoint after newer ones), but a user
    watching a run whose checkpoints completed out of order must hear of it, every time.
    """
    if resumed.progress.count > len(resumed.steps):
        return []  # an online export lists its last step alone: which earlier steps it holds is unknown
    held = set(resumed.steps)
    last = resumed.progress.last_step
    return [
        f"{name} (step {step}) is not applied: {resumed.average.path.name} already holds steps up to {last}"
        for name, step in steps
        if step <= last and step not in held
    ]


_ROUNDED = (torch.bfloat16, torch.float16)
