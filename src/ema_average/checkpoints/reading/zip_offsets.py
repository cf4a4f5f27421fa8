"""Where a tensor of a torch zip file lies in the file, and reading it from there with ``pread``.

Shared by torch files and DeepSpeed folders: a file unpickled onto the meta device
(:func:`ema_average.checkpoints.reading.safe_unpickle.open_torch_file`) gives each tensor's storage an offset;
its values are read into the caller's buffer, never mapped, so a file cut short while it is read is a
clear error, never a SIGBUS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average._platform.torch_compat import checkpoint_offset
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import ZipMember
from ema_average.checkpoints.reading.tensor_state import layout_of
from ema_average.errors import CheckpointError


class NotLaidOut(Exception):
    """A tensor's storage does not start where torch computes it would (a zip rewritten by another tool)."""


@dataclass(frozen=True)
class Stored:
    """Where one tensor's values lie in its file: the storage's first byte, and the view on it."""

    start: int  # file offset of the storage's first byte
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # the view's storage offset, in elements
    dtype: torch.dtype
    contiguous: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def identity(self) -> tuple[Any, ...]:
        """Equal for two names saved as the same view of the same storage (tied weights)."""
        return (self.start, self.offset, self.shape, self.stride, self.dtype)


def file_offset(tensor: torch.Tensor) -> int | None:
    """Where a tensor unpickled onto the meta device has its storage's bytes in the file; None for any
    other tensor (one saved on the meta device, sparse or nested ones, tensors in memory)."""
    if tensor.device.type != "meta" or tensor.layout != torch.strided or tensor.is_nested:
        return None
    return checkpoint_offset(tensor)


def stored(path: Path, name: str, tensor: torch.Tensor, members: dict[int, ZipMember]) -> Stored:
    """Where ``tensor`` (unpickled onto the meta device) lies in the file, checked to lie within its own
    zip member: a damaged pickle could point anywhere."""
    shape, stride, offset = layout_of(tensor)  # torch's own methods: a file cannot rewrite them
    contiguous = torch.Tensor.is_contiguous(tensor)
    if math.prod(shape) == 0:
        return Stored(0, shape, stride, offset, tensor.dtype, contiguous)
    offset_in_file = file_offset(tensor)
    member = members.get(offset_in_file) if offset_in_file is not None else None
    if member is None:
        raise NotLaidOut(f"no tensor data starts at byte {file_offset(tensor)}, where {name!r} would")
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
    reach = (last + 1) * tensor.dtype.itemsize
    if reach > member.size:
        raise CheckpointError(
            path,
            f"is damaged: tensor {name!r} reaches byte {reach} of its storage {member.name!r}, "
            f"which holds {member.size}",
        )
    return Stored(member.data_offset, shape, stride, offset, tensor.dtype, contiguous)


def fill(file: PreadFile, where: Stored, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
    """Elements ``start ..`` of the tensor (flattened) into ``out``, read from ``file``."""
    if out.numel() == 0:
        return out
    if where.contiguous:
        file.read_into(out, where.start + (where.offset + start) * where.dtype.itemsize, name)
    else:
        out.view(-1).copy_(_gather(file, where, name, start, out.numel()))
    return out


def _gather(file: PreadFile, where: Stored, name: str, start: int, count: int) -> torch.Tensor:
    """Elements ``start .. start + count`` of a view that is not contiguous (a transpose, a column
    slice): the bytes spanned by the rows holding them are read into a temporary, then gathered. Rare
    in state dicts; for a transpose the span is most of the storage, read again for every chunk."""
    inner = math.prod(where.shape[1:])
    first, last = start // inner, (start + count - 1) // inner
    tail = sum((size - 1) * step for size, step in zip(where.shape[1:], where.stride[1:], strict=True))
    low = where.offset + first * where.stride[0]
    span = torch.empty((last - first) * where.stride[0] + tail + 1, dtype=where.dtype)
    file.read_into(span, where.start + low * where.dtype.itemsize, name)
    rows = span.as_strided((last - first + 1, *where.shape[1:]), where.stride)
    skip = start - first * inner
    return rows.reshape(-1)[skip : skip + count]
