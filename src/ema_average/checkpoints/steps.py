"""Training steps from file and folder names, for checkpoints whose contents do not record one."""

from __future__ import annotations

import re
from pathlib import Path

from ema_average.checkpoints.base import StepInfo

# Most specific first: "epoch=3-step=1200" must give 1200, not 3; "checkpoint_3_1200" gives 1200.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("global_stepN", re.compile(r"global[_-]?step[=_-]?(\d+)", re.IGNORECASE)),
    ("step=N", re.compile(r"(?<![a-z])step[=_-]?(\d+)", re.IGNORECASE)),
    ("checkpoint-N", re.compile(r"checkpoint-(\d+)$", re.IGNORECASE)),
    ("iter_N", re.compile(r"iter(?:ation)?[=_-]?(\d+)", re.IGNORECASE)),
    ("_N", re.compile(r"_(\d+)$")),
]

PATTERN_NAMES = [name for name, _ in _PATTERNS]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th")


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
            return StepInfo(int(found[-1]), f"filename:{label}")
    return None
