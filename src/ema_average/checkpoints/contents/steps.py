"""Training steps from file and folder names, for checkpoints whose contents do not record one."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch

from ema_average.checkpoints.contents.keys import CHECKPOINT_SUFFIXES, COUNTED_FROM_1
from ema_average.errors import CheckpointError


@dataclass(frozen=True)
class StepInfo:
    """A training step and where it was found, e.g. ``(1200, "metadata:global_step")``.

    ``counter`` marks a number that counts saves or epochs rather than optimizer steps (accelerate's
    ``checkpoint_K``, timm's ``epoch``, torchtune's ``epoch_E``): the plan flags it, and ``step_every``
    turns it into a step.
    """

    step: int
    origin: str
    counter: bool = False


# Steps are stored as int64 by every trainer; anything larger is damage or hostility, and would
# overflow the float arithmetic of the decay rules.
MAX_STEP = 2**63 - 1

# Most specific first: "epoch=3-step=1200" must give 1200, not 3; "checkpoint_3_1200" gives 1200.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("global_stepN", re.compile(r"global[_-]?step[=_-]?(\d+)", re.IGNORECASE | re.ASCII)),
    # torchtnt's fit saves: epoch_E_train_step_N_eval_step_M, N the training steps
    ("train_step_N", re.compile(r"train[_-]?step[=_-]?(\d+)", re.IGNORECASE | re.ASCII)),
    ("step=N", re.compile(r"(?<![a-z])step[=_-]?(\d+)", re.IGNORECASE | re.ASCII)),
    ("checkpoint-N", re.compile(r"checkpoint-(\d+)$", re.IGNORECASE | re.ASCII)),
    ("baN", re.compile(r"(?:^|[-_])ba(\d+)(?=$|[-_])", re.IGNORECASE | re.ASCII)),  # composer ep1-ba42
    ("iter_N", re.compile(r"iter(?:ation)?[=_-]?(\d+)", re.IGNORECASE | re.ASCII)),
    ("epoch_N", re.compile(r"(?<![a-z])epoch[=_-]?(\d+)$", re.IGNORECASE | re.ASCII)),  # torchtune epoch_0
    ("_N", re.compile(r"_(\d+)$", re.ASCII)),
]

PATTERN_NAMES = [name for name, _ in _PATTERNS]

# Labels whose number counts epochs, not optimizer steps.
_COUNTER_LABELS = {"epoch_N"}

# "_N" alone is too weak to say a folder is a step of the run (text_encoder_2 is a diffusers sub-model);
# accelerate's checkpoint_K folders are the exception that is named.
_STRONG_EXTRA = re.compile(r"checkpoint_(\d+)$", re.IGNORECASE | re.ASCII)


def stem_of(path: Path) -> str:
    """The name without checkpoint suffixes (``model.ckpt`` -> ``model``, folders as they are)."""
    name = path.name
    for suffix in CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def step_from_name(path: Path) -> StepInfo | None:
    """The step a file or folder name carries, by the first pattern that matches."""
    stem = stem_of(path)
    for label, pattern in _PATTERNS:
        found = pattern.findall(stem)
        if found:
            step = checked_step(path, found[-1], label)
            return StepInfo(step, f"filename:{label}", counter=label in _COUNTER_LABELS)
    return None


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """A name as text and numbers, so that ``model_9`` sorts before ``model_10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def first_count(origin: str) -> int:
    """The count a counted checkpoint's first save carries: 1 for epochs completed (open_clip, mmengine),
    0 for an index or a save count (timm, ultralytics, torchtune's ``epoch_0``, accelerate's ``checkpoint_0``)."""
    return 1 if COUNTED_FROM_1 in origin else 0


def step_of_count(path: Path, count: int, origin: str, step_every: int) -> tuple[int, str]:
    """The training step of the ``count``-th save made every ``step_every`` steps, and the origin that says
    how it was counted: ``(count + 1 - first) x step_every``."""
    first = first_count(origin)
    formula = f"(n+1) x {step_every}" if first == 0 else f"n x {step_every}"
    where = f"{origin}, counted from {first}: {formula}"
    return checked_step(path, (count + 1 - first) * step_every, where), where


def names_a_step(path: Path) -> bool:
    """Whether a name says clearly that it is one step of a run (``checkpoint-500``, ``global_step6``,
    ``epoch_2``, ``checkpoint_3``), as opposed to a model's part (``unet``, ``text_encoder_2``)."""
    info = step_from_name(path)
    return (info is not None and info.origin != "filename:_N") or bool(_STRONG_EXTRA.search(stem_of(path)))


_DECIMAL = re.compile(r"^\s*(\d{1,19})\s*$", re.ASCII)

# Words that make a key a step record (``optimizer_step``, ``trainIteration``, ``num_updates``), and words
# that make it a setting or another count (``max_steps``, ``warmup_steps``, ``save_steps``, ``epoch``).
_STEP_WORDS = {"step", "steps", "iteration", "iterations", "iter", "iters", "update", "updates"}
_NOT_A_STEP = {
    *("max", "total", "warmup", "warm", "save", "eval", "log", "logging", "every", "interval", "per"),
    *("decay", "lr", "schedule", "scheduler", "accumulation", "accum", "gradient", "grad", "target"),
    *("remaining", "cooldown", "print", "val", "validation", "test", "checkpoint", "ckpt", "sample"),
    *("samples", "epoch", "epochs", "tokens", "time", "size", "limit", "patience", "delay", "start"),
    *("stop", "first", "min", "until", "in", "since", "best", "last", "stage", "freq", "frequency"),
}
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", re.ASCII)


def names_a_step_record(key: str) -> bool:
    """Whether a metadata key says it records the training step reached (``optimizer_step``,
    ``trainIteration``, ``completed_steps``), not a setting (``max_steps``) or another count."""
    words = {w.lower() for w in _WORD.findall(key)}
    if "num" in words and not words & {"completed", "done", "taken", "seen"}:
        return False  # num_train_steps is a setting; num_steps_completed a record
    return bool(words & _STEP_WORDS) and not words & _NOT_A_STEP


def stated_step(path: Path, record: Mapping[str, object], where: str) -> StepInfo | None:
    """The step a record states under a key that names one (any trainer's: the listed keys are tried
    first by the layouts), where all such keys agree on a whole number; None otherwise."""
    found: dict[int, str] = {}
    for key, value in record.items():
        if not isinstance(key, str) or not names_a_step_record(key):
            continue
        whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if whole or (isinstance(value, str) and _DECIMAL.match(value)):
            found.setdefault(checked_step(path, value, f"{where}:{key}"), key)
    if len(found) != 1:
        return None
    ((step, key),) = found.items()
    return StepInfo(step, f"{where}:{key}")


def checked_step(path: Path, value: object, where: str) -> int:
    """A step as an int in [0, MAX_STEP], from an int, an ASCII decimal string, or a 0-d integer tensor.

    Every reader passes what it found through here, so a hostile or damaged step ('²', 10**400, -5, a
    complex tensor) is one clear error naming the file, never a traceback deep in the decay arithmetic.
    """
    step: int | None = None
    if isinstance(value, str):
        match = _DECIMAL.match(value)
        step = int(match.group(1)) if match else None
    elif isinstance(value, int) and not isinstance(value, bool):
        step = value
    elif _is_integer_scalar_tensor(value):
        step = int(value.item())
    if step is None or not 0 <= step <= MAX_STEP:
        shown = _short_repr(value)
        raise CheckpointError(path, f"has step {shown} ({where}), not a whole number in 0..{MAX_STEP}")
    return step


def _short_repr(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"  # repr() of a huge int is slow, or refused
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_integer_scalar_tensor(value: object) -> TypeGuard[torch.Tensor]:
    return (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and value.layout == torch.strided
        and value.device.type != "meta"
        and not value.dtype.is_floating_point
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )
