"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

Read without a process group, one tensor per ``load`` call (DCP reads only the chunks it is asked for).
A DCP save of ``{"model": ..., "optimizer": ...}`` flattens names to ``model.x``; as for torch files,
the model's part is picked by its key and the key is dropped from the names.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import Checkpoint, StepInfo, TensorSpec
from ema_average.checkpoints.torch_file import STATE_DICT_KEYS, STEP_KEYS
from ema_average.errors import CheckpointError


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))


class DcpCheckpoint(Checkpoint):
    layout = "dcp"

    def __init__(self, path: Path, *, state_dict_key: str | None = None) -> None:
        super().__init__(path)
        try:
            import torch.distributed.checkpoint as dcp
        except ImportError as exc:  # torch built without distributed support
            raise CheckpointError(path, "is a DCP folder, but this torch has no torch.distributed") from exc
        self._dcp = dcp
        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # DCP raises many kinds for a damaged folder
            raise CheckpointError(path, f"has an unreadable .metadata ({exc})") from exc
        tensors = {
            fqn: TensorSpec(tuple(item.size), item.properties.dtype)
            for fqn, item in metadata.state_dict_metadata.items()
            if isinstance(item, dcp.metadata.TensorStorageMetadata)
        }
        self._step_fqn = next(
            (k for k in STEP_KEYS if k in tensors and tensors[k].numel == 1 and not tensors[k].is_floating),
            None,
        )
        self._step_spec = tensors.get(self._step_fqn) if self._step_fqn else None
        self._prefix = _model_prefix(path, tensors, state_dict_key)
        self._specs = {
            fqn[len(self._prefix) :]: spec
            for fqn, spec in tensors.items()
            if fqn.startswith(self._prefix) and (self._prefix or fqn not in STEP_KEYS)
        }

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def _load(self, fqn: str, out: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # "no process group: loading as a single process" is expected
            warnings.simplefilter("ignore")
            self._dcp.load({fqn: out}, storage_reader=self._dcp.FileSystemReader(str(self.path)))
        return out

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self._load(self._prefix + name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._load(self._prefix + name, out)

    def metadata_step(self) -> StepInfo | None:
        if self._step_fqn is None or self._step_spec is None:
            return None
        spec = self._step_spec
        value = self._load(self._step_fqn, torch.zeros(spec.shape, dtype=spec.dtype)).item()
        return StepInfo(int(value), f"metadata:{self._step_fqn}")


def _model_prefix(path: Path, tensors: dict[str, Any], key: str | None) -> str:
    if key is not None:
        if not any(fqn.startswith(key + ".") for fqn in tensors):
            raise CheckpointError(path, f"has no tensors under --state-dict-key {key!r}")
        return key + "."
    for candidate in STATE_DICT_KEYS:
        if any(fqn.startswith(candidate + ".") for fqn in tensors):
            return candidate + "."
    return ""
