"""Reading folders written by ``save_pretrained`` and the trainers built on it: one model's weights, one file
or shards behind an index, the steps their names and side files carry, and the folder's own save.

Not a layout: the reading the ``hf-folder`` and ``sentence-transformers`` layouts share (a sentence-transformers
model is save_pretrained folders, one per module). Each layout declares itself in its own module.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    ModelChoice,
    OpenOptions,
    SavedModel,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import loader_files
from ema_average.checkpoints.contents.steps import checked_step, step_from_name
from ema_average.checkpoints.reading.file_checks import require_regular_file
from ema_average.checkpoints.reading.json_file import read_json
from ema_average.checkpoints.registry import open_weights_file
from ema_average.errors import CheckpointError

# Each model a folder may hold, by name, with its files in the order transformers prefers them.
WEIGHT_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "model",
        (
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ),
    ),
    (
        "diffusion_pytorch_model",
        (
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin.index.json",
            "diffusion_pytorch_model.bin",
        ),
    ),
    ("adapter_model", ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")),
    ("pytorch_lora_weights", ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")),
)
WEIGHT_FILES = tuple(name for _, files in WEIGHT_SETS for name in files)

# accelerate's save_state writes this beside the weights; with automatic naming the folder is checkpoint_K,
# K counting saves.
_ACCELERATE_STATE = re.compile(r"random_states_\d+\.pkl$")
_ACCELERATE_NAME = re.compile(r"checkpoint_(\d+)$", re.ASCII)


def weight_sets(path: Path) -> list[tuple[str, Path]]:
    """The models ``path`` holds directly: (name, the file that opens it), in order of preference."""
    found = []
    for name, files in WEIGHT_SETS:
        first = next((path / f for f in files if (path / f).is_file()), None)
        if first is not None:
            found.append((name, first))
    return found


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in WEIGHT_FILES)


class HfFolderCheckpoint(Checkpoint):
    """A ``save_pretrained`` folder, as the Trainer writes one per ``checkpoint-N``."""

    layout = "hf-folder"

    def __init__(self, path: Path, *, trust_pickle: bool = False, submodel: str | None = None) -> None:
        super().__init__(path)
        sets = weight_sets(path)
        if not sets:
            raise CheckpointError(path, f"holds none of {', '.join(WEIGHT_FILES)}")
        names = [name for name, _ in sets]
        name = submodel if submodel in names else names[0]
        weights = dict(sets)[name]
        self._open_weights(weights, trust_pickle)
        if not self._specs and submodel is None and len(sets) > 1:  # an empty model.safetensors, say
            self.close()
            name = names[1]
            self._open_weights(dict(sets)[name], trust_pickle)
        self._name = name
        if len(sets) > 1:
            others = {other: f"--submodel {other}" for other in names if other != name}
            self.choices = [ModelChoice(name, others)]
        self.lazy = all(part.lazy for part in self._parts)

    def _open_weights(self, weights: Path, trust_pickle: bool) -> None:
        if weights.name.endswith(".index.json"):
            weight_map = _weight_map(weights)
            files = list(dict.fromkeys(weight_map.values()))
        else:
            weight_map, files = None, [weights]
        self._parts: list[Checkpoint] = [
            open_weights_file(f, OpenOptions(trust_pickle=trust_pickle)) for f in files
        ]
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

    @property
    def written_by_this_tool(self) -> bool:
        """A folder output of this tool (``-o DIR``): every weights file it read carries the tool's marker."""
        return bool(self._parts) and all(part.written_by_this_tool for part in self._parts)

    @property
    def saved_model(self) -> SavedModel:
        """This folder, its model's weights named as its library loads them in safetensors
        (``pytorch_model.bin`` -> ``model.safetensors``), sharded as they were, with the configs and
        tokenizer files its library reads beside them."""
        shards = None
        if len(self._parts) > 1:
            shards = max(sum(spec.nbytes for spec in part.specs().values()) for part in self._parts)
        weights_name = f"{self._name}.safetensors"
        return SavedModel(self.path, weights_name, shards, side_files=loader_files(weights_name))

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
        return side_file_step(self.path)

    def name_step(self) -> StepInfo | None:
        return folder_name_step(self.path)

    def close(self) -> None:
        for part in self._parts:
            part.close()


def folder_name_step(path: Path) -> StepInfo | None:
    """The step a folder's name carries; accelerate's ``checkpoints/checkpoint_K`` counts saves, not
    steps, and is flagged as a counter."""
    return save_count(path) or step_from_name(path)


def save_count(path: Path) -> StepInfo | None:
    """accelerate's automatic ``checkpoint_K``, K counting saves (a counter); None for any other name."""
    info = step_from_name(path)
    if info is not None and is_accelerate_counter(path):
        return StepInfo(info.step, "filename:checkpoint_K (accelerate save count)", counter=True)
    return None


def is_accelerate_counter(path: Path) -> bool:
    """An accelerate ``save_state`` folder named by its automatic naming (``checkpoint_K``)."""
    return bool(_ACCELERATE_NAME.search(path.name)) and any(
        _ACCELERATE_STATE.search(p.name) for p in path.glob("random_states_*.pkl")
    )


def side_file_step(folder: Path) -> StepInfo | None:
    """A step from the JSON a trainer writes beside the weights: the HF Trainer's ``trainer_state.json``
    (``global_step``), or a diffusers ``EMAModel`` saved with ``save_pretrained`` (``config.json``
    ``optimization_step``)."""
    for file, key in _SIDE_STEPS:
        side = folder / file
        if not side.is_file():
            continue
        step = _side_value(read_json(side), key)
        if step is not None:
            where = f"{file}:{key}"
            return StepInfo(checked_step(side, step, where), where)
    return None


def side_file_problem(folder: Path) -> str | None:
    """Why a ``trainer_state.json`` in ``folder`` gave no step (it is not an object, or has no
    ``global_step``), for the plan to say where the step came from instead; None if it did or is absent.
    (A ``config.json`` without ``optimization_step`` is every model's config: nothing to say.)"""
    file, key = _SIDE_STEPS[0]
    side = folder / file
    if not side.is_file():
        return None
    record = read_json(side)
    if not isinstance(record, dict):
        return f"{file} is not a JSON object (it is {_json_kind(record)}), so its {key} was not read"
    if key not in record:
        return f"{file} has no {key}, so no step was read from it"
    if _side_value(record, key) is None:
        return f"{file}'s {key} is {_json_kind(record[key])}, not a step, so it was not read"
    return None


# The JSON files a trainer writes beside the weights, and the key holding the step, in order of trust.
_SIDE_STEPS = (("trainer_state.json", "global_step"), ("config.json", "optimization_step"))


def _side_value(record: object, key: str) -> int | str | None:
    """``record[key]`` where ``record`` is a JSON object and the value may be a step (an int or a string)."""
    step = record.get(key) if isinstance(record, dict) else None
    return step if isinstance(step, int | str) and not isinstance(step, bool) else None


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), "an object")


def _weight_map(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from an index whose every path is checked to stay inside its folder.

    An index is untrusted input: a ``../`` or absolute shard path would average in a file from anywhere.
    """
    record = read_json(index)
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


_FULL_MODEL = "model"  # transformers' whole-model weights (model.safetensors, pytorch_model.bin)


def own_model(folder: Path, names: set[str]) -> SavedModel | None:
    """The step folder as transformers saved it, where the weights read from another layout inside it
    (``names``: the HF Trainer's DeepSpeed tag, read because under ZeRO-3 the Trainer's ``model.safetensors``
    holds only placeholders, or by ``--submodel fp32``) are that model: its ``model.*`` weights hold no
    tensors or only names read. Otherwise None (a bare ``model.safetensors``): a config beside weights it
    does not describe would load with some weights silently left at random."""
    if _FULL_MODEL not in dict(weight_sets(folder)):
        return None
    own = HfFolderCheckpoint(folder, submodel=_FULL_MODEL)
    try:
        held = set(own.specs()) | set(own.aliases())
        saved = own.saved_model
    finally:
        own.close()
    if held and not held <= names:
        return None
    return saved if held else replace(saved, shard_bytes=None)  # placeholders: no shard size
