"""The one registry of checkpoint layouts: discovery asks :func:`layouts`, in this order, and nothing else.

Three sources, one list: the built-in layouts (named below, loaded by module path, so the registry imports
none of them and a layout may open its leaf files through :func:`open_weights_file`), the layouts other
installed packages declare under the entry-point group ``ema_average.layouts`` (``name = "module:LAYOUT"``),
and those registered in process with :func:`register`. Folder layouts come first (a folder one claims is
one checkpoint: its files are its own, its sub-folders too where its ``own_folders`` names them; others are
searched for more), then file layouts; ``before=`` puts a layout ahead of a named
one (a third-party folder layout whose folders also hold a ``model.safetensors`` goes before ``hf-folder``).
A layout declared by a package without ``before`` sits after the built-ins of its unit.

A folder layout whose folders sit around other checkpoints answers the optional hooks of
:class:`~ema_average.checkpoints.base.Layout`; discovery asks those through the functions here, never a
layout's classes by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ema_average import plugins
from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions, SavedModel, StepInfo
from ema_average.checkpoints.contents.steps import step_from_name
from ema_average.errors import PluginError

ENTRY_POINT_GROUP = "ema_average.layouts"  # where other packages declare their layouts

T = TypeVar("T")

_PACKAGE = "ema_average.checkpoints.layouts"
BUILT_IN = (  # discovery's order; module names under checkpoints/layouts/, each with a LAYOUT
    "dcp_folder",
    "deepspeed_folder",
    "sentence_transformers_folder",  # before hf_folder: its top folder holds a model.safetensors too
    "hf_folder",
    "safetensors_file",
    "litgpt",  # before torch_file: its lit_model.pth is a torch file that litgpt loads under that name
    "torch_file",
)

_registered: list[tuple[Layout, str | None]] = []  # in-process registrations and where they go
_cache: tuple[Layout, ...] | None = None


def layouts() -> tuple[Layout, ...]:
    """Every layout discovery knows, in the order it asks them (built once, again after a registration)."""
    global _cache
    if _cache is None:
        found = [_built_in(name) for name in BUILT_IN]
        for layout, before in [*_declared(), *_registered]:
            _insert(found, layout, before)
        _cache = tuple(found)
    return _cache


def register(layout: Layout, *, before: str | None = None) -> None:
    """Add ``layout`` (a package's own, or a test's): after the layouts of its unit, or just before the
    layout named ``before``. Discovery finds it from now on."""
    global _cache
    if before is not None and before not in {known.name for known in layouts()}:
        raise PluginError(
            f"cannot register layout {layout.name!r} before {before!r}: no layout has that name"
        )
    _registered.append((layout, before))
    _cache = None


def unregister(layout: Layout) -> None:
    """Take back an in-process registration (a test's, at its end)."""
    global _cache
    _registered[:] = [(known, before) for known, before in _registered if known is not layout]
    _cache = None


def _built_in(name: str) -> Layout:
    layout: Layout = importlib.import_module(f"{_PACKAGE}.{name}").LAYOUT
    return layout


def _declared() -> Iterator[tuple[Layout, str | None]]:
    """The layouts installed packages declare, each checked to be a ``Layout``, with its ``before``."""
    for entry in plugins.declared(ENTRY_POINT_GROUP):
        loaded = plugins.load(entry, f"the layout {entry.name!r}")
        if not isinstance(loaded, Layout):
            raise PluginError(f"the layout {entry.name!r} declared as {entry.value!r} is not a Layout")
        yield loaded, loaded.before


def _insert(found: list[Layout], layout: Layout, before: str | None) -> None:
    """Put ``layout`` before the one named ``before``, else after the last layout of its unit (folders
    before files, so a folder layout still comes ahead of every file layout)."""
    names = [known.name for known in found]
    if layout.name in names:
        raise PluginError(f"a checkpoint layout named {layout.name!r} is already registered")
    if before is not None and before in names:
        found.insert(names.index(before), layout)
        return
    same_unit = [i for i, known in enumerate(found) if known.unit == layout.unit]
    found.insert(same_unit[-1] + 1 if same_unit else len(found), layout)


def _hooks(hook: Callable[[Layout], T | None]) -> list[T]:
    """The hook ``hook`` picks (a declared field of ``Layout``) of every layout that answers it, in
    registry order."""
    found = (hook(layout) for layout in layouts())
    return [answer for answer in found if answer is not None]


def models_in(folder: Path) -> list[tuple[str, Path]]:
    """The models ``folder`` holds directly (name, the file that opens it), by the first layout that sees any."""
    return next((found for hook in _hooks(lambda layout: layout.models) if (found := hook(folder))), [])


def side_step(folder: Path) -> StepInfo | None:
    """A step from the files a trainer wrote beside the weights in ``folder`` (``trainer_state.json``)."""
    hooks = _hooks(lambda layout: layout.side_step)
    return next((info for hook in hooks if (info := hook(folder)) is not None), None)


def side_step_problem(folder: Path) -> str | None:
    """Why a trainer's side file in ``folder`` gave no step, for the plan; None if none did."""
    return next(
        (text for hook in _hooks(lambda layout: layout.side_step_problem) if (text := hook(folder))), None
    )


def name_step(folder: Path) -> StepInfo | None:
    """The step a step folder's name carries: as a layout reads its own naming (a count of saves), else by
    the name patterns every checkpoint's name is read with."""
    hooks = _hooks(lambda layout: layout.name_step)
    info = next((info for hook in hooks if (info := hook(folder)) is not None), None)
    return info if info is not None else step_from_name(folder)


def own_model(folder: Path, names: set[str]) -> SavedModel | None:
    """``folder``'s own save as its library loads it, where the weights read inside it (``names``) are that
    model (the HF Trainer's ``checkpoint-N/`` around the DeepSpeed tag read); None otherwise."""
    hooks = _hooks(lambda layout: layout.own_model)
    return next((saved for hook in hooks if (saved := hook(folder, names)) is not None), None)


def own_folders(layout: Layout, folder: Path) -> list[str]:
    """The sub-folders of ``folder`` that are part of the checkpoint ``layout`` claimed there (a
    sentence-transformers model's module folders): discovery does not search them for more models."""
    return layout.own_folders(folder) if layout.own_folders is not None else []


def side_folder(folder: Path) -> str | None:
    """Why ``folder``, a model found beside others in a step folder, is a trainer's side folder (optimizer
    state only) rather than a model, as the layout that claims it says; None where it is a model."""
    layout = layout_of(folder, "folder") if folder.is_dir() else None
    if layout is None or layout.side_folder is None:
        return None
    return layout.side_folder(folder)


def layout_of(path: Path, unit: str) -> Layout | None:
    """The first layout of that kind (``"file"`` or ``"folder"``) that claims ``path``."""
    return next((layout for layout in layouts() if layout.unit == unit and layout.claims(path)), None)


def looked_for() -> str:
    """What discovery looks for, for the "no checkpoints found" message: files first, then folders."""
    ordered = sorted(layouts(), key=lambda layout: layout.unit != "file")
    return "; ".join(layout.looked_for for layout in ordered)


def open_leaf(path: Path, options: OpenOptions) -> Checkpoint:
    """Open a file or folder that a layout claims."""
    layout = layout_of(path, "folder" if path.is_dir() else "file")
    if layout is None:
        raise ValueError(f"no layout claims {path}")  # discovery only opens what a layout claimed
    return layout.open(path, options)


def open_weights_file(path: Path, options: OpenOptions) -> Checkpoint:
    """A single weights file, by its name: safetensors, else a torch file (whatever its suffix). Folder
    layouts open the files they hold through this, never through another layout's module."""
    name = "safetensors_file" if path.name.lower().endswith(".safetensors") else "torch_file"
    return _built_in(name).open(path, options)
