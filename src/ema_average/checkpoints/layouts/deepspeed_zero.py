"""Where each value of a DeepSpeed save lies: pieces of its files, and the ZeRO partition geometry.

:mod:`deepspeed_folder` finds a tag folder's files and reads them; this module says, for each output
tensor, which saved tensors hold its values and where (a :class:`Source` made of :class:`FlatSlice` pieces of
:class:`Held` tensors), as DeepSpeed's ``zero_to_fp32.py`` rebuilds them: ZeRO-1/2 parameters lie end to
end in each group's fp32 vector (the ranks' partitions concatenated, each parameter followed by its
alignment padding); ZeRO-3 cuts every parameter in ``world`` equal slices, slice r in rank r's flat groups.
Every count, shape and padding the files claim is checked before anything is built from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.contents.torch_objects import checked_name
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import TorchFile
from ema_average.checkpoints.reading.tensor_checks import first_names, storage_aliases, tensor_problem
from ema_average.checkpoints.reading.tensor_state import numel_of
from ema_average.checkpoints.reading.zip_offsets import NotLaidOut, Stored, file_offset, fill, stored
from ema_average.errors import CheckpointError

_MAX_NUMEL = 2**63 - 1  # what torch can index


class NotLaidOutIn(Exception):
    """A file whose zip is not laid out as ``torch.save`` writes it: it is read again, mapped."""

    def __init__(self, file: Path, why: NotLaidOut) -> None:
        super().__init__(str(why))
        self.file = file


@dataclass(frozen=True)
class Held:
    """One tensor of a DeepSpeed file, checked: where its bytes lie (``where``, read with ``pread``
    from ``file``), or, for a file loaded whole or mapped, the tensor itself."""

    name: str
    tensor: torch.Tensor  # on the meta device where ``where`` is set: its shape and dtype only
    file: PreadFile | None = None
    where: Stored | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def numel(self) -> int:
        """From the shape, never the tensor's own ``numel`` (see :mod:`tensor_state`)."""
        return numel_of(self.tensor)

    def read_range_into(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of the tensor (flattened) into ``out`` (1-d, of its dtype)."""
        if self.file is None or self.where is None:
            return out.copy_(self.tensor.reshape(-1)[start : start + out.numel()])
        return fill(self.file, self.where, self.name, start, out)


@dataclass(frozen=True)
class Opened:
    """One DeepSpeed ``.pt`` file unpickled: its object, and how its tensors' values are read."""

    path: Path
    obj: Mapping[str, Any]
    contents: TorchFile
    file: PreadFile | None  # None: the tensors are in memory (loaded whole, or mapped)

    def held(self, name: str, tensor: torch.Tensor) -> Held:
        """``tensor`` if it can be averaged as saved (the check torch files get: no expanded view, no meta,
        sparse, complex or quantized tensor), else one line naming the file and the tensor."""
        in_file = self.file is not None and file_offset(tensor) is not None
        problem = tensor_problem(tensor, in_file=in_file)
        if problem is not None:
            raise CheckpointError(self.path, f"tensor {name!r} {problem}")
        if not in_file:
            return Held(name, tensor)
        try:
            return Held(name, tensor, self.file, stored(self.path, name, tensor, self.contents.members))
        except NotLaidOut as exc:
            raise NotLaidOutIn(self.path, exc) from exc


@dataclass(frozen=True)
class FlatSlice:
    """``length`` elements of a tensor (flattened) from ``start``."""

    flat: Held
    start: int
    length: int


@dataclass
class Source:
    """Where one output tensor's values are: pieces of saved tensors, end to end (one for a whole tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[FlatSlice]


def whole_source(opened: Opened, name: str, tensor: torch.Tensor, *, to_fp32: bool = False) -> Source:
    """A tensor saved whole; ``to_fp32`` reads a floating one as float32 (buffers, as zero_to_fp32 does)."""
    held = opened.held(name, tensor)
    dtype = torch.float32 if to_fp32 and tensor.is_floating_point() else tensor.dtype
    return Source(tuple(tensor.shape), dtype, [FlatSlice(held, 0, held.numel())])


def frozen_whole(file: Path, name: str, fragment: Held, dims: tuple[int, ...]) -> Source:
    """A frozen parameter saved whole below ZeRO-3, in the dtype saved, as zero_to_fp32 keeps them."""
    if fragment.numel() != math.prod(dims):
        raise CheckpointError(
            file,
            f"has frozen parameter {name!r} of shape {list(dims)} but {fragment.numel()} saved values "
            f"(frozen_param_fragments, shape {list(fragment.tensor.shape)}); damaged?",
        )
    return Source(dims, fragment.dtype, [FlatSlice(fragment, 0, fragment.numel())])


def module_sources(main: Opened, module: Mapping[str, Any]) -> dict[str, Source]:
    sources = {}
    for key, tensor in module.items():
        name = checked_name(main.path, key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(main.path, f"has a 'module' entry {name!r} that is not a tensor")
        sources[name] = whole_source(main, name, tensor)
    return sources


def module_aliases(main: Opened, module: Mapping[str, Any]) -> dict[str, str]:
    """Tied weights in ``module``: by where they lie in the file (meta tensors share no data pointer)."""
    if main.file is None:
        return storage_aliases(module)
    where = {name: stored(main.path, name, t, main.contents.members) for name, t in module.items()}
    return first_names({name: w.identity for name, w in where.items() if w.numel})


def buffer_names(file: Path, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(file, "has buffer_names that are not a list of names")
    return list(value)


def shared_names(main: Mapping[str, Any]) -> set[str]:
    shared = main.get("shared_params")
    return set(shared) if isinstance(shared, Mapping) else set()


def shared_aliases(main: Mapping[str, Any], sources: dict[str, Source]) -> dict[str, str]:
    """Tied parameters: ``shared_params`` maps the name that is not stored to the one that is."""
    shared = main.get("shared_params")
    found: dict[str, str] = {}
    for alias, target in shared.items() if isinstance(shared, Mapping) else []:
        if target in sources and isinstance(alias, str):
            sources[alias] = sources[target]
            found[alias] = target
    return found


def checked_shape(file: Path, name: str, value: Any) -> tuple[int, ...]:
    """A shape as saved (``torch.Size``, tuple or list of sizes) that torch can hold."""
    if (
        not isinstance(value, tuple | list)
        or not all(type(v) is int and 0 <= v <= _MAX_NUMEL for v in value)
        or math.prod(value) > _MAX_NUMEL
    ):
        raise CheckpointError(file, f"has no valid shape for parameter {name!r}")
    return tuple(value)


def param_shapes(file: Path, main: Mapping[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The optimizer's parameters per group, in the order their values are laid out in the partitions."""
    groups = main.get("param_shapes")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise CheckpointError(file, "has no param_shapes: not a ZeRO checkpoint DeepSpeed can rebuild")
    return [
        {checked_name(file, key): checked_shape(file, key, shape) for key, shape in group.items()}
        for group in groups
    ]


def optimizer_state(optim: Opened) -> Mapping[str, Any]:
    """The ZeRO optimizer's own state dict, which an optimizer states file holds."""
    state = optim.obj.get("optimizer_state_dict")
    if not isinstance(state, Mapping):
        found = "none" if state is None else f"a {type(state).__name__}"
        raise CheckpointError(
            optim.path, f"has no optimizer_state_dict (found {found}); not a ZeRO optimizer save?"
        )
    return state


def flat_groups(opened: Opened, state: Mapping[str, Any], key: str) -> list[Held]:
    """The rank's flat fp32 partitions, one per parameter group, each checked."""
    file = opened.path
    groups = state.get(key)
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(file, f"has no {key} (the fp32 master weights); not a ZeRO optimizer save?")
    held = []
    for i, tensor in enumerate(groups):
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(file, f"has a {type(tensor).__name__} in {key}, not a tensor")
        held.append(opened.held(f"{key}[{i}]", tensor))
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise CheckpointError(
                file,
                f"tensor '{key}[{i}]' is {tensor.dtype} of shape {list(tensor.shape)}, not a flat "
                "floating-point partition",
            )
    one_dtype([file], key, held)
    return held


def one_dtype(files: list[Path], name: str, tensors: list[Held]) -> None:
    """Pieces of one value (ranks' fragments or partitions) share one dtype, or the copy would convert."""
    for i, tensor in enumerate(tensors):
        if tensor.dtype != tensors[0].dtype:
            raise CheckpointError(
                files[min(i, len(files) - 1)],
                f"holds {name!r} as {tensor.dtype}, but {tensors[0].dtype} in {files[0].name}",
            )


def partition_count(file: Path, state: Mapping[str, Any]) -> int:
    """The data-parallel world size: ``partition_count``, one per group (ZeRO-1/2) or one (ZeRO-3)."""
    count = state.get("partition_count")
    counts = count if isinstance(count, list) else [count]
    if not counts or not all(type(c) is int and c >= 1 for c in counts):
        shown = repr(count) if len(repr(count)) <= 60 else repr(count)[:57] + "..."
        raise CheckpointError(file, f"has partition_count {shown}, not a count of ranks (an integer >= 1)")
    return max(counts)


def check_ranks(path: Path, what: str, files: dict[int, Path], world: int) -> None:
    """Every rank's file of ``world`` is there, and no other (counted first: ``world`` may be 2**62)."""
    if len(files) != world:
        raise CheckpointError(
            path, f"needs the {what} of {world} ranks, but holds {len(files)}; a rank did not save"
        )
    if set(files) != set(range(world)):  # as many files as ranks: a small set
        ranks = sorted(files)
        raise CheckpointError(path, f"holds the {what} of ranks {ranks[:8]}, not of ranks 0-{world - 1}")


def _span(parts: list[Held], start: int, length: int) -> list[FlatSlice]:
    """The pieces covering ``[start, start + length)`` of the concatenation of ``parts``."""
    pieces = []
    base = 0
    for part in parts:
        size = part.numel()
        lo, hi = max(start, base), min(start + length, base + size)
        if lo < hi:
            pieces.append(FlatSlice(part, lo - base, hi - lo))
        base += size
    return pieces


def trim(file: Path, name: str, pieces: list[FlatSlice], numel: int) -> list[FlatSlice]:
    """The first ``numel`` elements of ``pieces`` (dropping the partition padding)."""
    kept, total = [], 0
    for piece in pieces:
        take = min(piece.length, numel - total)
        if take > 0:
            kept.append(FlatSlice(piece.flat, piece.start, take))
            total += take
    if total != numel:
        raise CheckpointError(file, f"holds {total} values for {name!r}, which needs {numel}")
    return kept


def zero2_params(
    file: Path,
    shapes: list[dict[str, tuple[int, ...]]],
    partitions: list[list[Held]],
    world: int,
    paddings: list[list[int]],
) -> dict[str, Source]:
    """ZeRO-1/2: each group's fp32 vector is the ranks' partitions end to end; parameters lie in it in
    ``param_shapes`` order, each followed by its alignment padding."""
    if any(len(p) != len(shapes) for p in partitions):
        raise CheckpointError(
            file, "has param_shapes whose group count differs from the optimizer partitions'"
        )
    found: dict[str, Source] = {}
    for g, group in enumerate(shapes):
        parts = [partitions[r][g] for r in range(world)]
        total = sum(p.numel() for p in parts)
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if offset + numel > total:
                raise CheckpointError(file, f"holds too few fp32 values for parameter {name!r}; damaged?")
            found[name] = Source(shape, parts[0].dtype, pieces=_span(parts, offset, numel))
            offset += numel + paddings[g][i]
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x world size
        if _ceil_div(offset, align) != _ceil_div(total, align):
            raise CheckpointError(file, f"uses {offset} of {total} fp32 values of group {g}; damaged?")
    return found


def _ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` exactly (a float quotient rounds above 2**53)."""
    return -(-a // b)


def alignment_paddings(file: Path, value: Any, shapes: list[dict[str, tuple[int, ...]]]) -> list[list[int]]:
    """``param_alignment_paddings``: the padding after each parameter, per group (none saved: none)."""
    if value is None:
        return [[0] * len(group) for group in shapes]
    if isinstance(value, list) and len(value) == len(shapes):
        for pads, group in zip(value, shapes, strict=True):
            if not (isinstance(pads, list) and len(pads) == len(group)):
                break
            if not all(type(p) is int and 0 <= p <= _MAX_NUMEL for p in pads):
                break
        else:
            return value
    raise CheckpointError(file, "has param_alignment_paddings that do not fit param_shapes")


def zero3_params(
    file: Path, shapes: list[dict[str, tuple[int, ...]]], partitions: list[list[Held]], world: int
) -> dict[str, Source]:
    """ZeRO-3: every parameter is cut in ``world`` equal slices (the last padded), slice r in rank r's
    flat groups at the same offset; parameters follow each other in ``param_shapes`` order."""
    sizes = [sum(t.numel() for t in p) for p in partitions]
    if len(set(sizes)) != 1:
        raise CheckpointError(
            file.parent, f"has fp32 partitions of different sizes across ranks ({sizes[:4]}...)"
        )
    found: dict[str, Source] = {}
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = math.prod(shape)
        share = _ceil_div(numel, world)
        if offset + share > sizes[0]:
            raise CheckpointError(file, f"holds too few fp32 values for parameter {name!r}; damaged?")
        pieces = [piece for rank in partitions for piece in _span(rank, offset, share)]
        found[name] = Source(shape, partitions[0][0].dtype, pieces=trim(file, name, pieces, numel))
        offset += share
    if offset != sizes[0]:
        raise CheckpointError(file, f"uses {offset} of {sizes[0]} fp32 values per rank; damaged?")
    return found


def frozen_fragment(model_states: Opened, name: str) -> Held:
    fragments = model_states.obj.get("frozen_param_fragments")
    tensor = fragments.get(name) if isinstance(fragments, Mapping) else None
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(model_states.path, f"has no saved values for frozen parameter {name!r}")
    return model_states.held(name, tensor)
