"""A folder layout of another package: ``bundle`` folders, both of its sides declared in this one module.

A bundle folder holds ``bundle.json`` (``{"step": N}``), its weights in ``tensors/weights.safetensors``, the
config its library reads, ``bundle_config.json``, and a ``notes.txt`` that nothing reads. Reading: the
weights through the package's own safetensors reader (``open_weights_file``), the step from
``bundle.json``; ``tensors/`` is its own (``own_folders``). Writing: a folder output gives the model back in the bundle's shape, its weights in
``tensors/weights.safetensors`` and ``bundle_config.json`` beside them, the one side file it allows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ema_average.checkpoints import (
    Checkpoint,
    Layout,
    OpenOptions,
    SavedModel,
    SavedWeights,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.registry import open_weights_file

RECORD = "bundle.json"
FOLDER = "tensors"
WEIGHTS = "weights.safetensors"
CONFIG = "bundle_config.json"


class BundleCheckpoint(Checkpoint):
    """One bundle folder: its weights file, read lazily, and its step."""

    layout = "bundle"

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(path)
        self.weights = open_weights_file(path / FOLDER / WEIGHTS, options)

    def specs(self) -> dict[str, TensorSpec]:
        return self.weights.specs()

    def read(self, name: str) -> torch.Tensor:
        return self.weights.read(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.weights.read_into(name, out)

    def metadata_step(self) -> StepInfo | None:
        record = json.loads((self.path / RECORD).read_text())
        return StepInfo(int(record["step"]), f"{RECORD}:step")

    @property
    def written_by_this_tool(self) -> bool:
        return self.weights.written_by_this_tool

    @property
    def saved_model(self) -> SavedModel:
        return SavedModel(
            self.path,
            weights=(SavedWeights(WEIGHTS, folder=FOLDER, prefix=""),),
            side_files=(CONFIG,),
        )

    def close(self) -> None:
        self.weights.close()


def claims(path: Path) -> bool:
    return path.is_dir() and (path / RECORD).is_file() and (path / FOLDER / WEIGHTS).is_file()


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return BundleCheckpoint(path, options)


def own_folders(path: Path) -> list[str]:
    """``tensors/`` is part of the bundle: discovery does not search it for more checkpoints."""
    return [FOLDER]


LAYOUT = Layout(
    "bundle",
    "folder",
    "bundle folders (bundle.json, tensors/weights.safetensors)",
    claims,
    _open,
    own_folders=own_folders,
)
