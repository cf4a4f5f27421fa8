"""Find the checkpoints of one training run in a folder, give each its step, and check they agree."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ema_average.checkpoints.base import Checkpoint, StepInfo
from ema_average.checkpoints.dcp_folder import DcpCheckpoint, is_dcp_folder
from ema_average.checkpoints.hf_folder import HfFolderCheckpoint, is_hf_folder, open_weights_file
from ema_average.checkpoints.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.steps import CHECKPOINT_SUFFIXES, PATTERN_NAMES, step_from_name
from ema_average.errors import CheckpointError, CheckpointMismatchError, NoCheckpointsError

StepsFrom = Literal["auto", "metadata", "filename"]  # options.STEPS_FROM, as a type

# Files trainers write beside the weights that are not model checkpoints (HF Trainer, DeepSpeed...).
_NOT_WEIGHTS = ("optimizer", "optim_states", "scheduler", "rng_state", "training_args", "scaler")

LOOKED_FOR = (
    f"files ending {', '.join(CHECKPOINT_SUFFIXES)}; Hugging Face checkpoint-N/ folders; "
    "DCP folders (.metadata + *.distcp)"
)


@dataclass
class Run:
    """The checkpoints of one run in step order, and what discovery skipped and why."""

    root: Path
    checkpoints: list[Checkpoint]
    notices: list[str] = field(default_factory=list)
    units: list[Path] = field(default_factory=list)  # the user's checkpoints found, taken or skipped


def discover(
    path: str | Path,
    *,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    steps_from: StepsFrom = "auto",
) -> list[Checkpoint]:
    """The checkpoints under ``path`` in step order (see :func:`find_run` for the notices too)."""
    return find_run(
        path, state_dict_key=state_dict_key, trust_pickle=trust_pickle, steps_from=steps_from
    ).checkpoints


def find_run(
    path: str | Path,
    *,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    steps_from: StepsFrom = "auto",
    only: set[Path] | None = None,
) -> Run:
    """Find, open, step, de-duplicate and validate the checkpoints of the run under ``path``.

    ``only`` restricts the run to those candidates (``--watch`` passes the ones that are complete).

    Nothing is read beyond headers, pickled structure and step records, except the tensors of two
    checkpoints that claim the same step (to tell a copy, such as fairseq's checkpoint_last.pt, from
    a real conflict).
    """
    root = Path(path)
    if not root.exists():
        raise NoCheckpointsError(root, "does not exist")
    if not root.is_dir():
        raise NoCheckpointsError(
            root, "is not a directory; point at the folder holding the run's checkpoints"
        )
    if is_hf_folder(root) or is_dcp_folder(root):
        raise NoCheckpointsError(
            root,
            "is one checkpoint folder; point at the folder that holds the run's checkpoints (its parent)",
        )
    notices: list[str] = []
    found = candidates(root)
    units = list(found)
    if only is not None:
        found = [c for c in found if c in only]
    checkpoints: list[Checkpoint] = []
    for candidate in found:
        ckpt = _open(candidate, state_dict_key, trust_pickle)
        if isinstance(ckpt, SafetensorsCheckpoint) and ckpt.written_by_this_tool:
            notices.append(f"skipped {candidate}: written by ema-average itself")
            units.remove(candidate)
            continue
        info = _step_of(ckpt, steps_from)
        ckpt.step, ckpt.step_source = info.step, info.source
        checkpoints.append(ckpt)
    if not checkpoints:
        raise NoCheckpointsError(root, f"no checkpoints found; looked for {LOOKED_FOR}")
    checkpoints = _drop_copies(checkpoints, notices)
    checkpoints.sort(key=lambda c: c.step if c.step is not None else -1)
    validate_run(checkpoints)
    return Run(root, checkpoints, notices, units)


def candidates(root: Path) -> list[Path]:
    """Checkpoint files and folders below ``root``, all from one folder (one run)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders are never searched
        units = [here / d for d in dirs if is_hf_folder(here / d) or is_dcp_folder(here / d)]
        found += units
        dirs[:] = [d for d in dirs if here / d not in units]
        found += [here / f for f in sorted(files) if _is_weights_file(f)]
    parents = sorted({str(p.parent) for p in found})
    if len(parents) > 1:
        shown = ", ".join(parents[:4]) + (" ..." if len(parents) > 4 else "")
        raise CheckpointError(
            root, f"holds checkpoints in {len(parents)} folders ({shown}); point at one run's folder"
        )
    return sorted(found)


def _is_weights_file(name: str) -> bool:
    lower = name.lower()
    return (
        lower.endswith(CHECKPOINT_SUFFIXES)
        and not name.startswith(".")
        and not any(marker in lower for marker in _NOT_WEIGHTS)
    )


def _open(path: Path, state_dict_key: str | None, trust_pickle: bool) -> Checkpoint:
    if path.is_dir():
        if is_dcp_folder(path):
            return DcpCheckpoint(path, state_dict_key=state_dict_key, trust_pickle=trust_pickle)
        return HfFolderCheckpoint(path, trust_pickle=trust_pickle)
    return open_weights_file(path, state_dict_key=state_dict_key, trust_pickle=trust_pickle)


def _step_of(ckpt: Checkpoint, steps_from: StepsFrom) -> StepInfo:
    sources: dict[str, Callable[[], StepInfo | None]] = {
        "metadata": ckpt.metadata_step,
        "filename": lambda: step_from_name(ckpt.path),
    }
    order = ["metadata", "filename"] if steps_from == "auto" else [steps_from]
    for source in order:
        info = sources[source]()
        if info is not None:
            return info
    where = {
        "auto": "in its contents or its name",
        "metadata": "in its contents (--steps-from metadata)",
        "filename": f"in its name (--steps-from filename; patterns {', '.join(PATTERN_NAMES)})",
    }[steps_from]
    raise CheckpointError(ckpt.path, f"no training step found {where}")


def _same_tensors(a: Checkpoint, b: Checkpoint) -> bool:
    if a.specs() != b.specs():
        return False
    return all(torch.equal(a.read(name), b.read(name)) for name in a.specs())


def _drop_copies(checkpoints: list[Checkpoint], notices: list[str]) -> list[Checkpoint]:
    """Keep one of each set of same-step, same-tensor files; a same-step conflict is an error."""
    by_step: dict[int, Checkpoint] = {}
    for ckpt in checkpoints:
        assert ckpt.step is not None
        kept = by_step.get(ckpt.step)
        if kept is None:
            by_step[ckpt.step] = ckpt
            continue
        if not _same_tensors(kept, ckpt):
            raise CheckpointMismatchError(
                ckpt.path, f"has step {ckpt.step}, as does {kept.path}, but different weights"
            )
        # Keep the one whose name says its step (checkpoint_3_1200.pt over checkpoint_last.pt).
        if _named_for_step(ckpt) and not _named_for_step(kept):
            kept, ckpt = ckpt, kept
            by_step[kept.step] = kept  # type: ignore[index]
        notices.append(f"skipped {ckpt.path}: same step ({ckpt.step}) and weights as {kept.path}")
        ckpt.close()
    return list(by_step.values())


def _named_for_step(ckpt: Checkpoint) -> bool:
    info = step_from_name(ckpt.path)
    return info is not None and info.step == ckpt.step


def validate_run(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must hold the first one's tensor names, shapes and dtypes."""
    first = checkpoints[0]
    reference = first.specs()
    for ckpt in checkpoints[1:]:
        specs = ckpt.specs()
        for name, spec in reference.items():
            other = specs.get(name)
            if other is None:
                raise CheckpointMismatchError(
                    ckpt.path, f"has no tensor {name!r} (present in {first.path.name})"
                )
            if other != spec:
                raise CheckpointMismatchError(
                    ckpt.path,
                    f"tensor {name!r} is {_describe(other)}, but {_describe(spec)} in {first.path.name}",
                )
        extra = next((name for name in specs if name not in reference), None)
        if extra is not None:
            raise CheckpointMismatchError(ckpt.path, f"has tensor {extra!r}, absent from {first.path.name}")


def _describe(spec: object) -> str:
    shape = getattr(spec, "shape", ())
    dtype = str(getattr(spec, "dtype", "")).removeprefix("torch.")
    return f"{dtype}{list(shape)}"
