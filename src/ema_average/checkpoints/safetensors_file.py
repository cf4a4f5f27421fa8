"""``*.safetensors`` files: a JSON header, then raw little-endian tensor bytes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ema_average.checkpoints.base import Checkpoint, StepInfo, TensorSpec
from ema_average.errors import CheckpointError

# Dtype names of the safetensors format (its spec's "dtype" field).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

STEP_KEYS = ("global_step", "step", "num_updates", "iteration", "train_step")

# The key under which this tool marks its own outputs, so that they are never taken as inputs.
TOOL_MARKER_KEY = "ema_average_version"


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The raw header and the offset where tensor bytes begin.

    The safetensors library validates the file (``safe_open`` below) but does not expose byte offsets,
    which reading straight into a caller's buffer needs; the header is 8 bytes of length + JSON.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file; tensors are read with ``pread`` into fresh or given buffers (no mapping)."""

    layout = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            with safe_open(str(path), framework="pt") as f:  # validates header, offsets and dtypes
                self.metadata: dict[str, str] = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc
        header, self._data_start = read_header(path)
        header.pop("__metadata__", None)
        self._offsets: dict[str, tuple[int, int]] = {}
        self._specs: dict[str, TensorSpec] = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(
                    path, f"tensor {name!r} has dtype {entry['dtype']}, which torch cannot hold"
                )
            self._specs[name] = TensorSpec(tuple(entry["shape"]), DTYPES[entry["dtype"]])
            self._offsets[name] = tuple(entry["data_offsets"])  # type: ignore[assignment]
        self._fd: int | None = None

    @property
    def written_by_this_tool(self) -> bool:
        return TOOL_MARKER_KEY in self.metadata

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def metadata_step(self) -> StepInfo | None:
        for key in STEP_KEYS:
            value = self.metadata.get(key, "")
            if value.strip().isdigit():
                return StepInfo(int(value), f"metadata:{key}")
        return None

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        start, end = self._offsets[name]
        if end == start:
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < end - start:  # pread may return short counts on large reads
            n = os.preadv(self._fd, [view[done:]], self._data_start + start + done)
            if n == 0:
                raise CheckpointError(self.path, f"file ends inside tensor {name!r} (truncated?)")
            done += n
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
