"""DeepSpeed checkpoint folders (``global_stepN/``), every ZeRO stage, read lazily without DeepSpeed.

``engine.save_checkpoint`` writes ``mp_rank_00_model_states.pt`` (the ``module`` state dict, ``global_steps``,
``param_shapes``, ``buffer_names``, ``shared_params``, frozen parameters) and, with ZeRO, one
``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank holding that rank's partition
of the fp32 master weights. Under ZeRO-3 the model states are per rank too
(``zero_pp_rank_R_mp_rank_00_model_states.pt``) and ``module`` holds only placeholders of shape (0,).

Two models may be read: ``module`` (the weights as the model held them, e.g. bf16; ZeRO-0/1/2 only, the
default there) and ``fp32`` (the master weights, each parameter rebuilt from the rank partitions exactly
as DeepSpeed's ``zero_to_fp32.py`` does, the only choice under ZeRO-3). The rebuild is lazy: each file is
unpickled onto the meta device, each piece of a parameter (a module tensor, a slice of a flat fp32 group, a
frozen fragment) is kept as where its bytes lie in its file, and a read copies them with ``pread`` into the
caller's buffer, checking the file is still the one planned: nothing is mapped, so a partition cut short
while it is read is a clear error, never a SIGBUS, and nobody has to run ``zero_to_fp32`` per checkpoint.
Files that cannot be laid out so (legacy, big-endian, repacked zips) are loaded or mapped, as the plan
notes. Tensor-, pipeline- and expert-parallel saves and NVMe offload are refused with one line.

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

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    ModelChoice,
    OpenOptions,
    PreadFile,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.safe_unpickle import TorchFile, open_torch_file
from ema_average.checkpoints.steps import checked_step
from ema_average.checkpoints.stored import NotLaidOut, Stored, file_offset, fill, stored
from ema_average.checkpoints.torch_file import checked_name, first_names, storage_aliases, tensor_problem
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


class _NotLaidOutIn(Exception):
    """A file whose zip is not laid out as ``torch.save`` writes it: it is read again, mapped."""

    def __init__(self, file: Path, why: NotLaidOut) -> None:
        super().__init__(str(why))
        self.file = file


@dataclass(frozen=True)
class _Held:
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
        return self.tensor.numel()

    def read_range_into(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of the tensor (flattened) into ``out`` (1-d, of its dtype)."""
        if self.file is None or self.where is None:
            return out.copy_(self.tensor.reshape(-1)[start : start + out.numel()])
        return fill(self.file, self.where, self.name, start, out)


@dataclass(frozen=True)
class _Opened:
    """One DeepSpeed ``.pt`` file unpickled: its object, and how its tensors' values are read."""

    path: Path
    obj: Mapping[str, Any]
    contents: TorchFile
    file: PreadFile | None  # None: the tensors are in memory (loaded whole, or mapped)

    def held(self, name: str, tensor: torch.Tensor) -> _Held:
        """``tensor`` if it can be averaged as saved (the check torch files get: no expanded view, no meta,
        sparse, complex or quantized tensor), else one line naming the file and the tensor."""
        in_file = self.file is not None and file_offset(tensor) is not None
        problem = tensor_problem(tensor, in_file=in_file)
        if problem is not None:
            raise CheckpointError(self.path, f"tensor {name!r} {problem}")
        if not in_file:
            return _Held(name, tensor)
        try:
            return _Held(name, tensor, self.file, stored(self.path, name, tensor, self.contents.members))
        except NotLaidOut as exc:
            raise _NotLaidOutIn(self.path, exc) from exc


@dataclass(frozen=True)
class _Piece:
    """``length`` elements of a tensor (flattened) from ``start``."""

    flat: _Held
    start: int
    length: int


@dataclass
class _Source:
    """Where one output tensor's values are: pieces of saved tensors, end to end (one for a whole tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[_Piece]


class DeepSpeedCheckpoint(Checkpoint):
    """One DeepSpeed checkpoint tag folder; ``submodel`` ``"module"`` or ``"fp32"`` picks what is read."""

    layout = "deepspeed"

    def __init__(self, path: Path, *, trust_pickle: bool = False, submodel: str | None = None) -> None:
        super().__init__(path)
        self._trust_pickle = trust_pickle
        self._files = _files(path)
        if 0 not in self._files.model:
            raise CheckpointError(path, "has no rank-0 model states file (mp_rank_00_model_states.pt)")
        self._mapped: dict[Path, str] = {}  # files read through a mapping, and why
        self._preads: list[PreadFile] = []
        self._in_memory = False  # some piece is a tensor in memory: dropped by close
        main = self._load(self._files.model[0])
        self.stage = 3 if self._files.partitioned else (2 if self._files.optim else 0)
        self._step = _global_steps(main)
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
        self._note_how_read()
        self.close()  # a run may have hundreds of these: descriptors are reopened on the first read

    def _load(self, file: Path) -> _Opened:
        contents = open_torch_file(
            file, trust_pickle=self._trust_pickle, mapped_because=self._mapped.get(file)
        )
        obj = contents.obj
        if not isinstance(obj, Mapping):
            raise CheckpointError(file, f"holds a {type(obj).__name__}, not DeepSpeed's state dict")
        if any(key in obj for key in _AUTOEP_KEYS):
            raise CheckpointError(
                file, "is an AutoEP (expert-partitioned) save, which this tool does not read"
            )
        if contents.mapped_because is not None:
            self._mapped[file] = contents.mapped_because
        pread = PreadFile(file, contents.planned) if contents.lazy else None
        if pread is not None:
            self._preads.append(pread)
        else:
            self._in_memory = True
        return _Opened(file, obj, contents, pread)

    def _note_how_read(self) -> None:
        """The plan says which files are mapped or loaded whole rather than read with ``pread``."""
        for file, because in sorted(self._mapped.items()):
            self.notes.append(f"{file.name} read through a mapping of the file: {because}")
        if self._in_memory and not self._mapped:
            self.lazy = False
            self.notes.append("legacy (non-zip) torch format: loaded whole, not lazily")

    def _index(self, main: _Opened | None = None) -> dict[str, _Source]:
        """Every tensor's source, built once per opening; a file whose zip is not laid out as torch.save
        writes it is read again through a mapping (at most once per file)."""
        while self._sources is None:
            try:
                self._sources = self._build(main)
            except _NotLaidOutIn as exc:
                self.close()
                self._preads, self._in_memory, main = [], False, None
                self._mapped[exc.file] = f"its zip is not laid out as torch.save writes it ({exc})"
        return self._sources

    def _build(self, main: _Opened | None) -> dict[str, _Source]:
        main = main if main is not None else self._load(self._files.model[0])
        module = main.obj.get("module")
        if not isinstance(module, Mapping) or not module:
            raise CheckpointError(self._files.model[0], "has no 'module' state dict")
        if self.model_name == "module":
            sources = _module_sources(main, module)
            self._aliases = _module_aliases(main, module)
        else:
            sources = self._fp32_sources(main, module)
            self._aliases = {}
        self._aliases.update(_shared(main.obj, sources))
        return sources

    def _fp32_sources(self, main: _Opened, module: Mapping[str, Any]) -> dict[str, _Source]:
        file = self._files.model[0]
        if not self._files.optim:
            raise CheckpointError(
                self.path,
                "is a ZeRO-3 save without its optimizer partitions (*optim_states.pt), which hold "
                "the weights",
            )
        first = self._load(self._files.optim[min(self._files.optim)])
        states = [_optimizer_state(first)]
        world = _partition_count(first.path, states[0])  # checked against the files before anything is built
        _check_ranks(self.path, "optimizer partitions", self._files.optim, world)
        if self.stage == 3:
            _check_ranks(self.path, "model states", self._files.model, world)
        optim = [first] + [self._load(self._files.optim[r]) for r in range(1, world)]
        states += [_optimizer_state(opened) for opened in optim[1:]]
        shapes = _param_shapes(file, main.obj)
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        partitions = [_flat_groups(opened, state, key) for opened, state in zip(optim, states, strict=True)]
        _one_dtype([o.path for o in optim], key, [groups[0] for groups in partitions])
        if self.stage == 3:
            trainable = _zero3_params(file, shapes, partitions, world)
        else:
            paddings = _paddings(first.path, states[0].get("param_alignment_paddings"), shapes)
            trainable = _zero2_params(file, shapes, partitions, world, paddings)
        frozen = self._frozen(main)
        buffers = set(_names(file, main.obj.get("buffer_names")))
        sources: dict[str, _Source] = {}
        for key_, tensor in module.items():
            name = checked_name(file, key_)
            if name in trainable:
                sources[name] = trainable[name]
            elif name in frozen:
                sources[name] = frozen[name]
            elif isinstance(tensor, torch.Tensor) and (name in buffers or self.stage < 3):
                # buffers (read as float32, as zero_to_fp32 does); frozen parameters ZeRO-1 keeps in module
                sources[name] = _whole(main, name, tensor, to_fp32=name in buffers)
            elif name not in _shared_names(main.obj):
                raise CheckpointError(file, f"has no data for parameter {name!r} (a ZeRO-3 placeholder)")
        for name, source in trainable.items():  # in the optimizer but not in module: kept all the same
            sources.setdefault(name, source)
        return sources

    def _frozen(self, main: _Opened) -> dict[str, _Source]:
        """Parameters the optimizer does not hold (requires_grad=False), saved beside it from ZeRO-2 on
        (in rank 0's model states; under ZeRO-3 in every rank's, the ranks already checked)."""
        shapes = main.obj.get("frozen_param_shapes")
        if not isinstance(shapes, Mapping) or not shapes:
            return {}
        files = [self._files.model[r] for r in sorted(self._files.model)] if self.stage == 3 else []
        ranks = [main] + [self._load(f) for f in files[1:]]
        found: dict[str, _Source] = {}
        for key, shape in shapes.items():
            name = checked_name(main.path, key)
            dims = _shape(main.path, name, shape)
            frags = [_fragment(opened, name) for opened in ranks]
            _one_dtype([o.path for o in ranks], name, frags)
            if self.stage < 3:
                found[name] = _frozen_whole(main.path, name, frags[0], dims)
            else:  # each fragment flattened, end to end: a read copies at most what the files hold
                pieces = [_Piece(f, 0, f.numel()) for f in frags]
                found[name] = _Source(dims, frags[0].dtype, _trim(main.path, name, pieces, math.prod(dims)))
        return found

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.read_range_into(name, 0, out.view(-1))
        return out

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of ``name`` (flattened) into ``out``, each piece read from its file."""
        done, skip = 0, start
        for piece in self._index()[name].pieces:
            if done == out.numel():
                break
            if skip >= piece.length:
                skip -= piece.length
                continue
            take = min(piece.length - skip, out.numel() - done)
            target = out[done : done + take]
            if piece.flat.dtype == out.dtype:
                piece.flat.read_range_into(piece.start + skip, target)
            else:  # a buffer read as float32: read as saved, then converted
                target.copy_(
                    piece.flat.read_range_into(piece.start + skip, torch.empty(take, dtype=piece.flat.dtype))
                )
            done, skip = done + take, 0
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def close(self) -> None:
        """Hands back the descriptors (reopened by the next read); tensors held in memory (legacy or
        mapped files) are dropped and loaded again on the next read."""
        for pread in self._preads:
            pread.close()
        if self._in_memory:
            self._sources, self._preads, self._in_memory = None, [], False


def _global_steps(main: _Opened) -> StepInfo | None:
    value = main.obj.get("global_steps")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and file_offset(value) is not None:
        value = main.held("global_steps", value).read_range_into(0, torch.empty(1, dtype=value.dtype))
    return StepInfo(checked_step(main.path, value, "metadata:global_steps"), "metadata:global_steps")


def _whole(opened: _Opened, name: str, tensor: torch.Tensor, *, to_fp32: bool = False) -> _Source:
    """A tensor saved whole; ``to_fp32`` reads a floating one as float32 (buffers, as zero_to_fp32 does)."""
    held = opened.held(name, tensor)
    dtype = torch.float32 if to_fp32 and tensor.is_floating_point() else tensor.dtype
    return _Source(tuple(tensor.shape), dtype, [_Piece(held, 0, held.numel())])


def _frozen_whole(file: Path, name: str, fragment: _Held, dims: tuple[int, ...]) -> _Source:
    """A frozen parameter saved whole below ZeRO-3, in the dtype saved, as zero_to_fp32 keeps them."""
    if fragment.numel() != math.prod(dims):
        raise CheckpointError(
            file,
            f"has frozen parameter {name!r} of shape {list(dims)} but {fragment.numel()} saved values "
            f"(frozen_param_fragments, shape {list(fragment.tensor.shape)}); damaged?",
        )
    return _Source(dims, fragment.dtype, [_Piece(fragment, 0, fragment.numel())])


def _module_sources(main: _Opened, module: Mapping[str, Any]) -> dict[str, _Source]:
    sources = {}
    for key, tensor in module.items():
        name = checked_name(main.path, key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(main.path, f"has a 'module' entry {name!r} that is not a tensor")
        sources[name] = _whole(main, name, tensor)
    return sources


def _module_aliases(main: _Opened, module: Mapping[str, Any]) -> dict[str, str]:
    """Tied weights in ``module``: by where they lie in the file (meta tensors share no data pointer)."""
    if main.file is None:
        return storage_aliases(module)
    where = {name: stored(main.path, name, t, main.contents.members) for name, t in module.items()}
    return first_names({name: w.identity for name, w in where.items() if w.numel})


def _names(file: Path, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(file, "has buffer_names that are not a list of names")
    return list(value)


def _shared_names(main: Mapping[str, Any]) -> set[str]:
    shared = main.get("shared_params")
    return set(shared) if isinstance(shared, Mapping) else set()


def _shared(main: Mapping[str, Any], sources: dict[str, _Source]) -> dict[str, str]:
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


def _optimizer_state(optim: _Opened) -> Mapping[str, Any]:
    """The ZeRO optimizer's own state dict, which an optimizer states file holds."""
    state = optim.obj.get("optimizer_state_dict")
    if not isinstance(state, Mapping):
        found = "none" if state is None else f"a {type(state).__name__}"
        raise CheckpointError(
            optim.path, f"has no optimizer_state_dict (found {found}); not a ZeRO optimizer save?"
        )
    return state


def _flat_groups(opened: _Opened, state: Mapping[str, Any], key: str) -> list[_Held]:
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
    _one_dtype([file], key, held)
    return held


def _one_dtype(files: list[Path], name: str, tensors: list[_Held]) -> None:
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


def _span(parts: list[_Held], start: int, length: int) -> list[_Piece]:
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
    partitions: list[list[_Held]],
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
    file: Path, shapes: list[dict[str, tuple[int, ...]]], partitions: list[list[_Held]], world: int
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


def _fragment(model_states: _Opened, name: str) -> _Held:
    fragments = model_states.obj.get("frozen_param_fragments")
    tensor = fragments.get(name) if isinstance(fragments, Mapping) else None
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(model_states.path, f"has no saved values for frozen parameter {name!r}")
    return model_states.held(name, tensor)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return DeepSpeedCheckpoint(path, trust_pickle=options.trust_pickle, submodel=options.submodel)


LAYOUT = Layout(
    "deepspeed",
    "folder",
    "DeepSpeed folders (global_stepN/ with *model_states.pt, ZeRO *optim_states.pt)",
    is_deepspeed_folder,
    _open,
)
