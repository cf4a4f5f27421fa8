"""What a folder layout may tell discovery beyond claiming and opening: the hooks of :class:`FolderLayout`.

A step of a run is often a folder around other layouts' checkpoints (the HF Trainer's ``checkpoint-N/``
around a DeepSpeed ``global_stepN/``, a diffusers ``checkpoint-N/`` around ``unet/`` and ``unet_ema/``).
Discovery and step folders know the layouts only through the registry (``layouts.LAYOUTS``) and ask these
hooks of whichever layouts have them, so a new folder layout is still one module and one registry line.
Every hook is optional; a plain :class:`~ema_average.checkpoints.base.Layout` has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ema_average.checkpoints.base import Layout, SavedModel, StepInfo

Models = Callable[[Path], list[tuple[str, Path]]]
SideStep = Callable[[Path], StepInfo | None]
SideStepProblem = Callable[[Path], str | None]
OwnModel = Callable[[Path, set[str]], SavedModel | None]
OwnFolders = Callable[[Path], list[str]]
SideFolder = Callable[[Path], str | None]


@dataclass(frozen=True)
class FolderLayout(Layout):
    """A folder layout and its hooks (each may be None):

    - ``models(folder)``: the models ``folder`` holds directly, as (name, the file that opens it), preferred
      first: how a step folder's own weights are named for ``--submodel`` and listed in notices;
    - ``side_step(folder)``: a step from the files a trainer writes beside the weights (any step folder
      is asked, not only the ones this layout claims);
    - ``side_step_problem(folder)``: why such a file gave no step, for the plan;
    - ``name_step(folder)``: the step a folder's name carries where the layout knows its naming (a count of
      saves rather than steps); discovery falls back to the name patterns of ``steps.py``;
    - ``own_model(folder, names)``: the folder's own save as its library loads it, where the weights read
      from another layout inside it (tensor ``names``) are that model: what a folder output copies;
    - ``own_folders(folder)``: the sub-folders that are part of the checkpoint (a sentence-transformers
      model's module folders): discovery does not search them for more models;
    - ``side_folder(folder)``: why a folder this layout claims, found beside other models in a step
      folder, is a trainer's side folder and not a model (optimizer state only), or None: discovery
      skips it with a notice, where another model remains.
    """

    models: Models | None = None
    side_step: SideStep | None = None
    side_step_problem: SideStepProblem | None = None
    name_step: SideStep | None = None
    own_model: OwnModel | None = None
    own_folders: OwnFolders | None = None
    side_folder: SideFolder | None = None
