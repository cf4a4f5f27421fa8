"""torch files (``.pt .pth .bin .ckpt .th .pth.tar``): a bare state dict, or a dict holding one, with a step.

Covers plain ``torch.save(model.state_dict())``, Lightning ``.ckpt`` (``state_dict``, ``global_step``),
fairseq (``model``, ``optimizer_history[-1]["num_updates"]``), timm's ``CheckpointSaver`` (``state_dict``,
``epoch``), MosaicML composer (``state.model``, ``state.timestamp``), and the usual trainer dicts
(``model``, ``module``, ``model_state_dict``...). Where a file holds an average beside the raw weights
(timm ``state_dict_ema``, fairseq ``extra_state.ema``, Lightning EMAWeightAveraging, composer's EMA
algorithm), the raw weights are read and the average is named with the ``--state-dict-key`` that reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import Checkpoint, Layout, ModelChoice, OpenOptions, StepInfo, TensorSpec
from ema_average.checkpoints.keys import (
    CHECKPOINT_SUFFIXES,
    EPOCH_KEYS,
    STATE_DICT_KEYS,
    STEP_KEYS,
    is_ema_name,
    is_side_file,
)
from ema_average.checkpoints.safe_unpickle import load_torch_file
from ema_average.checkpoints.steps import checked_step
from ema_average.errors import CheckpointError
from ema_average.safetensors_format import DTYPE_NAMES

# Bounds on walking a nested state dict: a few hundred bytes of pickle can describe a loop, or a DAG
# of shared dicts with 2**40 paths through it.
MAX_DEPTH = 100
MAX_NAMES = 10_000_000


class TorchCheckpoint(Checkpoint):
    """A torch-saved file, memory-mapped where its format allows (zip, torch >= 1.6)."""

    layout = "torch"

    def __init__(self, path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self._state_dict_key = state_dict_key
        self._trust_pickle = trust_pickle
        self._tensors: dict[str, torch.Tensor] | None = None
        self._step: StepInfo | None = None
        self._open()
        if self._raw_is_lightning:
            self.layout = "lightning"
        self.zero_copy = self._lazy
        if not self._lazy:
            self.lazy = False
            self.notes.append("legacy (non-zip) torch format: loaded whole, not lazily")

    def _open(self) -> None:
        obj, self._lazy = load_torch_file(self.path, trust_pickle=self._trust_pickle)
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                self.path, f"holds a {type(obj).__name__}, not a state dict (a whole pickled model?)"
            )
        self._raw_is_lightning = "pytorch-lightning_version" in obj
        self._step = _find_step(self.path, obj)
        self._tensors, self._key, choice = _find_state_dict(self.path, obj, self._state_dict_key)
        self.choices = [choice] if choice is not None else []
        for name, tensor in self._tensors.items():
            problem = tensor_problem(tensor)
            if problem is not None:
                raise CheckpointError(self.path, f"tensor {name!r} {problem}")

    @property
    def state_dict_key(self) -> str | None:
        """Which key of the saved dict held the weights (``None``: the file is a bare state dict)."""
        return self._key

    def _state(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._open()
        assert self._tensors is not None
        return self._tensors

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in self._state().items()}

    def read(self, name: str) -> torch.Tensor:
        return self._state()[name]

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def aliases(self) -> dict[str, str]:
        return storage_aliases(self._state())

    def close(self) -> None:
        self._tensors = None


def storage_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied weights: names whose tensor is the same view of the same storage as an earlier name's."""
    first: dict[tuple[Any, ...], str] = {}
    found: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            found[name] = first[key]
        else:
            first[key] = name
    return found


def _step_value(path: Path, value: Any, where: str) -> int | None:
    """The step ``value`` holds, checked; ``None`` where it is no step (absent, a flag, a float, a container)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, str)):
        return checked_step(path, value, where)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return checked_step(path, value, where)  # refuses complex, bool, meta and out-of-range values
    return None


def _find_step(path: Path, obj: Mapping[str, Any]) -> StepInfo | None:
    for key in STEP_KEYS:
        step = _step_value(path, obj.get(key), f"metadata:{key}")
        if step is not None:
            return StepInfo(step, f"metadata:{key}")
    history = obj.get("optimizer_history")  # fairseq
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        source = "metadata:optimizer_history[-1].num_updates"
        step = _step_value(path, history[-1].get("num_updates"), source)
        if step is not None:
            return StepInfo(step, source)
    composer = _composer_step(path, obj)
    if composer is not None:
        return composer
    for key in EPOCH_KEYS:  # timm: only the epoch is recorded; flagged as a counter
        step = _step_value(path, obj.get(key), f"metadata:{key}")
        if step is not None:
            return StepInfo(step, f"metadata:{key}", counter=True)
    return None


def _composer_step(path: Path, obj: Mapping[str, Any]) -> StepInfo | None:
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
    step = _step_value(path, record.get("batch"), source)
    return StepInfo(step, source) if step is not None else None


def tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why this tool cannot average ``tensor`` (completing "tensor 'x' ..."), or ``None`` if it can."""
    if tensor.is_nested or tensor.layout != torch.strided:
        return f"is not a dense tensor (layout {tensor.layout}); sparse and nested tensors cannot be averaged"
    if tensor.device.type != "cpu":
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
    """Walks a nested state dict once: each dict visited at most once, depth and names bounded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out: dict[str, torch.Tensor] = {}
        self.seen: dict[int, str] = {}

    def walk(self, mapping: Mapping[Any, Any], name: str = "", depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(self.path, f"nests dicts more than {MAX_DEPTH} deep (at {name!r}); refused")
        self.seen[id(mapping)] = name
        prefix = f"{name}." if name else ""
        for key, value in mapping.items():
            if isinstance(value, torch.Tensor):
                self._add(prefix + checked_name(self.path, key), value)
            elif isinstance(value, Mapping) and value:  # an empty dict holds no tensors
                child = prefix + checked_name(self.path, key)
                first = self.seen.get(id(value))
                if first is not None:
                    raise CheckpointError(
                        self.path,
                        f"holds the same dict at {_shown(first)} and at {child!r} "
                        "(a loop or a shared sub-dict); refused",
                    )
                self.walk(value, child, depth + 1)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.out:
            raise CheckpointError(self.path, f"has two tensors named {name!r}")
        if len(self.out) >= MAX_NAMES:
            raise CheckpointError(self.path, f"has more than {MAX_NAMES} tensors; refused")
        self.out[name] = tensor


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


def _candidates(obj: Mapping[str, Any]) -> list[_Candidate]:
    """The state dicts ``obj`` holds, raw weights before averages, each under the key that picks it."""
    found: list[_Candidate] = []
    # Lightning's EMAWeightAveraging moves the raw weights to current_model_state and saves the
    # average under state_dict.
    if _is_state_dict(obj.get("current_model_state")):
        found.append(_Candidate("current_model_state", obj["current_model_state"], False))
        if _is_state_dict(obj.get("state_dict")):
            found.append(_Candidate("state_dict", obj["state_dict"], True))
    found += _composer_candidates(obj)
    for key in (*STATE_DICT_KEYS, *(k for k in obj if isinstance(k, str) and k not in STATE_DICT_KEYS)):
        if _is_state_dict(obj.get(key)):
            found.append(_Candidate(key, obj[key], is_ema_name(key)))
    extra = obj.get("extra_state")  # fairseq's EMA (--ema-... options), beside the raw model
    if isinstance(extra, Mapping) and _is_state_dict(extra.get("ema")):
        found.append(_Candidate("extra_state.ema", extra["ema"], True))
    unique: dict[str, _Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.key, candidate)  # the first mention of a key says what it is
    return sorted(unique.values(), key=lambda c: c.ema)


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
    candidates = _candidates(obj)
    chosen = next((c for c in candidates if c.key == key), None) if key is not None else None
    if key is not None and chosen is None:
        return _by_dotted_key(path, obj, key), key, None
    if chosen is None and candidates:
        chosen = candidates[0]
    if chosen is None:
        keys = ", ".join(_short_repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            path,
            f"no state dict found (top-level keys: {keys}); "
            "name the key holding the weights with --state-dict-key",
        )
    tensors = _flatten(path, chosen.value)
    return tensors, chosen.key, _choice(path, chosen, candidates, tensors)


def _choice(
    path: Path, chosen: _Candidate, candidates: list[_Candidate], tensors: dict[str, torch.Tensor]
) -> ModelChoice | None:
    """The other state dicts of the same model (same names: an average, not an optimizer's state)."""
    others = {}
    for c in candidates:
        if c is not chosen and _same_model(set(_flatten(path, c.value)), set(tensors)):
            others[c.key] = f"--state-dict-key {c.key}"
    if not others and not chosen.ema:
        return None
    return ModelChoice(chosen.key, others, average=chosen.ema)


def _same_model(a: set[str], b: set[str]) -> bool:
    """Two state dicts of one model (most names shared), not a model and an optimizer or a counter."""
    return bool(a and b) and len(a & b) * 2 >= min(len(a), len(b))


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
    return TorchCheckpoint(path, state_dict_key=options.state_dict_key, trust_pickle=options.trust_pickle)


LAYOUT = Layout(
    "torch",
    "file",
    f"files ending {', '.join(s for s in CHECKPOINT_SUFFIXES if s != '.safetensors')}",
    _claims,
    _open_layout,
)
