"""A tensor read from a file carries no state of its own, and its size is its shape's, never its methods'.

``weights_only`` rebuilds a tensor saved with Python attributes through ``torch._tensor._rebuild_from_type_v2``,
which sets each pickled attribute with ``setattr``: a file can tag a tensor with ``numel = complex`` (both
allowed globals), and ``t.numel()`` then answers ``0j``, which every size check took for an empty tensor (a
2 KB file gave a 256 MiB output, or a tensor read from byte 0 of its file). So every tensor of a loaded file
is looked at once: an attribute that shadows one of ``torch.Tensor``'s is refused, naming the file; other
attributes (a trainer's flag on a parameter) are dropped, never read. And sizes are taken from ``shape``,
``stride`` and the dtype's item size through ``torch.Tensor``'s own descriptors, not the instance's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ema_average.errors import CheckpointError

_TENSOR_CLASSES = (torch.Tensor, torch.nn.Parameter)


def without_tensor_state(path: Path, obj: Any) -> Any:
    """``obj``, each tensor it holds (in dicts, lists, tuples, sets; each container once) stripped of any
    attribute the file gave it; refused where an attribute shadows a tensor's own (``numel``, ``stride``)
    or the tensor is of a class other than ``Tensor`` and ``Parameter``."""
    seen: set[int] = set()
    stack = [obj]
    while stack:  # not recursive: a pickle can nest deeper than Python's stack
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            _strip(path, value)
        elif isinstance(value, dict | list | tuple | set | frozenset) and id(value) not in seen:
            seen.add(id(value))
            if isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
    return obj


def _strip(path: Path, tensor: torch.Tensor) -> None:
    if type(tensor) not in _TENSOR_CLASSES:
        raise CheckpointError(
            path, f"holds a tensor of class {type(tensor).__name__!r}, not a plain tensor; refused"
        )
    state = tensor.__dict__
    if not state:
        return
    shadowing = sorted(name for name in state if not isinstance(name, str) or hasattr(torch.Tensor, name))
    if shadowing:
        shown = ", ".join(repr(name) for name in shadowing[:3])
        raise CheckpointError(
            path,
            f"holds a tensor whose pickled state replaces its own {shown} (a tensor's methods rewritten "
            "by the file, to misstate its size); refused",
        )
    state.clear()  # a trainer's own flags on a parameter: never weights, never read


def numel_of(tensor: torch.Tensor) -> int:
    """How many elements ``tensor``'s shape holds."""
    return math.prod(torch.Tensor.size(tensor))


def layout_of(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``tensor``'s shape, stride and storage offset (in elements), from torch's own methods."""
    return (
        tuple(torch.Tensor.size(tensor)),
        tuple(torch.Tensor.stride(tensor)),
        int(torch.Tensor.storage_offset(tensor)),
    )


def itemsize_of(tensor: torch.Tensor) -> int:
    """Bytes per element of ``tensor``'s dtype."""
    return tensor.dtype.itemsize
