"""A folder layout written outside the package, to show that one module and one registry line add it.

Its folders (``params/``) hold ``params.safetensors``; its trainer writes ``progress.json`` (``{"updates":
N}``) in the step folder around them. Discovery must find these folders, name their weights, and read the
step from the side file, through the hooks this module declares: it names none of the package's layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions, StepInfo, TensorSpec
from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint

WEIGHTS = "params.safetensors"
SIDE = "progress.json"


class ParamsFolder(Checkpoint):
    """A ``params/`` folder: its weights file, read as safetensors."""

    layout = "params-folder"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.file = SafetensorsCheckpoint(path / WEIGHTS)

    def specs(self) -> dict[str, TensorSpec]:
        return self.file.specs()

    def read(self, name: str) -> torch.Tensor:
        return self.file.read(name)

    def metadata_step(self) -> StepInfo | None:
        return side_step(self.path)

    def close(self) -> None:
        self.file.close()


def claims(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file()


def models(folder: Path) -> list[tuple[str, Path]]:
    return [("params", folder / WEIGHTS)] if (folder / WEIGHTS).is_file() else []


def side_step(folder: Path) -> StepInfo | None:
    side = folder / SIDE
    if not side.is_file():
        return None
    return StepInfo(int(json.loads(side.read_text())["updates"]), f"{SIDE}:updates")


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return ParamsFolder(path)


LAYOUT = Layout(
    "params-folder",
    "folder",
    "params folders (params.safetensors)",
    claims,
    _open,
    models=models,
    side_step=side_step,
)
