"""Checks on a tensor read from an untrusted file before it is averaged: a dense CPU tensor of a dtype
safetensors stores, no wider than its storage, and a file's tensors naming no more bytes than they are
stored in; tied weights found by storage identity. Every layout's reading asks these."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from ema_average.checkpoints.reading.safe_unpickle import ZipMember
from ema_average.checkpoints.reading.tensor_state import layout_of, numel_of
from ema_average.checkpoints.reading.zip_offsets import file_offset as _file_offset
from ema_average.checkpoints.safetensors_format import DTYPE_NAMES


def storage_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied weights: names whose tensor is the same view of the same storage as an earlier name's."""
    return first_names(
        {
            name: (torch.Tensor.untyped_storage(t).data_ptr(), *layout_of(t), t.dtype)
            for name, t in tensors.items()
            if numel_of(t)
        }
    )


def first_names(identities: Mapping[str, Hashable]) -> dict[str, str]:
    """Each name whose identity an earlier name has already, mapped to that first name."""
    first: dict[Hashable, str] = {}
    found: dict[str, str] = {}
    for name, identity in identities.items():
        if identity in first:
            found[name] = first[identity]
        else:
            first[identity] = name
    return found


def tensor_problem(tensor: torch.Tensor, *, in_file: bool = False) -> str | None:
    """Why this tool cannot average ``tensor`` (completing "tensor 'x' ..."), or ``None`` if it can.

    ``in_file``: a tensor unpickled onto the meta device whose values are in its file (read later).
    """
    if tensor.is_nested or tensor.layout != torch.strided:
        return f"is not a dense tensor (layout {tensor.layout}); sparse and nested tensors cannot be averaged"
    if tensor.device.type != "cpu" and not in_file:
        return f"is a {tensor.device.type} tensor, which holds no values to average"
    if tensor.is_quantized:
        return f"is quantized ({tensor.dtype}); quantized tensors cannot be averaged"
    problem = dtype_problem(tensor.dtype)
    if problem is not None:
        return problem
    return _extent_problem(tensor)


def dtype_problem(dtype: torch.dtype) -> str | None:
    """Why tensors of ``dtype`` cannot be averaged and written (safetensors), or ``None``."""
    name = str(dtype).removeprefix("torch.")
    if dtype.is_complex:
        return f"is {name} (complex), which cannot be averaged"
    if dtype not in DTYPE_NAMES:
        return f"is {name}, which safetensors cannot store"
    return None


def _extent_problem(tensor: torch.Tensor) -> str | None:
    """A view wider than its storage (a broadcast, stride 0): a few bytes of file, any size of output.
    Sizes from the shape and the dtype, never from the tensor's methods."""
    numel = numel_of(tensor)
    if numel == 0:
        return None
    itemsize = tensor.dtype.itemsize
    needed = numel * itemsize
    offset = layout_of(tensor)[2]
    available = torch.Tensor.untyped_storage(tensor).nbytes() - offset * itemsize
    if needed <= available:
        return None
    return (
        f"has {numel} elements ({needed} bytes) over only {max(available, 0)} bytes of storage "
        "(an expanded or broadcast view); it would be materialised at full size, so it is refused"
    )


# How many times over a file's tensors may name the bytes they are stored in. Tied weights name one storage
# twice, a block repeated through ``nn.ModuleList([block] * n)`` n times; a hostile file can name one
# storage thousands of times (or as thousands of overlapping slices), each written out at full size.
MAX_NAMED_PER_STORED = 64


def named_bytes_problem(
    tensors: Mapping[str, torch.Tensor], members: Mapping[int, ZipMember] | None
) -> str | None:
    """Why the tensors name too many bytes for the storage they view, or ``None``. ``members``: the zip
    members a lazily read file's storages lie in (their real size: a pickle may declare any storage size);
    ``None`` for loaded tensors, whose storages are in memory."""
    stored: dict[Hashable, int] = {}
    named = 0
    for tensor in tensors.values():
        numel = numel_of(tensor)
        if not numel:
            continue
        named += numel * tensor.dtype.itemsize
        offset = _file_offset(tensor) if members is not None else None
        if offset is not None and members is not None and offset in members:
            stored[("file", offset)] = members[offset].size
        else:
            storage = torch.Tensor.untyped_storage(tensor)
            stored[("memory", storage.data_ptr())] = storage.nbytes()
    total = sum(stored.values())
    if named <= MAX_NAMED_PER_STORED * max(total, 1):
        return None
    return (
        f"names {named} bytes of tensors over only {total} bytes of storage (one storage viewed under many "
        f"names); more than {MAX_NAMED_PER_STORED} times over is refused: the output would be as large"
    )
