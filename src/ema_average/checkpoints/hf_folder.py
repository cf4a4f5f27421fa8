"""Hugging Face Trainer ``checkpoint-N/`` folders: one weights file, or shards behind an index."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, StepInfo, TensorSpec
from ema_average.checkpoints.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.torch_file import TorchCheckpoint
from ema_average.errors import CheckpointError

# In the order transformers prefers them when several are present.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in WEIGHT_FILES)


class HfFolderCheckpoint(Checkpoint):
    """A ``save_pretrained`` folder, as the Trainer writes one per ``checkpoint-N``."""

    layout = "hf-folder"

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        weights = next(path / name for name in WEIGHT_FILES if (path / name).is_file())
        self.weights_file = weights
        files = _shard_files(weights) if weights.name.endswith(".index.json") else [weights]
        self._parts: list[Checkpoint] = [open_weights_file(f, trust_pickle=trust_pickle) for f in files]
        self._owner: dict[str, Checkpoint] = {}
        self._specs: dict[str, TensorSpec] = {}
        for part in self._parts:
            for name, spec in part.specs().items():
                if name in self._owner:
                    raise CheckpointError(
                        part.path, f"tensor {name!r} is also in {self._owner[name].path.name}"
                    )
                self._owner[name] = part
                self._specs[name] = spec
        self.lazy = all(part.lazy for part in self._parts)

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        return self._owner[name].read(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._owner[name].read_into(name, out)

    def aliases(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for part in self._parts:
            found.update(part.aliases())
        return found

    def metadata_step(self) -> StepInfo | None:
        state = self.path / "trainer_state.json"
        if state.is_file():
            try:
                step = json.loads(state.read_text()).get("global_step")
            except (OSError, ValueError) as exc:
                raise CheckpointError(state, f"is not valid JSON ({exc})") from exc
            if isinstance(step, int):
                return StepInfo(step, "trainer_state.json:global_step")
        return None

    def close(self) -> None:
        for part in self._parts:
            part.close()


def _shard_files(index: Path) -> list[Path]:
    """The shard files an index names, each checked to exist, in first-use order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(index, f"is not a valid weights index ({exc})") from exc
    files = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    for f in files:
        if not f.is_file():
            raise CheckpointError(index, f"names shard {f.name}, which does not exist")
    return files


def open_weights_file(
    path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """A single weights file, by its suffix: safetensors, else a torch file."""
    if path.suffix.lower() == ".safetensors":
        return SafetensorsCheckpoint(path)
    return TorchCheckpoint(path, state_dict_key=state_dict_key, trust_pickle=trust_pickle)
