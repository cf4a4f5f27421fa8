"""The safetensors file format, in one place for the reader and the writer: dtype names and their order,
the header as the library writes it, which names it can hold, and a strict reading of a header.

A file is 8 bytes of little-endian header length, a JSON header, then the tensors' bytes back to back.
The header is parsed and checked here by hand rather than with ``safetensors.safe_open``, because
``safe_open`` maps the whole file first: a sparse 4 TB file, or a 12 GB one under a memory limit, then
fails inside the mapping with an error that names no file. The checks are the format's own rules (as the
library enforces them): a bounded header, known dtypes, offsets that tile the data section exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ema_average.errors import CheckpointError

# Dtype names of the safetensors format (its spec's "dtype" field) that torch can hold.
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

# The safetensors Dtype enum in declaration order; save_file sorts tensors by it, largest first.
_DTYPE_RANK = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
]

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the library's own limit

# torch indexes sizes, strides and byte offsets with int64; a shape beyond that cannot be a tensor, even an
# empty one ([2**63, 0]), and fails deep in torch with a C++ stack naming no file.
MAX_INDEX = 2**63 - 1
MAX_DIMS = 64  # no real tensor comes near; a header of millions of dims is hostile


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; ``begin``/``end`` are offsets into the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    entries: dict[str, HeaderEntry]  # in file order
    data_start: int  # absolute offset of the data section


def read_header(path: Path) -> Header:
    """The checked header of the safetensors file at ``path``; any violation is one CheckpointError."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _damaged(path, f"is {size} bytes long, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _damaged(path, f"claims a {length}-byte header in a {size}-byte file")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop(METADATA_KEY, None))
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    _check_tiling(path, entries, size - 8 - length)
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].begin))
    return Header(metadata, ordered, 8 + length)


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(path, f"not a readable safetensors file: {problem}")


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("a key appears twice")
        return result

    if not raw.lstrip().startswith(b"{"):
        raise _damaged(path, "the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(path, f"the header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    return header


def _metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _damaged(path, f"{METADATA_KEY} must map strings to strings")
    return value


def _entry(path: Path, name: str, value: object) -> HeaderEntry:
    if not isinstance(value, dict):
        raise _damaged(path, f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(path, f"tensor {name!r} has dtype {dtype!r}, which this tool cannot average")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise _damaged(path, f"tensor {name!r} has shape {str(shape)[:40]}")
    problem = shape_problem(shape, DTYPES[dtype])
    if problem is not None:
        raise CheckpointError(path, f"tensor {name!r} {problem}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _damaged(path, f"tensor {name!r} has data_offsets {str(offsets)[:40]}")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise _damaged(path, f"tensor {name!r}: data_offsets {offsets} do not fit {dtype}{shape}")
    return HeaderEntry(DTYPES[dtype], tuple(shape), begin, end)


def shape_problem(shape: Sequence[int], dtype: torch.dtype) -> str | None:
    """Why no tensor can have ``shape`` (non-negative ints) and ``dtype``, or None when one can.

    Every dim, and the bytes a tensor would span were its zero dims one (what its strides reach), must
    fit torch's int64 indexing.
    """
    if len(shape) > MAX_DIMS:
        return f"has {len(shape)} dimensions, more than the {MAX_DIMS} any tensor has; refused"
    span = dtype.itemsize
    for dim in shape:
        span *= max(dim, 1)
        if dim > MAX_INDEX or span > MAX_INDEX:
            shown = str(list(shape))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return f"has shape {shown}, beyond what torch can index (int64 sizes and strides); refused"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(path: Path, entries: dict[str, HeaderEntry], data_size: int) -> None:
    """Tensors must cover the data section exactly: no gaps, no overlaps, nothing past its end."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _damaged(path, f"tensor {name!r} starts at {entry.begin}, expected {position}")
        position = entry.end
    if position != data_size:
        problem = "is truncated" if position > data_size else "has bytes after the last tensor"
        raise _damaged(path, f"{problem} (tensors end at {position}, data section is {data_size} bytes)")


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor, known without reading it: what a checkpoint holds, and (with a name)
    what a written file's header lists."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file being written: its name and spec, as its header entry lists them."""

    name: str
    spec: TensorSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


def safetensors_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """The order ``save_file`` stores tensors in: dtype rank descending, then name."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.index(DTYPE_NAMES[e.dtype]), e.name))


def build_header(
    entries: Sequence[TensorEntry], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, int]]:
    """The padded header bytes and each tensor's byte offset within the data section."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offsets: dict[str, int] = {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offsets[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a tensor name in a safetensors file, or None when it can."""
    if not isinstance(name, str):
        return f"the name is a {type(name).__name__}, not a string"
    if not name:
        return "the name is empty"
    if name == METADATA_KEY:
        return f"{METADATA_KEY} is reserved for the file's metadata"
    return utf8_problem(name)


def utf8_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "the name holds a lone surrogate, which UTF-8 cannot encode"
    return None
