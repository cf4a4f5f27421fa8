"""torch files (``.pt .pth .bin .ckpt .th .pth.tar``): a bare state dict, or a dict holding one, with a step.

Covers plain ``torch.save(model.state_dict())``, Lightning ``.ckpt`` (``state_dict``, ``global_step``),
fairseq (``model``, ``optimizer_history[-1]["num_updates"]``), timm's ``CheckpointSaver`` (``state_dict``,
``epoch``), MosaicML composer (``state.model``, ``state.timestamp``), and the usual trainer dicts
(``model``, ``module``, ``model_state_dict``...). Where a file holds an average beside the raw weights
(timm ``state_dict_ema``, fairseq ``extra_state.ema``, Lightning EMAWeightAveraging, composer's EMA
algorithm), the raw weights are read and the average is named with the ``--state-dict-key`` that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
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
from ema_average.checkpoints.contents import KeyPath, Kind, Part, described, mirrors, split, structure_of
from ema_average.checkpoints.keys import (
    CHECKPOINT_SUFFIXES,
    COUNTED_FROM_1,
    EPOCH_COUNTERS,
    NESTED_STEP_KEYS,
    STATE_DICT_KEYS,
    STEP_KEYS,
    is_side_file,
)
from ema_average.checkpoints.safe_unpickle import TorchFile, ZipMember, open_torch_file
from ema_average.checkpoints.steps import checked_step
from ema_average.checkpoints.stored import NotLaidOut as _NotLaidOut
from ema_average.checkpoints.stored import Stored as _Stored
from ema_average.checkpoints.stored import file_offset as _file_offset
from ema_average.checkpoints.stored import fill
from ema_average.checkpoints.stored import stored as _stored
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES

# Bounds on walking a nested state dict: a few hundred bytes of pickle can describe a loop, or a DAG
# of shared dicts with 2**40 paths through it.
MAX_DEPTH = 100
MAX_NAMES = 10_000_000


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
        self._open()
        if self._raw_is_lightning:
            self.layout = "lightning"

    def _open(self, mapped_because: str | None = None) -> None:
        contents = open_torch_file(self.path, trust_pickle=self._trust_pickle, mapped_because=mapped_because)
        try:
            self._take(contents)
        except _NotLaidOut as exc:  # repacked by another zip tool: torch's own offsets do not hold
            self._open(f"its zip is not laid out as torch.save writes it ({exc})")
            return
        self._mapped_because = contents.mapped_because
        if contents.mapped_because is not None:
            self.notes.append(f"read through a mapping of the file: {contents.mapped_because}")
        elif not contents.lazy:
            self.lazy = False
            self.notes.append("legacy (non-zip) torch format: loaded whole, not lazily")

    def _take(self, contents: TorchFile) -> None:
        """The state dict and step of ``contents``; where each tensor lies in the file (zip files)."""
        obj = contents.obj
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                self.path, f"holds a {type(obj).__name__}, not a state dict (a whole pickled model?)"
            )
        self._file = PreadFile(self.path, contents.planned) if contents.lazy else None
        self._raw_is_lightning = "pytorch-lightning_version" in obj
        self._step = _find_step(self.path, obj, lambda t: self._materialised(t, contents.members))
        tensors, self._key, choice = _find_state_dict(self.path, obj, self._state_dict_key)
        self.choices = [choice] if choice is not None else []
        for name, tensor in tensors.items():
            problem = tensor_problem(tensor, in_file=contents.lazy and _file_offset(tensor) is not None)
            if problem is not None:
                raise CheckpointError(self.path, f"tensor {name!r} {problem}")
        if contents.lazy:
            self._stored = {
                name: _stored(self.path, name, t, contents.members) for name, t in tensors.items()
            }
        else:
            self._tensors = tensors
        self._specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}

    def _materialised(self, tensor: torch.Tensor, members: dict[int, ZipMember]) -> torch.Tensor:
        """A one-element tensor of the file (a step) with its value read, for the step finders."""
        if self._file is None or tensor.numel() != 1 or _file_offset(tensor) is None:
            return tensor
        if tensor_problem(tensor, in_file=True) is not None:
            return tensor  # refused as a step by checked_step
        return self._read_stored(_stored(self.path, "(step)", tensor, members), "(step)")

    @property
    def state_dict_key(self) -> str | None:
        """Which key of the saved dict held the weights (``None``: the file is a bare state dict)."""
        return self._key

    def _state(self) -> dict[str, torch.Tensor]:
        """A legacy or mapped file's tensors, loaded again after :meth:`close`."""
        if self._tensors is None:
            again = open_torch_file(
                self.path, trust_pickle=self._trust_pickle, mapped_because=self._mapped_because
            )
            self._take(again)
        assert self._tensors is not None
        return self._tensors

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        if self._file is None:
            return self._state()[name]
        return self._read_stored(self._stored[name], name)

    def _read_stored(self, stored: _Stored, name: str) -> torch.Tensor:
        return self._fill(stored, name, 0, torch.empty(stored.shape, dtype=stored.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if self._file is None:
            return out.copy_(self._state()[name])
        return self._fill(self._stored[name], name, 0, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
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
            name: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            for name, t in tensors.items()
            if t.numel()
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


def _step_value(path: Path, value: Any, where: str, read: Materialise) -> int | None:
    """The step ``value`` holds, checked; ``None`` where it is no step (absent, a flag, a float, a container)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, str)):
        return checked_step(path, value, where)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return checked_step(path, read(value), where)  # refuses complex, bool, meta and out-of-range values
    return None


def _find_step(path: Path, obj: Mapping[str, Any], read: Materialise) -> StepInfo | None:
    """The step the saved dict records, trying each trainer's key in turn; ``read`` gives a tensor's value."""
    for key in STEP_KEYS:
        step = _step_value(path, obj.get(key), f"metadata:{key}", read)
        if step is not None:
            return StepInfo(step, f"metadata:{key}")
    history = obj.get("optimizer_history")  # fairseq
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        source = "metadata:optimizer_history[-1].num_updates"
        step = _step_value(path, history[-1].get("num_updates"), source, read)
        if step is not None:
            return StepInfo(step, source)
    composer = _composer_step(path, obj, read)
    if composer is not None:
        return composer
    for keys in NESTED_STEP_KEYS:  # trainer-state containers: ignite, mmengine, torchtnt, litgpt...
        source = "metadata:" + ".".join(keys)
        step = _step_value(path, _nested(obj, keys), source, read)
        if step is not None:
            return StepInfo(step, source)
    return _epoch_count(path, obj, read)


def _nested(obj: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
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
        step = _step_value(path, _nested(obj, keys), source, read)
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
    step = _step_value(path, record.get("batch"), source, read)
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
    """A view wider than its storage (a broadcast, stride 0): a few bytes of file, any size of output."""
    if tensor.numel() == 0:
        return None
    itemsize = tensor.element_size()
    needed = tensor.numel() * itemsize
    available = tensor.untyped_storage().nbytes() - tensor.storage_offset() * itemsize
    if needed <= available:
        return None
    return (
        f"has {tensor.numel()} elements ({needed} bytes) over only {max(available, 0)} bytes of storage "
        "(an expanded or broadcast view); it would be materialised at full size, so it is refused"
    )


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a huge int, say
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def checked_name(path: Path, key: Any) -> str:
    """A dict key usable in a tensor name: a string that UTF-8 can encode (names are sorted and written)."""
    if not isinstance(key, str):
        raise CheckpointError(path, f"has a tensor name {_short_repr(key)} that is not a string")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            path, f"has a tensor name {_short_repr(key)} that is not valid UTF-8 text"
        ) from None
    return key


class _Flattener:
    """Walks a nested state dict once: each dict visited at most once, depth and names bounded. Records
    each tensor under its dotted name and its path of keys, and what each dict's own keys say it is
    (an optimizer's or a scheduler's state), for :func:`ema_average.checkpoints.contents.split`."""

    def __init__(self, path: Path, *, whole_file: bool = False) -> None:
        self.path = path
        self.whole_file = whole_file  # optimizer state has integer keys: they are refused only in a model
        self.out: dict[str, torch.Tensor] = {}
        self.paths: list[tuple[KeyPath, torch.Tensor]] = []
        self.structure: dict[KeyPath, Kind] = {}
        self.odd: dict[str, Any] = {}  # whole file: names reached through a key that is no string
        self.seen: dict[int, str] = {}

    def walk(
        self, mapping: Mapping[Any, Any], name: str = "", depth: int = 0, keys: KeyPath = (), odd: Any = None
    ) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(self.path, f"nests dicts more than {MAX_DEPTH} deep (at {name!r}); refused")
        self.seen[id(mapping)] = name
        kind = structure_of(mapping) if isinstance(mapping, Mapping) else None
        if kind is not None:
            self.structure[keys] = kind
        prefix = f"{name}." if name else ""
        for key, value in _items(mapping):
            if not (isinstance(value, torch.Tensor) or _holds_more(value)):
                continue
            if self.whole_file and not isinstance(key, str):
                checked, odd_here = str(key), key if odd is None else odd
            else:
                checked, odd_here = checked_name(self.path, key), odd
            if isinstance(value, torch.Tensor):
                self._add(prefix + checked, (*keys, checked), value)
                if odd_here is not None:
                    self.odd[prefix + checked] = odd_here
            else:
                child = prefix + checked
                first = self.seen.get(id(value))
                if first is not None:
                    raise CheckpointError(
                        self.path,
                        f"holds the same dict at {_shown(first)} and at {child!r} "
                        "(a loop or a shared sub-dict); refused",
                    )
                self.walk(value, child, depth + 1, (*keys, checked), odd_here)

    def _add(self, name: str, keys: KeyPath, tensor: torch.Tensor) -> None:
        if name in self.out:
            raise CheckpointError(self.path, f"has two tensors named {name!r}")
        if len(self.out) >= MAX_NAMES:
            raise CheckpointError(self.path, f"has more than {MAX_NAMES} tensors; refused")
        self.out[name] = tensor
        self.paths.append((keys, tensor))


def _items(container: Mapping[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterable[tuple[Any, Any]]:
    """A dict's items; a list's under their index (Lightning's ``optimizer_states``, a list of dicts)."""
    if isinstance(container, Mapping):
        return container.items()
    return ((str(i), value) for i, value in enumerate(container))


def _holds_more(value: Any) -> bool:
    """A non-empty dict, or a list or tuple of dicts or tensors, to walk into (a list of numbers is not)."""
    if isinstance(value, Mapping):
        return bool(value)
    return isinstance(value, list | tuple) and any(isinstance(v, Mapping | torch.Tensor) for v in value)


def _shown(name: str) -> str:
    return repr(name) if name else "the top level"


def _flatten(path: Path, mapping: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    """Tensors of a (possibly nested) state dict under dotted names; non-tensor entries are left out."""
    flattener = _Flattener(path)
    flattener.walk(mapping)
    return flattener.out


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


@dataclass
class _Candidate:
    """A state dict found in a file: the key that names it and whether it is an average of the weights."""

    key: str
    value: Mapping[Any, Any]
    ema: bool


def _candidates(path: Path, obj: Mapping[str, Any]) -> tuple[list[_Candidate], list[Part[torch.Tensor]]]:
    """The state dicts ``obj`` holds, raw weights before averages, each under the key that picks it; and
    the parts that are no model (optimizer, scheduler and trainer state), to name in the plan.

    What is model, average or other state is decided by :func:`contents.split` for every trainer alike;
    only where a trainer saves its average under the raw weights' usual key is its convention applied.
    """
    found, beside = _composer_candidates(obj), []
    if not found:
        walker = _Flattener(path, whole_file=True)
        walker.walk(obj)
        parts = split(walker.paths, walker.structure)
        _refuse_odd_names(path, walker.odd, parts)
        found = [
            _Candidate(p.key, p.tensors, p.kind == "average") for p in parts if p.kind in ("model", "average")
        ]
        found = _swapped_by_convention(obj, found)
        beside = [p for p in parts if p.kind not in ("model", "average")]
    return sorted(found, key=lambda c: (c.ema, _preference(c.key))), beside


def _refuse_odd_names(path: Path, odd: Mapping[str, Any], parts: list[Part[torch.Tensor]]) -> None:
    """A model or average whose names go through a key that is no string cannot be written (optimizer
    state, keyed by parameter index, may)."""
    for part in parts:
        if part.kind not in ("model", "average"):
            continue
        for name in part.tensors:
            key = odd.get(f"{part.key}.{name}" if part.key else name)
            if key is not None:
                checked_name(path, key)  # raises, naming the key


def _preference(key: str) -> int:
    """The usual keys first (``state_dict`` before ``model``...), others in the file's order."""
    return STATE_DICT_KEYS.index(key) if key in STATE_DICT_KEYS else len(STATE_DICT_KEYS)


def _swapped_by_convention(obj: Mapping[str, Any], found: list[_Candidate]) -> list[_Candidate]:
    """Trainers that save the average under the raw weights' key. Lightning's EMAWeightAveraging moves
    the raw weights to ``current_model_state``; mmengine's EMAHook (a Runner save: ``message_hub``) swaps
    the average into ``state_dict`` and keeps the raw weights in ``ema_state_dict`` as ``module.*``,
    beside the ``steps`` counter of its ``AveragedModel``."""
    keys = {c.key: c for c in found}
    if "current_model_state" in keys and "state_dict" in keys:
        keys["state_dict"].ema = True
    if "message_hub" in obj and "ema_state_dict" in keys and "state_dict" in keys:
        raw = keys["ema_state_dict"]
        raw.value = {n.removeprefix("module."): t for n, t in raw.value.items() if n.startswith("module.")}
        raw.ema, keys["state_dict"].ema = False, True
    return found


def _composer_candidates(obj: Mapping[str, Any]) -> list[_Candidate]:
    """composer: the model at ``state.model``; its EMA algorithm swaps the average into the model for
    checkpointing (``ema_weights_active``) and keeps the training weights in its own state."""
    state = obj.get("state")
    if not isinstance(state, Mapping) or not _is_state_dict(state.get("model")):
        return []
    model = _Candidate("state.model", state["model"], False)
    algorithms = state.get("algorithms")
    for entry in algorithms if isinstance(algorithms, list) else []:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and entry[0] == "EMA"):
            continue
        ema_state = entry[1] if isinstance(entry[1], Mapping) else {}
        held = ema_state.get("ema_model")
        if not isinstance(held, Mapping):
            continue
        parts = [held.get("named_parameters_dict"), held.get("named_buffers_dict")]
        merged = {k: v for part in parts if isinstance(part, Mapping) for k, v in part.items()}
        if all(name in merged for name in state["model"]):  # the saved names: persistent buffers only
            merged = {name: merged[name] for name in state["model"]}
        if not _is_state_dict(merged):
            continue
        swapped = ema_state.get("ema_weights_active") is True
        other = _Candidate("state.algorithms.EMA", merged, not swapped)
        model.ema = swapped
        return [model, other]
    return [model]


def _find_state_dict(
    path: Path, obj: Mapping[str, Any], key: str | None
) -> tuple[dict[str, torch.Tensor], str | None, ModelChoice | None]:
    if key is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _flatten(path, obj), None, None
    candidates, beside = _candidates(path, obj)
    chosen = next((c for c in candidates if c.key == key), None) if key is not None else None
    if key is not None and chosen is None:
        return _by_dotted_key(path, obj, key), key, None
    if chosen is None and candidates:
        chosen = candidates[0]
    if chosen is None:
        keys = ", ".join(_short_repr(k) for k in list(obj)[:8])
        held = f"; it holds {described(beside)}" if beside else ""
        raise CheckpointError(
            path,
            f"no state dict found (top-level keys: {keys}{held}); "
            "name the key holding the weights with --state-dict-key",
        )
    tensors = _flatten(path, chosen.value)
    return tensors, chosen.key, _choice(path, chosen, candidates, tensors, beside)


def _choice(
    path: Path,
    chosen: _Candidate,
    candidates: list[_Candidate],
    tensors: dict[str, torch.Tensor],
    beside: list[Part[torch.Tensor]],
) -> ModelChoice | None:
    """The other state dicts of the same model (same names: an average, not an optimizer's state), and
    what else the file holds that is not averaged."""
    others = {}
    for c in candidates:
        if c is not chosen and mirrors(_flatten(path, c.value), tensors):
            others[c.key] = f"--state-dict-key {c.key}"
    if not others and not chosen.ema and not beside:
        return None
    return ModelChoice(chosen.key, others, average=chosen.ema, beside=described(beside))


def _by_dotted_key(path: Path, obj: Mapping[str, Any], key: str) -> dict[str, torch.Tensor]:
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise CheckpointError(path, f"has no state dict under --state-dict-key {key!r}")
        value = value[part]
    if not _is_state_dict(value):
        raise CheckpointError(path, f"the value under --state-dict-key {key!r} holds no tensors")
    return _flatten(path, value)


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
