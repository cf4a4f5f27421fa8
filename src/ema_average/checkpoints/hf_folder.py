"""Hugging Face Trainer ``checkpoint-N/`` folders: one weights file, or shards behind an index."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, StepInfo, TensorSpec, require_regular_file
from ema_average.checkpoints.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.steps import checked_step
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
        if weights.name.endswith(".index.json"):
            weight_map = _weight_map(weights)
            files = list(dict.fromkeys(weight_map.values()))
        else:
            weight_map, files = None, [weights]
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
        if weight_map is not None:
            _check_shards_match(weights, weight_map, self._owner)
        self.lazy = all(part.lazy for part in self._parts)

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        return self._owner[name].read(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._owner[name].read_into(name, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self._owner[name].read_range_into(name, start, out)

    def aliases(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for part in self._parts:
            found.update(part.aliases())
        return found

    def metadata_step(self) -> StepInfo | None:
        state = self.path / "trainer_state.json"
        if state.is_file():
            record = _read_json(state)
            step = record.get("global_step") if isinstance(record, dict) else None
            if isinstance(step, int | str) and not isinstance(step, bool):
                where = "trainer_state.json:global_step"
                return StepInfo(checked_step(state, step, where), where)
        return None

    def close(self) -> None:
        for part in self._parts:
            part.close()


def _read_json(path: Path) -> object:
    """A side file's JSON, read safely (JSON runs no code); any failure is one error naming the file."""
    try:
        require_regular_file(path)
        return json.loads(path.read_bytes())
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"is not valid JSON ({str(exc)[:80]})") from None


def _weight_map(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from an index whose every path is checked to stay inside its folder.

    An index is untrusted input: a ``../`` or absolute shard path would average in a file from anywhere.
    """
    record = _read_json(index)
    weight_map = record.get("weight_map") if isinstance(record, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "is not a valid weights index: no 'weight_map' object of tensor -> file")
    folder = index.parent.resolve()
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(index, f"maps tensor {name!r} to {file!r}, not a file name")
        path = (index.parent / file).resolve()
        if not path.is_relative_to(folder) or path == folder:
            raise CheckpointError(index, f"names shard {file!r}, which is outside its folder; refused")
        if not path.exists():
            raise CheckpointError(index, f"names shard {file}, which does not exist")
        require_regular_file(path)
        shards[name] = path
    return shards


def _check_shards_match(index: Path, weight_map: dict[str, Path], owner: dict[str, Checkpoint]) -> None:
    """Each shard must hold exactly the tensors the index assigns to it."""
    for name, shard in weight_map.items():
        held = owner.get(name)
        if held is None or held.path != shard:
            raise CheckpointError(index, f"lists tensor {name!r} in {shard.name}, which does not hold it")
    extra = next((name for name in owner if name not in weight_map), None)
    if extra is not None:
        raise CheckpointError(owner[extra].path, f"holds tensor {extra!r}, which {index.name} does not list")


def open_weights_file(
    path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """A single weights file, by its suffix: safetensors, else a torch file."""
    if path.suffix.lower() == ".safetensors":
        return SafetensorsCheckpoint(path)
    return TorchCheckpoint(path, state_dict_key=state_dict_key, trust_pickle=trust_pickle)
