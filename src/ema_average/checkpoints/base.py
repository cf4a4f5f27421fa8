"""What every checkpoint layout offers the pipeline: its step and lazy, one-tensor-at-a-time access."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one saved tensor, known without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class StepInfo:
    """A training step and where it was found, e.g. ``(1200, "metadata:global_step")``."""

    step: int
    source: str


class Checkpoint(ABC):
    """One saved state of a training run: a file, or a folder of files (HF, DCP).

    ``step`` and ``step_source`` are filled in by discovery; ``metadata_step()`` is what the file itself
    says. Tensors are read one at a time with :meth:`read`, never all at once.
    """

    layout: ClassVar[str] = "?"
    lazy: ClassVar[bool] = True
    # True where read() returns views of a file mapping: the pipeline then skips its staging copy and
    # closes the checkpoint after each pass so the touched pages are unmapped.
    zero_copy: bool = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step: int | None = None
        self.step_source = ""
        self.notes: list[str] = []

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor of the model state by name, in saved order."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU; reading it does not load the rest of the file."""

    def metadata_step(self) -> StepInfo | None:
        """The step recorded inside the checkpoint, if any."""
        return None

    def aliases(self) -> dict[str, str]:
        """Names that share storage with an earlier name (tied weights): alias -> first name."""
        return {}

    def tensor_names(self) -> list[str]:
        return list(self.specs())

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into ``out`` (a contiguous CPU tensor of its size and dtype) and return it.

        Layouts that can read bytes straight into a reused buffer override this; the default copies.
        """
        out.copy_(self.read(name))
        return out

    def close(self) -> None:  # noqa: B027 - optional: most layouts hold nothing open
        """Release open files and mappings; reads after this reopen them."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, step={self.step})"
