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
        self._step = _find_step(obj)
        self._tensors, self._key = _find_state_dict(self.path, obj, self._state_dict_key)

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


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def _find_step(obj: Mapping[str, Any]) -> StepInfo | None:
    for key in STEP_KEYS:
        step = _as_int(obj.get(key))
        if step is not None:
            return StepInfo(step, f"metadata:{key}")
    history = obj.get("optimizer_history")  # fairseq
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        step = _as_int(history[-1].get("num_updates"))
        if step is not None:
            return StepInfo(step, "metadata:optimizer_history[-1].num_updates")
    return None


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (possibly nested) state dict under dotted names; non-tensor entries are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
    return out


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
        return _flatten(value), key
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        return dict(obj), None
    for candidate in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(candidate)):
            return _flatten(obj[candidate]), candidate
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        path,
        f"no state dict found (top-level keys: {keys}); name the key holding the weights with --state-dict-key",
    )
