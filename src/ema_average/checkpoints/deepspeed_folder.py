"""DeepSpeed checkpoint folders (``global_stepN/``), every ZeRO stage, read lazily without DeepSpeed.

``engine.save_checkpoint`` writes ``mp_rank_00_model_states.pt`` (the ``module`` state dict, ``global_steps``,
``param_shapes``, ``buffer_names``, ``shared_params``, frozen parameters) and, with ZeRO, one
``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank holding that rank's partition
of the fp32 master weights. Under ZeRO-3 the model states are per rank too
(``zero_pp_rank_R_mp_rank_00_model_states.pt``) and ``module`` holds only placeholders of shape (0,).

Two models may be read: ``module`` (the weights as the model held them, e.g. bf16; ZeRO-0/1/2 only, the
default there) and ``fp32`` (the master weights, each parameter rebuilt from the rank partitions exactly
as DeepSpeed's ``zero_to_fp32.py`` does, the only choice under ZeRO-3). The rebuild is lazy: the shards are
memory-mapped and each read copies one parameter's pieces, so nobody has to run ``zero_to_fp32`` per
checkpoint. Tensor-, pipeline- and expert-parallel saves and NVMe offload are refused with one line.

The files are untrusted: every tensor used is checked as torch files' are (an expanded view is a few bytes of
file and any size of output; meta, sparse, complex and quantized tensors cannot be averaged), and the counts
and shapes the files claim are checked against the files present before anything is built from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import Checkpoint, Layout, ModelChoice, OpenOptions, StepInfo, TensorSpec
from ema_average.checkpoints.safe_unpickle import load_torch_file
from ema_average.checkpoints.steps import checked_step
from ema_average.checkpoints.torch_file import checked_name, storage_aliases, tensor_problem
from ema_average.errors import CheckpointError

_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_UNSUPPORTED = (
    (re.compile(r"^(?:layer_\d+-|expert_|expp_rank_)"), "pipeline- or expert-parallel files"),
    (re.compile(r"^offloaded_tensors$"), "NVMe-offloaded optimizer state (offloaded_tensors/)"),
)
_AUTOEP_KEYS = ("ds_autoep_layers", "autoep_layers")
_MAX_NUMEL = 2**63 - 1  # what torch can index


def is_deepspeed_folder(path: Path) -> bool:
    """A folder holding DeepSpeed model states (one tag of ``save_checkpoint``)."""
    try:
        return path.is_dir() and any(_MODEL_STATES.match(p.name) for p in path.iterdir())
    except OSError:
        return False


@dataclass
class _Files:
    model: dict[int, Path]  # data-parallel rank -> model states (one file, rank 0, below ZeRO-3)
    optim: dict[int, Path]  # data-parallel rank -> optimizer partition
    partitioned: bool  # ZeRO-3: model states per rank


def _files(path: Path) -> _Files:
    """The folder's DeepSpeed files by rank; what this reader does not support is refused by name."""
    model: dict[int, Path] = {}
    optim: dict[int, Path] = {}
    partitioned = False
    for entry in sorted(path.iterdir()):
        for pattern, what in _UNSUPPORTED:
            if pattern.match(entry.name):
                raise CheckpointError(path, f"holds {what}, which this tool does not read; refused")
        found = _MODEL_STATES.match(entry.name)
        if found:
            _check_mp_rank(path, found.group(2))
            partitioned = partitioned or found.group(1) is not None
            model[int(found.group(1) or 0)] = entry
        found = _OPTIM_STATES.match(entry.name)
        if found:
            _check_mp_rank(path, found.group(2))
            optim[int(found.group(1))] = entry
    return _Files(model, optim, partitioned)


def _check_mp_rank(path: Path, mp_rank: str) -> None:
    if int(mp_rank) != 0:
        raise CheckpointError(
            path,
            f"is a tensor-parallel DeepSpeed save (mp_rank_{mp_rank}); "
            "merge the model-parallel ranks first, this tool reads mp_rank_00 only",
        )


@dataclass
class _Piece:
    """``length`` elements of a flat (memory-mapped) tensor from ``start``."""

    flat: torch.Tensor
    start: int
    length: int


@dataclass
class _Source:
    """Where one output tensor's values are: a whole tensor, or pieces of flat partitions."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None
    pieces: list[_Piece] | None = None


class DeepSpeedCheckpoint(Checkpoint):
    """One DeepSpeed checkpoint tag folder; ``submodel`` ``"module"`` or ``"fp32"`` picks what is read."""

    layout = "deepspeed"

    def __init__(self, path: Path, *, trust_pickle: bool = False, submodel: str | None = None) -> None:
        super().__init__(path)
        self._trust_pickle = trust_pickle
        self._files = _files(path)
        if 0 not in self._files.model:
            raise CheckpointError(path, "has no rank-0 model states file (mp_rank_00_model_states.pt)")
        main = self._load(self._files.model[0])
        self.stage = 3 if self._files.partitioned else (2 if self._files.optim else 0)
        self._step = _global_steps(self._files.model[0], main)
        models = ["fp32"] if self.stage == 3 else (["module", "fp32"] if self._files.optim else ["module"])
        if submodel == "module" and self.stage == 3:
            raise CheckpointError(
                path,
                "is a ZeRO-3 save: its module holds only placeholders; the weights are rebuilt from the "
                "optimizer partitions (--submodel fp32, the default)",
            )
        self.model_name = submodel if submodel in models else models[0]
        if len(models) > 1 or self.stage == 3:
            others = {m: f"--submodel {m}" for m in models if m != self.model_name}
            self.choices = [ModelChoice(self.model_name, others)]
        self._sources: dict[str, _Source] | None = None
        self._aliases: dict[str, str] = {}
        self._specs = {name: TensorSpec(s.shape, s.dtype) for name, s in self._index(main).items()}
        self.close()  # a run may have hundreds of these: the shards are mapped again on the first read

    def _load(self, file: Path) -> Mapping[str, Any]:
        obj, _ = load_torch_file(file, trust_pickle=self._trust_pickle)
        if not isinstance(obj, Mapping):
            raise CheckpointError(file, f"holds a {type(obj).__name__}, not DeepSpeed's state dict")
        if any(key in obj for key in _AUTOEP_KEYS):
            raise CheckpointError(
                file, "is an AutoEP (expert-partitioned) save, which this tool does not read"
            )
        return obj

    def _index(self, main: Mapping[str, Any] | None = None) -> dict[str, _Source]:
        """Every tensor's source, built once per opening (the shards stay mapped until close)."""
        if self._sources is None:
            main = main if main is not None else self._load(self._files.model[0])
            module = main.get("module")
            if not isinstance(module, Mapping) or not module:
                raise CheckpointError(self._files.model[0], "has no 'module' state dict")
            if self.model_name == "module":
                self._sources = _module_sources(self._files.model[0], module)
                self._aliases = storage_aliases(module)
            else:
                self._sources = self._fp32_sources(main, module)
                self._aliases = {}
            self._aliases.update(_shared(self._files.model[0], main, self._sources))
        return self._sources

    def _fp32_sources(self, main: Mapping[str, Any], module: Mapping[str, Any]) -> dict[str, _Source]:
        file = self._files.model[0]
        if not self._files.optim:
            raise CheckpointError(
                self.path,
                "is a ZeRO-3 save without its optimizer partitions (*optim_states.pt), which hold "
                "the weights",
            )
        first = self._files.optim[min(self._files.optim)]
        states = [_optimizer_state(first, self._load(first))]
        world = _partition_count(first, states[0])  # checked against the files before anything is built
        _check_ranks(self.path, "optimizer partitions", self._files.optim, world)
        if self.stage == 3:
            _check_ranks(self.path, "model states", self._files.model, world)
        optim = [self._files.optim[r] for r in range(world)]
        states += [_optimizer_state(f, self._load(f)) for f in optim[1:]]
        shapes = _param_shapes(file, main)
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        partitions = [_flat_groups(f, state, key) for f, state in zip(optim, states, strict=True)]
        _one_dtype(optim, key, [groups[0] for groups in partitions])
        if self.stage == 3:
            trainable = _zero3_params(file, shapes, partitions, world)
        else:
            paddings = _paddings(first, states[0].get("param_alignment_paddings"), shapes)
            trainable = _zero2_params(file, shapes, partitions, world, paddings)
        frozen = self._frozen(main)
        buffers = set(_names(file, main.get("buffer_names")))
        sources: dict[str, _Source] = {}
        for key_, tensor in module.items():
            name = checked_name(file, key_)
            if name in trainable:
                sources[name] = trainable[name]
            elif name in frozen:
                sources[name] = frozen[name]
            elif isinstance(tensor, torch.Tensor) and (name in buffers or self.stage < 3):
                # buffers (read as float32, as zero_to_fp32 does); frozen parameters ZeRO-1 keeps in module
                sources[name] = _whole(file, name, tensor, to_fp32=name in buffers)
            elif name not in _shared_names(main):
                raise CheckpointError(file, f"has no data for parameter {name!r} (a ZeRO-3 placeholder)")
        for name, source in trainable.items():  # in the optimizer but not in module: kept all the same
            sources.setdefault(name, source)
        return sources

    def _frozen(self, main: Mapping[str, Any]) -> dict[str, _Source]:
        """Parameters the optimizer does not hold (requires_grad=False), saved beside it from ZeRO-2 on
        (in rank 0's model states; under ZeRO-3 in every rank's, the ranks already checked)."""
        shapes = main.get("frozen_param_shapes")
        if not isinstance(shapes, Mapping) or not shapes:
            return {}
        files = [self._files.model[r] for r in sorted(self._files.model)] if self.stage == 3 else []
        files = files or [self._files.model[0]]
        ranks = [main] + [self._load(f) for f in files[1:]]
        found: dict[str, _Source] = {}
        for key, shape in shapes.items():
            name = checked_name(files[0], key)
            dims = _shape(files[0], name, shape)
            frags = [_fragment(f, m, name) for f, m in zip(files, ranks, strict=True)]
            _one_dtype(files, name, frags)
            if self.stage < 3:
                found[name] = _frozen_whole(files[0], name, frags[0], dims)
            else:  # the fragments are checked views: reshape copies at most what the files hold
                pieces = [_Piece(f.reshape(-1), 0, f.numel()) for f in frags]
                found[name] = _Source(
                    dims, frags[0].dtype, pieces=_trim(files[0], name, pieces, math.prod(dims))
                )
        return found

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        source = self._index()[name]
        if source.tensor is not None:
            out.copy_(source.tensor)
            return out
        flat = out.view(-1)
        done = 0
        for piece in source.pieces or []:
            flat[done : done + piece.length].copy_(piece.flat[piece.start : piece.start + piece.length])
            done += piece.length
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def close(self) -> None:
        self._sources = None  # drops the mappings; the next read maps the shards again


def _global_steps(file: Path, main: Mapping[str, Any]) -> StepInfo | None:
    value = main.get("global_steps")
    if value is None or isinstance(value, bool):
        return None
    return StepInfo(checked_step(file, value, "metadata:global_steps"), "metadata:global_steps")


def _checked(file: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it can be averaged as saved (the check torch files get: no expanded view, no meta,
    sparse, complex or quantized tensor), else one line naming ``file`` and the tensor."""
    problem = tensor_problem(tensor)
    if problem is not None:
        raise CheckpointError(file, f"tensor {name!r} {problem}")
    return tensor


def _whole(file: Path, name: str, tensor: torch.Tensor, *, to_fp32: bool = False) -> _Source:
    """A tensor saved whole; ``to_fp32`` reads a floating one as float32 (buffers, as zero_to_fp32 does)."""
    _checked(file, name, tensor)
    dtype = torch.float32 if to_fp32 and tensor.is_floating_point() else tensor.dtype
    return _Source(tuple(tensor.shape), dtype, tensor=tensor)


def _frozen_whole(file: Path, name: str, fragment: torch.Tensor, dims: tuple[int, ...]) -> _Source:
    """A frozen parameter saved whole below ZeRO-3, in the dtype saved, as zero_to_fp32 keeps them."""
    if fragment.numel() != math.prod(dims):
        raise CheckpointError(
            file,
            f"has frozen parameter {name!r} of shape {list(dims)} but {fragment.numel()} saved values "
            f"(frozen_param_fragments, shape {list(fragment.shape)}); damaged?",
        )
    return _Source(dims, fragment.dtype, tensor=fragment.reshape(dims))  # a checked view: a copy is small


def _module_sources(file: Path, module: Mapping[str, Any]) -> dict[str, _Source]:
    sources = {}
    for key, tensor in module.items():
        name = checked_name(file, key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(file, f"has a 'module' entry {name!r} that is not a tensor")
        sources[name] = _whole(file, name, tensor)
    return sources


def _names(file: Path, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(file, "has buffer_names that are not a list of names")
    return list(value)


def _shared_names(main: Mapping[str, Any]) -> set[str]:
    shared = main.get("shared_params")
    return set(shared) if isinstance(shared, Mapping) else set()


def _shared(file: Path, main: Mapping[str, Any], sources: dict[str, _Source]) -> dict[str, str]:
    """Tied parameters: ``shared_params`` maps the name that is not stored to the one that is."""
    shared = main.get("shared_params")
    found: dict[str, str] = {}
    for alias, target in shared.items() if isinstance(shared, Mapping) else []:
        if target in sources and isinstance(alias, str):
            sources[alias] = sources[target]
            found[alias] = target
    return found


def _shape(file: Path, name: str, value: Any) -> tuple[int, ...]:
    """A shape as saved (``torch.Size``, tuple or list of sizes) that torch can hold."""
    if (
        not isinstance(value, tuple | list)
        or not all(type(v) is int and 0 <= v <= _MAX_NUMEL for v in value)
        or math.prod(value) > _MAX_NUMEL
    ):
        raise CheckpointError(file, f"has no valid shape for parameter {name!r}")
    return tuple(value)


def _param_shapes(file: Path, main: Mapping[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    """The optimizer's parameters per group, in the order their values are laid out in the partitions."""
    groups = main.get("param_shapes")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise CheckpointError(file, "has no param_shapes: not a ZeRO checkpoint DeepSpeed can rebuild")
    return [
        {checked_name(file, key): _shape(file, key, shape) for key, shape in group.items()}
        for group in groups
    ]


def _optimizer_state(file: Path, optim: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ZeRO optimizer's own state dict, which an optimizer states file holds."""
    state = optim.get("optimizer_state_dict")
    if not isinstance(state, Mapping):
        found = "none" if state is None else f"a {type(state).__name__}"
        raise CheckpointError(
            file, f"has no optimizer_state_dict (found {found}); not a ZeRO optimizer save?"
        )
    return state


def _flat_groups(file: Path, state: Mapping[str, Any], key: str) -> list[torch.Tensor]:
    groups = state.get(key)
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(file, f"has no {key} (the fp32 master weights); not a ZeRO optimizer save?")
    for i, tensor in enumerate(groups):
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(file, f"has a {type(tensor).__name__} in {key}, not a tensor")
        _checked(file, f"{key}[{i}]", tensor)
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise CheckpointError(
                file,
                f"tensor '{key}[{i}]' is {tensor.dtype} of shape {list(tensor.shape)}, not a flat "
                "floating-point partition",
            )
    _one_dtype([file], key, groups)
    return groups


def _one_dtype(files: list[Path], name: str, tensors: list[torch.Tensor]) -> None:
    """Pieces of one value (ranks' fragments or partitions) share one dtype, or the copy would convert."""
    for i, tensor in enumerate(tensors):
        if tensor.dtype != tensors[0].dtype:
            raise CheckpointError(
                files[min(i, len(files) - 1)],
                f"holds {name!r} as {tensor.dtype}, but {tensors[0].dtype} in {files[0].name}",
            )


def _partition_count(file: Path, state: Mapping[str, Any]) -> int:
    """The data-parallel world size: ``partition_count``, one per group (ZeRO-1/2) or one (ZeRO-3)."""
    count = state.get("partition_count")
    counts = count if isinstance(count, list) else [count]
    if not counts or not all(type(c) is int and c >= 1 for c in counts):
        shown = repr(count) if len(repr(count)) <= 60 else repr(count)[:57] + "..."
        raise CheckpointError(file, f"has partition_count {shown}, not a count of ranks (an integer >= 1)")
    return max(counts)


def _check_ranks(path: Path, what: str, files: dict[int, Path], world: int) -> None:
    """Every rank's file of ``world`` is there, and no other (counted first: ``world`` may be 2**62)."""
    if len(files) != world:
        raise CheckpointError(
            path, f"needs the {what} of {world} ranks, but holds {len(files)}; a rank did not save"
        )
    if set(files) != set(range(world)):  # as many files as ranks: a small set
        ranks = sorted(files)
        raise CheckpointError(path, f"holds the {what} of ranks {ranks[:8]}, not of ranks 0-{world - 1}")


def _span(parts: list[torch.Tensor], start: int, length: int) -> list[_Piece]:
    """The pieces covering ``[start, start + length)`` of the concatenation of ``parts``."""
    pieces = []
    base = 0
    for part in parts:
        size = part.numel()
        lo, hi = max(start, base), min(start + length, base + size)
        if lo < hi:
            pieces.append(_Piece(part, lo - base, hi - lo))
        base += size
    return pieces


def _trim(file: Path, name: str, pieces: list[_Piece], numel: int) -> list[_Piece]:
    """The first ``numel`` elements of ``pieces`` (dropping the partition padding)."""
    kept, total = [], 0
    for piece in pieces:
        take = min(piece.length, numel - total)
        if take > 0:
            kept.append(_Piece(piece.flat, piece.start, take))
            total += take
    if total != numel:
        raise CheckpointError(file, f"holds {total} values for {name!r}, which needs {numel}")
    return kept


def _zero2_params(
    file: Path,
    shapes: list[dict[str, tuple[int, ...]]],
    partitions: list[list[torch.Tensor]],
    world: int,
    paddings: list[list[int]],
) -> dict[str, _Source]:
    """ZeRO-1/2: each group's fp32 vector is the ranks' partitions end to end; parameters lie in it in
    ``param_shapes`` order, each followed by its alignment padding."""
    if any(len(p) != len(shapes) for p in partitions):
        raise CheckpointError(
            file, "has param_shapes whose group count differs from the optimizer partitions'"
        )
    found: dict[str, _Source] = {}
    for g, group in enumerate(shapes):
        parts = [partitions[r][g] for r in range(world)]
        total = sum(p.numel() for p in parts)
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if offset + numel > total:
                raise CheckpointError(file, f"holds too few fp32 values for parameter {name!r}; damaged?")
            found[name] = _Source(shape, parts[0].dtype, pieces=_span(parts, offset, numel))
            offset += numel + paddings[g][i]
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x world size
        if _ceil_div(offset, align) != _ceil_div(total, align):
            raise CheckpointError(file, f"uses {offset} of {total} fp32 values of group {g}; damaged?")
    return found


def _ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` exactly (a float quotient rounds above 2**53)."""
    return -(-a // b)


def _paddings(file: Path, value: Any, shapes: list[dict[str, tuple[int, ...]]]) -> list[list[int]]:
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


def _zero3_params(
    file: Path, shapes: list[dict[str, tuple[int, ...]]], partitions: list[list[torch.Tensor]], world: int
) -> dict[str, _Source]:
    """ZeRO-3: every parameter is cut in ``world`` equal slices (the last padded), slice r in rank r's
    flat groups at the same offset; parameters follow each other in ``param_shapes`` order."""
    sizes = [sum(t.numel() for t in p) for p in partitions]
    if len(set(sizes)) != 1:
        raise CheckpointError(
            file.parent, f"has fp32 partitions of different sizes across ranks ({sizes[:4]}...)"
        )
    found: dict[str, _Source] = {}
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = math.prod(shape)
        share = _ceil_div(numel, world)
        if offset + share > sizes[0]:
            raise CheckpointError(file, f"holds too few fp32 values for parameter {name!r}; damaged?")
        pieces = [piece for rank in partitions for piece in _span(rank, offset, share)]
        found[name] = _Source(shape, partitions[0][0].dtype, pieces=_trim(file, name, pieces, numel))
        offset += share
    if offset != sizes[0]:
        raise CheckpointError(file, f"uses {offset} of {sizes[0]} fp32 values per rank; damaged?")
    return found


def _fragment(file: Path, model_states: Mapping[str, Any], name: str) -> torch.Tensor:
    fragments = model_states.get("frozen_param_fragments")
    tensor = fragments.get(name) if isinstance(fragments, Mapping) else None
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(file, f"has no saved values for frozen parameter {name!r}")
    return _checked(file, name, tensor)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return DeepSpeedCheckpoint(path, trust_pickle=options.trust_pickle, submodel=options.submodel)


LAYOUT = Layout(
    "deepspeed",
    "folder",
    "DeepSpeed folders (global_stepN/ with *model_states.pt, ZeRO *optim_states.pt)",
    is_deepspeed_folder,
    _open,
)
