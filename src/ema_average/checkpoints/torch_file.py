"""torch files (``.pt .pth .bin .ckpt .th``): a bare state dict, or a dict holding one, with a step.

Covers plain ``torch.save(model.state_dict())``, Lightning ``.ckpt`` (``state_dict``, ``global_step``),
fairseq (``model``, ``optimizer_history[-1]["num_updates"]``), and the usual trainer dicts
(``model``, ``module``, ``model_state_dict``, ``ema``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import Checkpoint, StepInfo, TensorSpec
from ema_average.checkpoints.safe_unpickle import load_torch_file
from ema_average.checkpoints.safetensors_file import DTYPE_NAMES
from ema_average.checkpoints.steps import checked_step
from ema_average.errors import CheckpointError

# Where trainers put the model's weights, most common first.
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "module",
    "model_state_dict",
    "model_state",
    "ema",
    "model_ema",
    "ema_state_dict",
    "net",
    "network",
    "params",
    "weights",
)
STEP_KEYS = ("global_step", "step", "num_updates", "iteration", "iter", "steps", "train_step")

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
        self._tensors, self._key = _find_state_dict(self.path, obj, self._state_dict_key)
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
        """Tied weights: names whose tensor is the same view of the same storage as an earlier name's."""
        first: dict[tuple[Any, ...], str] = {}
        found: dict[str, str] = {}
        for name, t in self._state().items():
            if t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in first:
                found[name] = first[key]
            else:
                first[key] = name
        return found

    def close(self) -> None:
        self._tensors = None


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
    return None


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


def _find_state_dict(
    path: Path, obj: Mapping[str, Any], key: str | None
) -> tuple[dict[str, torch.Tensor], str | None]:
    if key is not None:
        value: Any = obj
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise CheckpointError(path, f"has no state dict under --state-dict-key {key!r}")
            value = value[part]
        if not _is_state_dict(value):
            raise CheckpointError(path, f"the value under --state-dict-key {key!r} holds no tensors")
        return _flatten(path, value), key
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        return _flatten(path, obj), None
    for candidate in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(candidate)):
            return _flatten(path, obj[candidate]), candidate
    keys = ", ".join(_short_repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        path,
        f"no state dict found (top-level keys: {keys}); name the key holding the weights with --state-dict-key",
    )
