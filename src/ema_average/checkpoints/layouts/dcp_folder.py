"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

Read without a process group, one tensor per ``load`` call (DCP reads only the chunks it is asked for).
A DCP save flattens the dict it was given (``{"model": ..., "optimizer": ...}`` to ``model.x``,
``optimizer.state.x.exp_avg``; torchtitan's model weights sit at the top level beside ``optimizer``,
``lr_scheduler`` and ``train_state``); the nesting it recorded (``planner_data``) tells the parts apart,
and :func:`ema_average.checkpoints.contents.parts.split` decides which is the model, as for torch files.

Steps: a step counter under one of ``keys.STEP_KEYS`` / ``keys.NESTED_STEP_KEYS``, as a one-element
tensor or as a byte item (DCP saves an int or any other non-tensor with ``torch.save`` into the data
file: torchtitan's ``train_state.step``, torchtnt's ``app_state.train_progress.num_steps_completed``),
also where a byte item holds a dict with the counter inside. Byte items are read only for this, only up
to ``MAX_STEP_ITEM_BYTES``, with ``weights_only`` (no code of theirs runs), never through DCP (which would
unpickle them with plain pickle).

``.metadata`` is a pickle. torch's reader would ``pickle.load`` it on every ``load`` call, running
whatever it names; here it is read once, through the restricted unpickler of ``dcp_metadata``, and
checked (every file it points at is a regular file inside the folder, every chunk fits in its file, the
tensors it claims fit in the files) before DCP is handed it, with the data files as planned, by
:func:`ema_average.checkpoints.layouts.dcp_reading.reader_type` (which also reads each item only from them).
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

from ema_average._platform.torch_compat import dcp_storage_info_class
from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    ModelChoice,
    OpenOptions,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import NESTED_STEP_KEYS, STEP_KEYS
from ema_average.checkpoints.contents.parts import KeyPath, Part, described, split
from ema_average.checkpoints.contents.recorded_steps import nested_value, step_value
from ema_average.checkpoints.contents.torch_objects import checked_name
from ema_average.checkpoints.layouts.dcp_metadata import load_dcp_metadata
from ema_average.checkpoints.layouts.dcp_reading import read_byte_item, reader_type
from ema_average.checkpoints.reading.file_checks import require_regular_file
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import first_line, refused_globals
from ema_average.checkpoints.reading.tensor_checks import dtype_problem
from ema_average.checkpoints.safetensors_format import DTYPE_NAMES, shape_problem
from ema_average.errors import CheckpointError

# A few bytes of pickle can list one chunk object millions of times; walking them is bounded.
MAX_CHUNKS = 10_000_000

# A step counter saved as a byte item is ``torch.save`` of an int (about 1.3 KB) or of a small dict; a
# larger item at a step key is damage or hostility and is refused unread, one inside a container skipped.
MAX_STEP_ITEM_BYTES = 64 * 1024


class StepSource(NamedTuple):
    """Where a step counter may be: the DCP key holding it, whether that is a byte item, and the keys
    down a dict the byte item holds (``()`` where the item is the counter itself)."""

    fqn: str
    keys: tuple[str, ...]
    is_bytes: bool
    inner: tuple[str, ...] = ()


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))


class DcpCheckpoint(Checkpoint):
    """A DCP folder; ``trust_pickle`` reads a ``.metadata`` naming other globals with plain pickle."""

    layout = "dcp"

    def __init__(self, path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self._dcp = _import_dcp(path)
        self._metadata = load_dcp_metadata(path / ".metadata", trust_pickle=trust_pickle)
        entries = _tensor_entries(path, self._metadata, self._dcp.metadata)
        self._files = {  # the data files as planned: every read checks it reads these very files
            relative: PreadFile(file, planned)
            for relative, (file, planned) in _check_storage(path, self._metadata, entries).items()
        }
        self._chunked = {fqn for fqn, entry in entries.items() if len(entry.chunks) > 1}
        tensors = {fqn: TensorSpec(tuple(e.size), e.properties.dtype) for fqn, e in entries.items()}
        self._step_sources = _step_sources(tensors, _byte_items(self._metadata, self._dcp.metadata))
        self._tensors = tensors
        if state_dict_key is not None:
            prefix = _model_prefix(path, tensors, state_dict_key)
            self._fqns = {fqn[len(prefix) :]: fqn for fqn in tensors if fqn.startswith(prefix)}
            self.choices = [ModelChoice(state_dict_key)]  # what --submodel KEY is checked against
        else:
            self._fqns = self._model(tensors)
        self._specs = {name: tensors[fqn] for name, fqn in self._fqns.items()}
        for name, spec in self._specs.items():
            problem = dtype_problem(spec.dtype)
            if problem is not None:
                raise CheckpointError(path, f"tensor {name!r} {problem}")

    def _model(self, tensors: dict[str, TensorSpec]) -> dict[str, str]:
        """The model's names and their DCP keys, told apart from optimizer, scheduler, trainer state and
        averages by :func:`_parts`."""
        parts = _parts(self._metadata, tensors)
        models = [p for p in parts if p.kind == "model"] or [p for p in parts if p.kind == "average"]
        if not models:
            held = described(parts)  # empty where the folder holds byte items alone
            raise CheckpointError(
                self.path, f"holds no model weights, only {held}" if held else "holds no tensors"
            )
        chosen, beside = models[0], [p for p in parts if p.kind not in ("model", "average")]
        others = {
            p.key: f"--state-dict-key {p.key}"
            for p in parts
            if p.kind in ("model", "average") and p is not chosen
        }
        if others or beside or chosen.kind == "average":
            self.choices = [
                ModelChoice(
                    chosen.key or "the top level", others, chosen.kind == "average", described(beside)
                )
            ]
        return chosen.tensors

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def _load(self, fqn: str, out: torch.Tensor) -> torch.Tensor:
        if fqn in self._chunked:
            out.zero_()  # chunks that overlap would leave gaps: zeros there, never stale memory
        reader = reader_type()(self.path, self._metadata, self._files)
        try:
            with warnings.catch_warnings():  # "no process group: loading as a single process" is expected
                warnings.simplefilter("ignore")
                self._dcp.load({fqn: out}, storage_reader=reader)
        except CheckpointError:
            raise
        except (Exception, self._dcp.CheckpointException) as exc:  # data that is not what the metadata says
            raise self._unreadable(fqn, exc) from None
        return out

    def _unreadable(self, fqn: str, exc: BaseException) -> BaseException:
        """What a failed read of ``fqn`` is: one line naming its data file, or the interrupt or error of
        ours that DCP wrapped. DCP wraps whatever a read raises (even Ctrl-C) in a ``CheckpointException``,
        which derives from ``BaseException``, with a full traceback in its message."""
        cause = _wrapped(exc, self._dcp.CheckpointException)
        if isinstance(cause, CheckpointError) or not isinstance(cause, Exception):
            return cause
        files = sorted({self._storage(fqn, chunk).relative_path for chunk in self._entry(fqn).chunks})
        where = self.path / files[0] if len(files) == 1 else self.path
        return CheckpointError(where, f"cannot read tensor {fqn!r}: damaged DCP data ({_problem(cause)})")

    def close(self) -> None:
        for file in self._files.values():
            file.close()  # reopened by the next read

    def _entry(self, fqn: str) -> Any:
        return self._metadata.state_dict_metadata[fqn]

    def _storage(self, fqn: str, chunk: Any) -> Any:
        """The storage entry of a tensor's ``chunk``, or of a byte item where ``chunk`` is ``None``."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(fqn) if chunk is None else MetadataIndex(fqn, chunk.offsets)
        info = self._metadata.storage_data.get(index)
        if info is None:
            raise _damaged(self.path, f"entry {fqn!r} has no storage entry")
        return info

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self._load(self._fqns[name], torch.zeros(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._load(self._fqns[name], out)

    def metadata_step(self) -> StepInfo | None:
        """The first step counter found, in the order of ``keys.STEP_KEYS`` then ``NESTED_STEP_KEYS``
        (as torch files are searched): it wins over the folder's name."""
        for source in self._step_sources:
            where = "metadata:" + ".".join(source.keys)
            step = step_value(self.path, self._step_candidate(source), where, lambda t: t)
            if step is not None:
                return StepInfo(step, where)
        return None

    def _step_candidate(self, source: StepSource) -> Any:
        """The value at ``source``: a tensor read through DCP, or a byte item unpickled with
        ``weights_only``; ``None`` where a container item is too large to be worth reading."""
        if not source.is_bytes:
            spec = self._tensors[source.fqn]
            return self._load(source.fqn, torch.zeros(spec.shape, dtype=spec.dtype))
        info = self._storage(source.fqn, None)
        if info.length > MAX_STEP_ITEM_BYTES:
            if source.inner:
                return None  # a large trainer-state object that may hold the counter: not worth reading
            raise CheckpointError(
                self.path,
                f"byte item {source.fqn!r} is {info.length} bytes, more than a step counter's "
                f"{MAX_STEP_ITEM_BYTES}; refused",
            )
        value = read_byte_item(self._files[info.relative_path], source.fqn, info.offset, info.length)
        return nested_value(value, source.inner) if source.inner else value


def _parts(metadata: Any, tensors: dict[str, TensorSpec]) -> list[Part[str]]:
    """What the save holds, by :func:`contents.split`, over the nesting DCP recorded when it flattened the
    save (``planner_data``), else over the keys split at their dots; the step counter left out."""
    step_fqn = next((k for k in STEP_KEYS if k in tensors and _may_be_step(tensors[k])), None)
    leaves = {fqn: spec for fqn, spec in tensors.items() if fqn != step_fqn}
    nesting = _nesting(metadata, leaves)
    paths = ((nesting[fqn], fqn) for fqn in leaves) if nesting else ((tuple(f.split(".")), f) for f in leaves)
    return split(paths, dotted=nesting is None)


def side_folder(folder: Path) -> str | None:
    """Why a DCP folder beside a step's model is a side folder rather than a model: it holds no model
    weights, only optimizer (or scheduler, trainer) state, as accelerate's FSDP ``SHARDED_STATE_DICT``
    save writes ``optimizer_0/`` beside ``pytorch_model_fsdp_0/``. Decided by what the save holds, read
    from its metadata with the restricted unpickler; ``None`` where it holds a model, or where the folder
    cannot be read (opening it as a model then says why)."""
    try:
        metadata = load_dcp_metadata(folder / ".metadata")
        entries = _tensor_entries(folder, metadata, _import_dcp(folder).metadata)
    except CheckpointError:
        return None
    tensors = {fqn: TensorSpec(tuple(e.size), e.properties.dtype) for fqn, e in entries.items()}
    parts = _parts(metadata, tensors)
    if not parts or any(p.kind in ("model", "average") for p in parts):
        return None
    return f"holds no model weights, only {described(parts)}"


def _byte_items(metadata: Any, md: ModuleType) -> set[str]:
    """The keys DCP saved as pickled objects (ints, strings, anything not a tensor)."""
    return {
        fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, md.BytesStorageMetadata)
    }


def _step_sources(tensors: dict[str, TensorSpec], byte_items: set[str]) -> list[StepSource]:
    """Where a step counter may be, by key only (nothing read): for each of the step keys in turn, a
    one-element integer tensor there, a byte item there, or a byte item higher up that may be a dict
    holding it (a trainer state saved as one object)."""
    sources = []
    for keys in [(key,) for key in STEP_KEYS] + list(NESTED_STEP_KEYS):
        fqn = ".".join(keys)
        if fqn in tensors and _may_be_step(tensors[fqn]):
            sources.append(StepSource(fqn, keys, is_bytes=False))
        elif fqn in byte_items:
            sources.append(StepSource(fqn, keys, is_bytes=True))
        for depth in range(len(keys) - 1, 0, -1):
            outer = ".".join(keys[:depth])
            if outer in byte_items:
                sources.append(StepSource(outer, keys, is_bytes=True, inner=keys[depth:]))
    return sources


def _import_dcp(path: Path) -> ModuleType:
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError as exc:  # torch built without distributed support
        raise CheckpointError(path, "is a DCP folder, but this torch has no torch.distributed") from exc
    return dcp


def _wrapped(exc: BaseException, wrapper: type[BaseException]) -> BaseException:
    """The exception a DCP ``CheckpointException`` holds (the first rank's), else ``exc`` itself."""
    failures = getattr(exc, "failures", None) if isinstance(exc, wrapper) else None
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException):
                return inner
    return exc


def _problem(exc: Exception) -> str:
    """A failed read of a data slice in plain words: torch's own messages run to many lines of advice."""
    if isinstance(exc, pickle.UnpicklingError):
        named = refused_globals(str(exc))
        return (
            f"it names {', '.join(named[:3])}, not a tensor; refused"
            if named
            else "its bytes are not a saved tensor"
        )
    if isinstance(exc, AttributeError | AssertionError | TypeError | IndexError | ValueError):
        return "it holds something other than a tensor of the size the metadata gives"  # DCP's own checks
    return first_line(exc)


def _may_be_step(spec: TensorSpec) -> bool:
    """A one-element, non-floating tensor under a step key; complex and bool ones too (refused later)."""
    return spec.numel == 1 and not spec.is_floating and (spec.dtype in DTYPE_NAMES or spec.dtype.is_complex)


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(path, f"has damaged DCP metadata: {problem}")


def _dims(value: Any) -> tuple[int, ...] | None:
    """``value`` as a shape (a tuple of non-negative ints), or ``None`` if it is not one."""
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


def _tensor_entries(path: Path, metadata: Any, md: ModuleType) -> dict[str, Any]:
    """The tensor entries of ``metadata`` by name, each checked to be well-formed."""
    if not isinstance(metadata, md.Metadata) or not isinstance(
        getattr(metadata, "state_dict_metadata", None), dict
    ):
        raise _damaged(path, "it does not hold a DCP Metadata")
    storage_meta = getattr(metadata, "storage_meta", None)
    if storage_meta is not None and not isinstance(storage_meta, md.StorageMeta):
        raise _damaged(path, "storage_meta is not a StorageMeta")
    entries: dict[str, Any] = {}
    chunks = 0
    for fqn, item in metadata.state_dict_metadata.items():
        checked_name(path, fqn)
        if isinstance(item, md.BytesStorageMetadata):
            continue  # pickled objects: never read (DCP would unpickle them with plain pickle)
        if not isinstance(item, md.TensorStorageMetadata) or not isinstance(
            getattr(item, "chunks", None), list
        ):
            raise _damaged(path, f"entry {fqn!r} is neither a tensor nor bytes")
        chunks += len(item.chunks)
        if chunks > MAX_CHUNKS:
            raise CheckpointError(path, f"lists more than {MAX_CHUNKS} tensor chunks; refused")
        _check_tensor_entry(path, fqn, item, md)
        entries[fqn] = item
    return entries


def _check_tensor_entry(path: Path, fqn: str, item: Any, md: ModuleType) -> None:
    """A shape, a dtype, and chunks that lie within the shape and add up to it."""
    shape = _dims(getattr(item, "size", None))
    if shape is None or not isinstance(
        getattr(getattr(item, "properties", None), "dtype", None), torch.dtype
    ):
        raise _damaged(path, f"tensor {fqn!r} has no valid shape and dtype")
    problem = shape_problem(shape, item.properties.dtype)
    if problem is not None:
        raise CheckpointError(path, f"tensor {fqn!r} {problem}")
    volume = 0
    for chunk in item.chunks:
        offsets = _dims(getattr(chunk, "offsets", None))
        sizes = _dims(getattr(chunk, "sizes", None))
        if (
            not isinstance(chunk, md.ChunkStorageMetadata)
            or offsets is None
            or sizes is None
            or not len(offsets) == len(sizes) == len(shape)
            or any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True))
        ):
            raise _damaged(path, f"tensor {fqn!r} has a chunk outside its shape {list(shape)}")
        volume += math.prod(sizes)
    if volume != math.prod(shape):
        raise _damaged(path, f"the chunks of tensor {fqn!r} do not cover its shape {list(shape)}")


def _check_storage(
    path: Path, metadata: Any, entries: dict[str, Any]
) -> dict[str, tuple[Path, os.stat_result]]:
    """Every data file is a regular file in the folder; every chunk's bytes lie within its file. Returns
    each data file as the metadata names it, with its resolved path and its stat as planned.

    A DCP whose tensors claim more bytes than its data files hold (a 3 KB file claiming a 4 TB tensor)
    is refused here, before anything is allocated.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise _damaged(path, "it has no storage_data")
    folder = path.resolve()
    files: dict[str, tuple[Path, os.stat_result]] = {}
    storage_info = dcp_storage_info_class()
    for info in storage.values():
        if not isinstance(info, storage_info):
            raise _damaged(path, "a storage_data entry is not a _StorageInfo")
        _check_storage_info(path, folder, info, files)
    claimed = sum(math.prod(entry.size) * entry.properties.dtype.itemsize for entry in entries.values())
    held = sum(planned.st_size for _, planned in files.values())
    if claimed > held:
        raise CheckpointError(
            path, f"claims {claimed} bytes of tensors, but its data files hold only {held} bytes; refused"
        )
    for fqn, entry in entries.items():
        itemsize = entry.properties.dtype.itemsize
        for chunk in entry.chunks:
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise _damaged(path, f"a chunk of tensor {fqn!r} has no storage entry")
            if info.length < math.prod(chunk.sizes) * itemsize:
                raise _damaged(
                    path, f"a chunk of tensor {fqn!r} is larger than the {info.length} bytes stored"
                )
    return files


def _check_storage_info(
    path: Path, folder: Path, info: Any, files: dict[str, tuple[Path, os.stat_result]]
) -> None:
    """One storage entry: plain bytes (no transforms) at an offset within a data file of the folder."""
    # Refused rather than handled: with stream transforms (e.g. zstd compression) the stored bytes no
    # longer bound a tensor's size, and this tool reads only what DCP writes by default.
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            path, "uses DCP stream transforms (e.g. compression), which this tool does not read; refused"
        )
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    relative = getattr(info, "relative_path", None)
    if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
        raise _damaged(path, f"a storage entry of {relative!r} has offset {offset!r}, length {length!r}")
    if not isinstance(relative, str):
        raise _damaged(path, "a storage entry names no file")
    if relative not in files:
        files[relative] = _data_file(path, folder, relative)
    if offset + length > files[relative][1].st_size:
        raise CheckpointError(
            path, f"is truncated: {relative!r} ends before byte {offset + length} that the metadata points at"
        )


def _data_file(path: Path, folder: Path, relative: str) -> tuple[Path, os.stat_result]:
    """A data file the metadata names, which must be a regular file inside ``folder``, and its stat."""
    try:
        resolved = (folder / relative).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, f"data file {relative!r} cannot be resolved ({exc})") from exc
    if resolved == folder or not resolved.is_relative_to(folder):
        raise CheckpointError(path, f"names data file {relative!r}, outside the checkpoint folder; refused")
    return resolved, require_regular_file(resolved)


def _nesting(metadata: Any, leaves: dict[str, TensorSpec]) -> dict[str, KeyPath] | None:
    """Each key's path in the dict that was saved, from ``planner_data`` (DCP's default planner records
    it when it flattens): used only where it is what flattening gives (the keys joined by dots), since the
    metadata is untrusted input; ``None`` where absent or off."""
    recorded = getattr(metadata, "planner_data", None)
    if not isinstance(recorded, dict):
        return None
    nesting: dict[str, KeyPath] = {}
    for fqn in leaves:
        path = recorded.get(fqn)
        if not isinstance(path, tuple | list) or not path or not all(isinstance(k, str | int) for k in path):
            return None
        keys = tuple(str(k) for k in path)
        if ".".join(keys) != fqn:
            return None
        nesting[fqn] = keys
    return nesting


def _model_prefix(path: Path, tensors: dict[str, Any], key: str) -> str:
    """``--state-dict-key KEY``: the tensors under ``KEY.``, whatever the split would have chosen."""
    if not any(fqn.startswith(key + ".") for fqn in tensors):
        raise CheckpointError(path, f"has no tensors under --state-dict-key {key!r}")
    return key + "."


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    """``--submodel KEY`` reads the tensors under ``KEY.`` as ``--state-dict-key`` does (the EMA callback's
    ``ema`` beside Lightning's sharded ``state_dict``), as for torch files; ``--submodel NAME`` naming
    this folder itself (``pytorch_model_fsdp_0``, chosen among a step folder's models) reads it whole."""
    if options.submodel is not None and options.submodel == path.name and options.state_dict_key is None:
        ckpt = DcpCheckpoint(path, trust_pickle=options.trust_pickle)
        ckpt.choices.insert(0, ModelChoice(path.name))  # what --submodel NAME is checked against
        return ckpt
    key = options.state_dict_key or options.submodel
    return DcpCheckpoint(path, state_dict_key=key, trust_pickle=options.trust_pickle)


LAYOUT = Layout(
    "dcp", "folder", "DCP folders (.metadata + *.distcp)", is_dcp_folder, _open, side_folder=side_folder
)
