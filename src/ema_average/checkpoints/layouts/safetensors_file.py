"""``*.safetensors`` files: a JSON header, then raw little-endian tensor bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import STEP_KEYS, is_side_file
from ema_average.checkpoints.contents.own_outputs import TOOL_MARKER_KEY
from ema_average.checkpoints.contents.steps import checked_step, stated_step
from ema_average.checkpoints.reading.file_checks import damage_of, require_regular_file
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.safetensors_format import read_header
from ema_average.errors import CheckpointError

__all__ = ["LAYOUT", "SafetensorsCheckpoint"]


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
