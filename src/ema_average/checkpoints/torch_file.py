"""torch files (``.pt .pth .bin .ckpt .th .pth.tar``): a bare state dict, or a dict holding one, with a step.

Covers plain ``torch.save(model.state_dict())``, Lightning ``.ckpt`` (``state_dict``, ``global_step``),
fairseq (``model``, ``optimizer_history[-1]["num_updates"]``), timm's ``CheckpointSaver`` (``state_dict``,
``epoch``), MosaicML composer (``state.model``, ``state.timestamp``), and the usual trainer dicts
(``model``, ``module``, ``model_state_dict``...). Where a file holds an average beside the raw weights
(timm ``state_dict_ema``, fairseq ``extra_state.ema``, Lightning EMAWeightAveraging, composer's EMA
algorithm), the raw weights are read and the average is named with the ``--state-dict-key`` that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    PreadFile,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.keys import (
    CHECKPOINT_SUFFIXES,
    COUNTED_FROM_1,
    EPOCH_COUNTERS,
    NESTED_STEP_KEYS,
    STEP_KEYS,
    is_side_file,
)
from ema_average.checkpoints.safe_unpickle import TorchFile, ZipMember, open_torch_file
from ema_average.checkpoints.steps import checked_step, stated_step
from ema_average.checkpoints.stored import NotLaidOut as _NotLaidOut
from ema_average.checkpoints.stored import Stored as _Stored
from ema_average.checkpoints.stored import file_offset as _file_offset
from ema_average.checkpoints.stored import fill
from ema_average.checkpoints.stored import stored as _stored
from ema_average.checkpoints.tensor_state import layout_of, numel_of
from ema_average.checkpoints.torch_contents import NeedsFullUnpickling, as_mapping, find_state_dict
from ema_average.checkpoints.torch_contents import checked_name as checked_name  # dcp, deepspeed use it
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES


class TorchCheckpoint(Checkpoint):
    """A torch-saved file. Zip files (torch >= 1.6) are unpickled onto the meta device and each tensor's
    bytes read with ``pread`` from where its storage lies in the file, like safetensors: nothing is
    mapped, so a file cut short while it is read is a clear error, never a SIGBUS. Legacy files are
    loaded whole."""

    layout = "torch"

    def __init__(self, path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self._state_dict_key = state_dict_key
        self._trust_pickle = trust_pickle
        self._tensors: dict[str, torch.Tensor] | None = None  # legacy files: the tensors, in memory
        self._stored: dict[str, _Stored] = {}  # zip files: where each tensor lies in the file
        self._file: PreadFile | None = None
        self._mapped_because: str | None = None
        self._step: StepInfo | None = None
        self._full = False  # fully unpickled: the weights are a pickled model (--trust-pickle)
        self._weights_wanted = False  # a final copy's weights are looked for only when it is read
        self._weights_found = False
        self._open()
        if self._raw_is_lightning:
            self.layout = "lightning"

    def _open(self, mapped_because: str | None = None) -> None:
        contents = self._unpickled(mapped_because)
        try:
            self._take(contents)
        except _NotLaidOut as exc:  # repacked by another zip tool: torch's own offsets do not hold
            self._open(f"its zip is not laid out as torch.save writes it ({exc})")
            return
        except NeedsFullUnpickling:  # the weights are a pickled model, and the user trusts the file
            self._full = True
            self._open(mapped_because)
            return
        self._mapped_because = contents.mapped_because
        note = None
        if contents.mapped_because is not None:
            note = f"read through a mapping of the file: {contents.mapped_because}"
        elif not contents.lazy:
            self.lazy = False
            note = "legacy (non-zip) torch format: loaded whole, not lazily"
        if note is not None and note not in self.notes:
            self.notes.append(note)

    def _unpickled(self, mapped_because: str | None) -> TorchFile:
        return open_torch_file(
            self.path, trust_pickle=self._trust_pickle, mapped_because=mapped_because, full=self._full
        )

    def _take(self, contents: TorchFile) -> None:
        """The state dict and step of ``contents``; where each tensor lies in the file (zip files)."""
        obj = as_mapping(self.path, contents.obj, trust_pickle=self._trust_pickle, trusted=contents.trusted)
        self._file = PreadFile(self.path, contents.planned) if contents.lazy else None
        self._raw_is_lightning = "pytorch-lightning_version" in obj
        self.final_copy = final_copy(obj)
        self._step = _find_step(self.path, obj, lambda t: self._materialised(t, contents.members))
        self._key = None
        if self.final_copy is not None and self._step is None and not self._weights_wanted:
            return  # skipped as a final copy before its weights (a pickled model) are unpickled fully
        self._weights_found = True
        tensors, self._key, choice = find_state_dict(
            self.path, obj, self._state_dict_key, trust_pickle=self._trust_pickle
        )
        self.choices = [choice] if choice is not None else []
        for name, tensor in tensors.items():
            problem = tensor_problem(tensor, in_file=contents.lazy and _file_offset(tensor) is not None)
            if problem is not None:
                raise CheckpointError(self.path, f"tensor {name!r} {problem}")
        problem = named_bytes_problem(tensors, contents.members if contents.lazy else None)
        if problem is not None:
            raise CheckpointError(self.path, problem)
        if contents.lazy:
            self._stored = {
                name: _stored(self.path, name, t, contents.members) for name, t in tensors.items()
            }
        else:
            self._tensors = tensors
        self._specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}

    def _materialised(self, tensor: torch.Tensor, members: dict[int, ZipMember]) -> torch.Tensor:
        """A one-element tensor of the file (a step) with its value read, for the step finders."""
        if self._file is None or numel_of(tensor) != 1 or _file_offset(tensor) is None:
            return tensor
        if tensor_problem(tensor, in_file=True) is not None:
            return tensor  # refused as a step by checked_step
        return self._read_stored(_stored(self.path, "(step)", tensor, members), "(step)")

    def _weights(self) -> None:
        """A final copy read after all (named alone, or asked for): its weights looked for now; with
        ``--trust-pickle`` that may unpickle it fully, which skipping it never does."""
        if not self._weights_found:
            self._weights_wanted = True
            self._open(self._mapped_because)

    @property
    def state_dict_key(self) -> str | None:
        """Which key of the saved dict held the weights (``None``: the file is a bare state dict)."""
        self._weights()
        return self._key

    def _state(self) -> dict[str, torch.Tensor]:
        """A legacy or mapped file's tensors, loaded again after :meth:`close`."""
        if self._tensors is None:
            self._take(self._unpickled(self._mapped_because))
        assert self._tensors is not None
        return self._tensors

    def specs(self) -> dict[str, TensorSpec]:
        self._weights()
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return self._state()[name]
        return self._read_stored(self._stored[name], name)

    def _read_stored(self, stored: _Stored, name: str) -> torch.Tensor:
        return self._fill(stored, name, 0, torch.empty(stored.shape, dtype=stored.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return out.copy_(self._state()[name])
        return self._fill(self._stored[name], name, 0, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return out.copy_(self._state()[name].reshape(-1)[start : start + out.numel()])
        return self._fill(self._stored[name], name, start, out)

    def _fill(self, stored: _Stored, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of the tensor (flattened) into ``out``, read from the file."""
        assert self._file is not None
        return fill(self._file, stored, name, start, out)

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def aliases(self) -> dict[str, str]:
        self._weights()
        if self._file is None:
            return storage_aliases(self._state())
        return first_names({name: s.identity for name, s in self._stored.items() if s.numel})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # reopened by the next read
        else:
            self._tensors = None


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


Materialise = Callable[[torch.Tensor], torch.Tensor]  # a file's tensor, its values read


def step_value(path: Path, value: Any, where: str, read: Materialise) -> int | None:
    """The step ``value`` holds, checked; ``None`` where it is no step (absent, a flag, a float, a container)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, str)):
        return checked_step(path, value, where)
    if isinstance(value, torch.Tensor) and numel_of(value) == 1 and not value.dtype.is_floating_point:
        return checked_step(path, read(value), where)  # refuses complex, bool, meta and out-of-range values
    return None


def _find_step(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """The step the saved dict records, trying each trainer's key in turn; ``read`` gives a tensor's value."""
    for key in STEP_KEYS:
        step = step_value(path, obj.get(key), f"metadata:{key}", read)
        if step is not None:
            return StepInfo(step, f"metadata:{key}")
    history = obj.get("optimizer_history")  # fairseq
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        source = "metadata:optimizer_history[-1].num_updates"
        step = step_value(path, history[-1].get("num_updates"), source, read)
        if step is not None:
            return StepInfo(step, source)
    composer = _composer_step(path, obj, read)
    if composer is not None:
        return composer
    for keys in NESTED_STEP_KEYS:  # trainer-state containers: ignite, mmengine, torchtnt, litgpt...
        source = "metadata:" + ".".join(keys)
        step = step_value(path, nested_value(obj, keys), source, read)
        if step is not None:
            return StepInfo(step, source)
    if final_copy(obj):
        return None
    plain = {k: v for k, v in obj.items() if isinstance(v, int | str)}  # a step key off the lists
    return stated_step(path, plain, "metadata") or _epoch_count(path, obj, read)


def final_copy(obj: Mapping[str, Any]) -> str | None:
    """Why the file is a final copy of the run's weights rather than a step of it, or ``None``.

    ultralytics' ``strip_optimizer`` rewrites ``last.pt`` and ``best.pt`` at the end of training with the
    EMA as ``model``, no optimizer, and ``epoch`` -1: no step, a copy of an epoch's weights."""
    epoch = obj.get("epoch")
    if isinstance(epoch, int) and epoch == -1 and obj.get("optimizer") is None and "train_args" in obj:
        return "a final copy of the weights (epoch -1: ultralytics' strip_optimizer)"
    return None


def nested_value(obj: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value at ``keys`` down nested mappings; ``None`` where the path is not there."""
    value: Any = obj
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _epoch_count(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """An epoch count (timm, open_clip), flagged as a counter; its origin says where a count starts at 1."""
    for keys, beside, first in EPOCH_COUNTERS:
        if not all(key in obj for key in beside):
            continue
        source = "metadata:" + ".".join(keys)
        step = step_value(path, nested_value(obj, keys), source, read)
        if step is not None:
            return StepInfo(step, source + (COUNTED_FROM_1 if first == 1 else ""), counter=True)
    return None


def _composer_step(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """MosaicML composer: ``state.timestamp`` is ``{"Timestamp": Timestamp.state_dict()}``; ``batch`` is
    the count of optimizer steps (the ``baN`` of its file names)."""
    state = obj.get("state")
    timestamp = state.get("timestamp") if isinstance(state, Mapping) else None
    if not isinstance(timestamp, Mapping):
        return None
    record = timestamp.get("Timestamp", timestamp)
    if not isinstance(record, Mapping):
        return None
    source = "metadata:state.timestamp.batch"
    step = step_value(path, record.get("batch"), source, read)
    return StepInfo(step, source) if step is not None else None


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


def _claims(path: Path) -> bool:
    name = path.name.lower()
    return (
        name.endswith(CHECKPOINT_SUFFIXES)
        and not name.endswith(".safetensors")
        and not is_side_file(path.name)
    )


def _open_layout(path: Path, options: OpenOptions) -> Checkpoint:
    """``--submodel NAME`` reads the state dict under key ``NAME`` (``--submodel ema``), as
    ``--state-dict-key`` does: in a torch file a model is picked by its key."""
    key = options.state_dict_key or options.submodel
    return TorchCheckpoint(path, state_dict_key=key, trust_pickle=options.trust_pickle)


LAYOUT = Layout(
    "torch",
    "file",
    f"files ending {', '.join(s for s in CHECKPOINT_SUFFIXES if s != '.safetensors')}",
    _claims,
    _open_layout,
)
