"""``*.safetensors`` files: a JSON header, then raw little-endian tensor bytes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    PreadFile,
    StepInfo,
    TensorSpec,
    damage_of,
    require_regular_file,
)
from ema_average.checkpoints.json_file import read_json
from ema_average.checkpoints.keys import STEP_KEYS, is_side_file
from ema_average.checkpoints.steps import checked_step, stated_step
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES, DTYPES, read_header

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "LAYOUT",
    "MARKER_FILE",
    "POSTHOC_KEYS",
    "TOOL_MARKER_KEY",
    "SafetensorsCheckpoint",
    "in_marked_folder",
    "is_posthoc_snapshot",
    "marked_json",
]

# The key under which this tool marks its own outputs, so that they are never taken as inputs.
TOOL_MARKER_KEY = "ema_average_version"
# Beside a folder output's torch weights, which carry no metadata: the run's metadata under that key. A
# folder holding it is an output of this tool, whatever else it holds (lit_model.pth).
MARKER_FILE = "ema_average.json"
# What a post-hoc EMA snapshot records of its profile (ema_average.posthoc): one of these, beside its step.
POSTHOC_KEYS = ("posthoc_gamma", "posthoc_sigma_rel")


def is_posthoc_snapshot(path: Path) -> bool:
    """Whether ``path`` is a post-hoc EMA snapshot (its header names a profile): read by
    ``--method posthoc``, never taken as a checkpoint of the run. Reads the header only."""
    if not path.name.endswith(".safetensors"):
        return False
    try:
        metadata = read_header(path).metadata
    except (OSError, CheckpointError, ValueError):
        return False
    return any(key in metadata for key in POSTHOC_KEYS)


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file; tensors are read with ``pread`` into fresh or given buffers (no mapping), its
    descriptor taken from the process's bounded pool (:class:`PreadFile`)."""

    layout = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        planned = require_regular_file(path)
        damage = damage_of(path)
        if damage is not None:
            raise CheckpointError(path, damage)
        header = read_header(path)
        self.metadata: dict[str, str] = header.metadata
        self._data_start = header.data_start
        self._specs = {name: TensorSpec(e.shape, e.dtype) for name, e in header.entries.items()}
        self._offsets = {name: (e.begin, e.end) for name, e in header.entries.items()}
        self._file = PreadFile(path, planned)

    @property
    def written_by_this_tool(self) -> bool:
        return TOOL_MARKER_KEY in self.metadata

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def metadata_step(self) -> StepInfo | None:
        for key in STEP_KEYS:
            if key in self.metadata:
                return StepInfo(
                    checked_step(self.path, self.metadata[key], f"metadata:{key}"), f"metadata:{key}"
                )
        return stated_step(self.path, dict(self.metadata), "metadata")  # a key off the list

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        begin, _ = self._offsets[name]
        return self._file.read_into(out, self._data_start + begin, name)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        begin, _ = self._offsets[name]
        first = begin + start * self._specs[name].dtype.itemsize
        return self._file.read_into(out, self._data_start + first, name)

    def close(self) -> None:
        self._file.close()


def _claims(path: Path) -> bool:
    return path.name.lower().endswith(".safetensors") and not is_side_file(path.name)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return SafetensorsCheckpoint(path)


LAYOUT = Layout("safetensors", "file", "files ending .safetensors", _claims, _open)


def marked_json(path: Path) -> bool:
    """``path`` is an index or ``MARKER_FILE`` this tool wrote: a JSON object whose ``metadata`` holds the
    tool's marker key. Anything unreadable (a FIFO, a link, deep nesting, not JSON) is not."""
    try:
        record = read_json(path, follow_links=False)
    except CheckpointError:
        return False
    metadata = record.get("metadata") if isinstance(record, dict) else None
    return isinstance(metadata, dict) and TOOL_MARKER_KEY in metadata


def in_marked_folder(path: Path) -> bool:
    """``path`` (a unit: a folder, or a file) is, or is in, a folder output of this tool: the folder holds
    the tool's ``MARKER_FILE``. A structural sign that needs no layout to know its own outputs."""
    folder = path if path.is_dir() else path.parent
    return os.path.lexists(folder / MARKER_FILE) and marked_json(folder / MARKER_FILE)
