"""``*.safetensors`` files: a JSON header, then raw little-endian tensor bytes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    StepInfo,
    TensorSpec,
    damage_of,
    require_regular_file,
)
from ema_average.checkpoints.keys import STEP_KEYS, is_side_file
from ema_average.checkpoints.steps import checked_step
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES, DTYPES, read_header

__all__ = ["DTYPES", "DTYPE_NAMES", "LAYOUT", "TOOL_MARKER_KEY", "SafetensorsCheckpoint"]

# The key under which this tool marks its own outputs, so that they are never taken as inputs.
TOOL_MARKER_KEY = "ema_average_version"


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file; tensors are read with ``pread`` into fresh or given buffers (no mapping)."""

    layout = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        require_regular_file(path)
        damage = damage_of(path)
        if damage is not None:
            raise CheckpointError(path, damage)
        header = read_header(path)
        self.metadata: dict[str, str] = header.metadata
        self._data_start = header.data_start
        self._specs = {name: TensorSpec(e.shape, e.dtype) for name, e in header.entries.items()}
        self._offsets = {name: (e.begin, e.end) for name, e in header.entries.items()}
        self._fd: int | None = None

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
        start, end = self._offsets[name]
        return self._pread(name, start, end, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        begin, _ = self._offsets[name]
        itemsize = self._specs[name].dtype.itemsize
        first = begin + start * itemsize
        return self._pread(name, first, first + out.numel() * itemsize, out)

    def _pread(self, name: str, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Bytes ``start .. end`` of the data section into ``out``, without a mapping or a temporary."""
        if end == start:
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise CheckpointError(self.path, f"cannot be read ({exc.strerror or exc})") from exc
        done = 0
        while done < end - start:  # pread may return short counts on large reads
            try:
                n = os.preadv(self._fd, [view[done:]], self._data_start + start + done)
            except OSError as exc:
                raise CheckpointError(self.path, f"read failed in tensor {name!r} ({exc.strerror})") from exc
            if n == 0:
                raise CheckpointError(self.path, f"file ends inside tensor {name!r} (truncated?)")
            done += n
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _claims(path: Path) -> bool:
    return path.name.lower().endswith(".safetensors") and not is_side_file(path.name)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return SafetensorsCheckpoint(path)


LAYOUT = Layout("safetensors", "file", "files ending .safetensors", _claims, _open)
