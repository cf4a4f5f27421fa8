"""The one registry of checkpoint layouts: discovery loops over ``LAYOUTS``, in this order.

Adding a layout: write its module with a ``LAYOUT = Layout(...)`` (what it claims, how it opens, how it is
described), list it here (or, from outside the package, pass it to :func:`register`), and add its row to
docs/layouts.md's table. Folder layouts come first (a folder they claim is one checkpoint and is not searched
further), then file layouts. A folder layout whose folders sit around other checkpoints (a step folder holding
several models, a trainer's side files) declares a ``FolderLayout`` with hooks; discovery and step folders
ask those through the functions here, never a layout's classes by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ema_average.checkpoints import (
    dcp_folder,
    deepspeed_folder,
    hf_folder,
    litgpt_lora,
    safetensors_file,
    sentence_transformers_folder,
    torch_file,
)
from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions, SavedModel, StepInfo
from ema_average.checkpoints.steps import step_from_name

LAYOUTS: tuple[Layout, ...] = (
    dcp_folder.LAYOUT,
    deepspeed_folder.LAYOUT,
    sentence_transformers_folder.LAYOUT,  # before hf_folder: its top folder holds a model.safetensors too
    hf_folder.LAYOUT,
    safetensors_file.LAYOUT,
    torch_file.LAYOUT,
    litgpt_lora.LAYOUT,
)


def register(layout: Layout) -> None:
    """Add a layout after those registered (a package's own, or a test's): discovery finds it from now on."""
    global LAYOUTS
    LAYOUTS = (*LAYOUTS, layout)


def _hooks(name: str) -> list[Callable[..., Any]]:
    """The hook ``name`` of every registered layout that has it (see ``FolderLayout``), in registry order."""
    found = (getattr(layout, name, None) for layout in LAYOUTS)
    return [hook for hook in found if hook is not None]


def models_in(folder: Path) -> list[tuple[str, Path]]:
    """The models ``folder`` holds directly (name, the file that opens it), by the first layout that sees any."""
    return next((found for hook in _hooks("models") if (found := hook(folder))), [])


def side_step(folder: Path) -> StepInfo | None:
    """A step from the files a trainer wrote beside the weights in ``folder`` (``trainer_state.json``)."""
    return next((info for hook in _hooks("side_step") if (info := hook(folder)) is not None), None)


def side_step_problem(folder: Path) -> str | None:
    """Why a trainer's side file in ``folder`` gave no step, for the plan; None if none did."""
    return next((text for hook in _hooks("side_step_problem") if (text := hook(folder))), None)


def name_step(folder: Path) -> StepInfo | None:
    """The step a step folder's name carries: as a layout reads its own naming (a count of saves), else by
    the name patterns every checkpoint's name is read with."""
    info = next((info for hook in _hooks("name_step") if (info := hook(folder)) is not None), None)
    return info if info is not None else step_from_name(folder)


def own_model(folder: Path, names: set[str]) -> SavedModel | None:
    """``folder``'s own save as its library loads it, where the weights read inside it (``names``) are that
    model (the HF Trainer's ``checkpoint-N/`` around the DeepSpeed tag read); None otherwise."""
    return next((saved for hook in _hooks("own_model") if (saved := hook(folder, names)) is not None), None)


def own_folders(layout: Layout, folder: Path) -> list[str]:
    """The sub-folders of ``folder`` that are part of the checkpoint ``layout`` claimed there (a
    sentence-transformers model's module folders): discovery does not search them for more models."""
    hook = getattr(layout, "own_folders", None)
    return hook(folder) if hook is not None else []


def side_folder(folder: Path) -> str | None:
    """Why ``folder``, a model found beside others in a step folder, is a trainer's side folder (optimizer
    state only) rather than a model, as the layout that claims it says; None where it is a model."""
    layout = layout_of(folder, "folder") if folder.is_dir() else None
    hook = getattr(layout, "side_folder", None)
    return hook(folder) if hook is not None else None


def layout_of(path: Path, unit: str) -> Layout | None:
    """The first layout of that kind (``"file"`` or ``"folder"``) that claims ``path``."""
    return next((layout for layout in LAYOUTS if layout.unit == unit and layout.claims(path)), None)


def looked_for() -> str:
    """What discovery looks for, for the "no checkpoints found" message: files first, then folders."""
    ordered = sorted(LAYOUTS, key=lambda layout: layout.unit != "file")
    return "; ".join(layout.looked_for for layout in ordered)


def open_leaf(path: Path, options: OpenOptions) -> Checkpoint:
    """Open a file or folder that a layout claims."""
    layout = layout_of(path, "folder" if path.is_dir() else "file")
    if layout is None:
        raise ValueError(f"no layout claims {path}")  # discovery only opens what a layout claimed
    return layout.open(path, options)


def open_weights_file(
    path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """A single weights file, by its name: safetensors, else a torch file (whatever its suffix)."""
    options = OpenOptions(state_dict_key=state_dict_key, trust_pickle=trust_pickle)
    if path.name.lower().endswith(".safetensors"):
        return safetensors_file.LAYOUT.open(path, options)
    return torch_file.LAYOUT.open(path, options)
