"""What every checkpoint layout offers the pipeline: its step and lazy, one-tensor-at-a-time access.

The interface only (``Checkpoint``, ``Layout``, ``OpenOptions``, ``SavedModel``, ``ModelChoice``); how a
file is read (positioned reads, the checks before opening) is in ``reading/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ema_average.checkpoints.contents.parts import ModelChoice
from ema_average.checkpoints.contents.steps import StepInfo, step_from_name
from ema_average.checkpoints.safetensors_format import TensorSpec


@dataclass(frozen=True)
class OpenOptions:
    """How the user asked units to be read; every layout's ``open`` takes these, using what applies."""

    state_dict_key: str | None = None  # the key of a torch file's dict holding the weights (dotted)
    trust_pickle: bool = False  # full unpickling, unsafe: only on the user's word
    submodel: str | None = None  # which model of a unit holding several (a folder, a weight file, "fp32")


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout as discovery sees it: what it claims, how it opens, how it is described, and
    the optional hooks a folder layout answers (each None where the layout has nothing to say).

    ``unit`` says whether it claims files or folders; ``claims`` is cheap (names and stats only, never
    unpickling); ``looked_for`` completes "no checkpoints found; looked for ...". ``open`` gives the reading
    side; the writing side, how a folder output gives the model back in the layout's shape (weights files,
    sub-folders, prefixes, the side files it may copy), is the checkpoint's ``saved_model``, a
    :class:`SavedModel` the layout fills.

    A step of a run is often a folder around other layouts' checkpoints (the HF Trainer's ``checkpoint-N/``
    around a DeepSpeed ``global_stepN/``, a diffusers ``checkpoint-N/`` around ``unet/`` and ``unet_ema/``).
    Discovery knows layouts only through the registry and asks these hooks of whichever layouts have them:

    - ``models(folder)``: the models ``folder`` holds directly, as (name, the file that opens it), preferred
      first: how a step folder's own weights are named for ``--submodel`` and listed in notices;
    - ``side_step(folder)``: a step from the files a trainer writes beside the weights (any step folder
      is asked, not only the ones this layout claims);
    - ``side_step_problem(folder)``: why such a file gave no step, for the plan;
    - ``name_step(folder)``: the step a folder's name carries where the layout knows its naming (a count of
      saves rather than steps); discovery falls back to the name patterns of ``contents/steps.py``;
    - ``own_model(folder, names)``: the folder's own save as its library loads it, where the weights read
      from another layout inside it (tensor ``names``) are that model: what a folder output copies;
    - ``own_folders(folder)``: the sub-folders that are part of the checkpoint (a sentence-transformers
      model's module folders): discovery does not search them for more models;
    - ``side_folder(folder)``: why a folder this layout claims, found beside other models in a step
      folder, is a trainer's side folder and not a model (optimizer state only), or None: discovery
      skips it with a notice, where another model remains.

    ``before`` names the layout this one must be asked before, for one another package declares through
    the ``ema_average.layouts`` entry points (``register(layout, before=...)`` in process).
    """

    name: str
    unit: Literal["file", "folder"]
    looked_for: str
    claims: Callable[[Path], bool]
    open: Callable[[Path, OpenOptions], Checkpoint]
    models: Callable[[Path], list[tuple[str, Path]]] | None = None
    side_step: Callable[[Path], StepInfo | None] | None = None
    side_step_problem: Callable[[Path], str | None] | None = None
    name_step: Callable[[Path], StepInfo | None] | None = None
    own_model: Callable[[Path, set[str]], SavedModel | None] | None = None
    own_folders: Callable[[Path], list[str]] | None = None
    side_folder: Callable[[Path], str | None] | None = None
    before: str | None = None


@dataclass(frozen=True)
class SavedWeights:
    """One weights file of a model as its library saves it, where a folder output writes it back: its name,
    the sub-folder it lies in (``""``: the top), the prefix its tensors carry in the checkpoint read (stored
    in the file without it: a sentence-transformers module's ``2_Dense/linear.weight`` is
    ``2_Dense/model.safetensors``'s ``linear.weight``), its largest shard's bytes where it was sharded, and
    whether its library reads shards behind an index at all (``--max-shard-size`` splits only those). A
    ``.safetensors`` name is written in safetensors; any other name as one ``torch.save`` of the plain
    state dict (litgpt's ``lit_model.pth``)."""

    name: str
    folder: str = ""
    prefix: str = ""
    shard_bytes: int | None = None
    shardable: bool = True


@dataclass(frozen=True)
class SavedModel:
    """How the model read is saved, so that a folder output (``-o DIR``) gives it back in the shape its
    library loads: a layout's writing side, declared as data (the output code names no layout).

    - ``folder``: the model's folder, where its side files are found;
    - ``weights_name`` / ``shard_bytes``: its one weights file (sharded behind an index when the input was),
      or ``weights``: several weights files instead, each routed by the prefix of the tensors it holds;
    - ``folders``: sub-folders the output has even when empty (a module with neither weights nor config);
    - ``side_files``: the only files copied beside the weights, as names in the output (``config.json``,
      ``2_Dense/config.json``), each from ``folder / name`` where it is there, else from ``fallback /
      name`` (litgpt's ``final/``); every one of them may be in an earlier output that ``--overwrite``
      replaces. None of them is ever parsed: they are copied as bytes, checked to be small regular files;
    - ``unit``: the folder every side file must lie in (a link leading out of it is refused); None: the
      checkpoint read (its folder).
    """

    folder: Path
    weights_name: str = "model.safetensors"
    shard_bytes: int | None = None
    weights: tuple[SavedWeights, ...] = ()
    folders: tuple[str, ...] = ()
    side_files: tuple[str, ...] = ()
    fallback: Path | None = None
    unit: Path | None = None


class Checkpoint(ABC):
    """One saved state of a training run: a file, or a folder of files (HF, DCP).

    ``step`` and ``step_origin`` are filled in by discovery; ``metadata_step()`` is what the file itself
    says. Tensors are read one at a time with :meth:`read`, never all at once.
    """

    # Class defaults, set again per instance where only the opened file tells (a torch file that is
    # Lightning's, a legacy file loaded whole) or a wrapper takes its inner checkpoint's.
    layout: str = "?"
    lazy: bool = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step: int | None = None
        self.step_origin = ""
        self.step_is_counter = False  # the step counts saves or epochs (see StepInfo.counter)
        self.final_copy: str | None = None  # why it is a final copy of the weights, not a step of the run
        self.notes: list[str] = []
        self.choices: list[ModelChoice] = []  # outermost first, where a unit holds several models
        # How a folder output gives this checkpoint's model back, where the layout that opened it reads its
        # files through another's reader (litgpt's torch files) and says so here; see ``saved_model``.
        self.saved_as: SavedModel | None = None

    @property
    def model(self) -> str:
        """Which model of the unit was read (``unet/diffusion_pytorch_model``, ``state_dict``), or ``""``."""
        return "/".join(choice.read for choice in self.choices)

    @property
    def other_models(self) -> dict[str, str]:
        """The unit's other models, each with the flag that reads it instead."""
        return {name: flag for choice in self.choices for name, flag in choice.others.items()}

    @property
    def saved_model(self) -> SavedModel | None:
        """How the model read is saved, for a folder output to give it back in that shape (its layout's
        own, see :class:`SavedModel`); None where it has no shape of its own (a plain torch file, DCP,
        DeepSpeed): the output is then a bare ``model.safetensors``. Layouts whose class knows it override
        this; by default it is what the layout that opened the checkpoint set as ``saved_as``."""
        return self.saved_as

    @property
    def written_by_this_tool(self) -> bool:
        """An output of this tool (its marker found in the unit's own files): never read as an input.
        Discovery also takes any unit in a folder holding the tool's ``ema_average.json`` mark as one."""
        return False

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor of the model state by name, in saved order."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU; reading it does not load the rest of the file."""

    def metadata_step(self) -> StepInfo | None:
        """The step recorded inside the checkpoint, if any."""
        return None

    def name_step(self) -> StepInfo | None:
        """The step its file or folder name carries; layouts that know a name is a counter say so."""
        return step_from_name(self.path)

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

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of ``name`` (flattened) into ``out`` (1-d, contiguous,
        of the tensor's dtype), for streaming tensors larger than a chunk.

        Layouts that can read a byte range (files read with ``pread``, mapped files) override this; the
        default reads the whole tensor and copies the slice.
        """
        out.copy_(self.read(name).reshape(-1)[start : start + out.numel()])
        return out

    def close(self) -> None:  # noqa: B027 - optional: most layouts hold nothing open
        """Release open files and mappings; reads after this reopen them."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, step={self.step})"
