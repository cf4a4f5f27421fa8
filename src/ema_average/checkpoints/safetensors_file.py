"""``*.safetensors`` files: a JSON header, then raw little-endian tensor bytes."""

from __future__ import annotations

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
from ema_average.checkpoints.keys import STEP_KEYS, is_side_file
from ema_average.checkpoints.steps import checked_step
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES, DTYPES, read_header

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "LAYOUT",
    "POSTHOC_KEYS",
    "TOOL_MARKER_KEY",
    "SafetensorsCheckpoint",
    "is_posthoc_snapshot",
]

# The key under which this tool marks its own outputs, so that they are never taken as inputs.
TOOL_MARKER_KEY = "ema_average_version"
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
        return None

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
