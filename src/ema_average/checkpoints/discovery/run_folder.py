"""A run's units as found on disk: the models that layouts claim in a folder tree, each grouped under the
step it belongs to, and final models beside the steps set apart. Split from discover.py, which opens, steps
and checks them.

A model belongs to the step-named folder it sits in (``checkpoint-500/unet``, ``step_100/model.pt``), looked
up past rank and parallel sub-folders (Megatron's ``iter_0000100/mp_rank_00/model_optim_rng.pt``,
``rank_0/``, ``tp_rank_1/``, ``pp_rank_0/``): one checkpoint is the step folder, whatever its ranks.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ema_average.checkpoints.contents.own_outputs import is_posthoc_snapshot
from ema_average.checkpoints.contents.steps import names_a_step, stem_of, step_from_name
from ema_average.checkpoints.registry import layout_of, models_in, own_folders, side_folder
from ema_average.errors import CheckpointError, NoCheckpointsError

# A folder of one rank's part of a model-parallel save: Megatron's mp_rank_TT[_PPP[_EEE]], rank_N, tp_rank_N.
RANK_FOLDER = re.compile(
    r"(?:(?:mp|tp|pp|dp|ep|model|tensor|pipeline)[_-]?)?rank[_-]?\d+(?:_\d+)*", re.I | re.A
)


def is_rank_folder(name: str) -> bool:
    """Whether a folder's name says it holds one rank's part of a save (``mp_rank_00``, ``rank_1``)."""
    return bool(RANK_FOLDER.fullmatch(name))


@dataclass
class Unit:
    """One step of the run as found on disk: its path and the models in it (itself, when it is one)."""

    path: Path
    models: list[Path]


@dataclass
class Scan:
    units: list[Unit]
    notices: list[str]


def candidates(root: Path, globs: Sequence[str] = ()) -> list[Path]:
    """The run's units below ``root`` (files and folders), all from one folder (one run)."""
    return [unit.path for unit in scan(root, globs).units]


def scan(root: Path, globs: Sequence[str] = ()) -> Scan:
    """The units of the run under ``root``, and what was skipped as a final model."""
    owners: dict[Path, list[Path]] = {}
    notices: list[str] = []
    for model in _models(root, notices):
        owners.setdefault(_owner(root, model), []).append(model)
    units = _without_side_folders([Unit(path, models) for path, models in owners.items()], notices)
    if units and all(u.path == root for u in units):
        raise NoCheckpointsError(
            root,
            "is one checkpoint folder; point at the folder that holds the run's checkpoints (its parent)",
        )
    units = _drop_final_models(root, units, notices)
    if globs:
        units = [u for u in units if _matches(root, u.path, globs)]
    parents = sorted({str(u.path.parent) for u in units})
    if len(parents) > 1:  # a folder of post-hoc EMA snapshots beside the checkpoints is not a second run
        units = _drop_snapshot_folders(units, notices)
        parents = sorted({str(u.path.parent) for u in units})
    if len(parents) > 1:
        shown = ", ".join(parents[:4]) + (" ..." if len(parents) > 4 else "")
        raise CheckpointError(
            root,
            f"holds checkpoints in {len(parents)} folders ({shown}); point at one run's folder, "
            "or choose files by name (--glob)",
        )
    return Scan(sorted(units, key=lambda u: u.path), notices)


def _drop_snapshot_folders(units: list[Unit], notices: list[str]) -> list[Unit]:
    """Units without the folders that hold only post-hoc EMA snapshots (``ema-average FOLDER --method
    posthoc`` reads those), each named in a notice. Looked at only when a run seems to span folders."""
    folders: dict[Path, list[Unit]] = {}
    for unit in units:
        folders.setdefault(unit.path.parent, []).append(unit)
    snapshots = {f for f, held in folders.items() if all(is_posthoc_snapshot(u.path) for u in held)}
    for folder in sorted(snapshots):
        notices.append(f"skipped {folder}: post-hoc EMA snapshots (--method posthoc reads them)")
    return [u for u in units if u.path.parent not in snapshots]


def _without_side_folders(units: list[Unit], notices: list[str]) -> list[Unit]:
    """Each step folder's models less the side folders beside them (an optimizer-only DCP folder, as a
    layout's ``side_folder`` hook says), with one notice per name; a unit left with no model keeps them,
    so that opening it says what it holds."""
    skipped: dict[tuple[str, str], list[Path]] = {}
    kept_units = []
    for unit in units:
        side = {
            m: why for m in unit.models if m != unit.path and len(unit.models) > 1 and (why := side_folder(m))
        }
        kept = [m for m in unit.models if m not in side]
        if side and kept:
            for model, why in side.items():
                skipped.setdefault((model.name, why), []).append(unit.path)
            unit = Unit(unit.path, kept)
        kept_units.append(unit)
    for (name, why), owners in skipped.items():
        where = owners[0].name if len(owners) == 1 else f"{len(owners)} checkpoints ({owners[0].name} ...)"
        notices.append(f"skipped {name} in {where}: {why}")
    return kept_units


def _models(root: Path, notices: list[str]) -> list[Path]:
    """Every folder a folder layout claims and every weight file outside such folders (hidden ones never),
    in ``os.walk``'s order. Walked with a stack, not by recursion as ``os.walk`` does before Python 3.12: a
    folder thousands of levels deep beside the checkpoints is just searched. Links to folders are not
    followed; a folder that cannot be listed is skipped with a notice."""
    found: list[Path] = []
    pending = [root]
    while pending:
        here = pending.pop()
        try:
            pending += _search(here, found)
        except OSError as exc:  # unreadable, or a path longer than the system allows
            if here == root:
                raise NoCheckpointsError(root, f"cannot be listed ({exc.strerror or exc})") from exc
            notices.append(f"skipped {_shortened(here)}: cannot be listed ({exc.strerror or exc})")
    return found


def _shortened(path: Path) -> str:
    """A path for a notice: a folder thousands of levels deep is shown by its two ends."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:96]}...{text[-96:]}"


def _search(here: Path, found: list[Path]) -> list[Path]:
    """Add what ``here`` holds to ``found``; its sub-folders to search next, last first."""
    with os.scandir(here) as listing:
        entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    layout = layout_of(here, "folder")
    claimed = layout is not None
    if claimed:
        found.append(here)  # its files are its own; its sub-folders may hold more, unless they are its own
    own = set(own_folders(layout, here)) if layout is not None else set()
    folders = {e.name for e in entries if _is_folder(e)}
    if not claimed:
        found += [
            here / e.name
            for e in entries
            if e.name not in folders and not is_rank_state(here / e.name) and layout_of(here / e.name, "file")
        ]
    return [here / e.name for e in reversed(entries) if e.name in folders - own and not e.is_symlink()]


# A file named for a process rank and nothing else (olmo-core's ``stepN/train/rank0.pt``): one rank's trainer
# state (step, data-loader position, RNG), saved beside the model by every rank. Weights saved per rank carry
# more in their name (composer's ``ep1-ba42-rank0.pt``, DeepSpeed's ``mp_rank_00_model_states.pt``).
_RANK_STATE = re.compile(r"rank[_-]?\d+", re.IGNORECASE | re.ASCII)


def is_rank_state(path: Path) -> bool:
    """Whether a file is one rank's trainer state by its name (``rank0.pt``, ``rank_3.pt``): never a
    checkpoint, so a step folder's ``train/`` does not make the run "checkpoints in 2 folders"."""
    return bool(_RANK_STATE.fullmatch(stem_of(path)))


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` (hidden ones too; links to folders not followed), in name order: what
    ``Path.rglob("*")`` lists, by a loop, for it recurses before Python 3.12 (a folder 1,200 levels deep
    inside a checkpoint is a RecursionError)."""
    files: list[Path] = []
    pending = [folder]
    while pending:
        here = pending.pop()
        with os.scandir(here) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        files += [here / e.name for e in entries if e.is_file()]
        pending += [here / e.name for e in reversed(entries) if _is_folder(e) and not e.is_symlink()]
    return sorted(files)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _owner(root: Path, model: Path) -> Path:
    """The unit a model belongs to: the step-named folder it sits in (when the model's own name names no
    other step), else itself. Below the run folder any model groups; in the run folder itself only folders
    do (``checkpoint-500/unet`` pointed at), so a run folder named ``exp_step3`` keeps its files apart."""
    parent = model.parent
    while parent != root and is_rank_folder(parent.name) and parent.parent.is_relative_to(root):
        parent = parent.parent  # a rank's sub-folder: the step is the folder around the ranks
    if parent != model.parent and parent != root:
        return parent
    if model == root or not names_a_step(parent) or not parent.is_relative_to(root):
        return model
    if parent == root and not model.is_dir():
        return model
    own = step_from_name(model) if names_a_step(model) else None
    outer = step_from_name(parent)
    return parent if own is None or (outer is not None and own.step == outer.step) else model


def _drop_final_models(root: Path, units: list[Unit], notices: list[str]) -> list[Unit]:
    """A folder's own weights beside step units inside it, and model folders with no step beside step
    units, are a final model (``trainer.save_model()``, a diffusers pipeline): not a step of the run."""
    kept = []
    for unit in units:
        inside = any(other.path != unit.path and other.path.is_relative_to(unit.path) for other in units)
        if inside:
            files = ", ".join(path.name for _, path in models_in(unit.path)) or unit.path.name
            notices.append(f"skipped {unit.path} ({files}): a final model saved beside the checkpoints")
            continue
        kept.append(unit)
    stepped = {u.path.parent for u in kept if names_a_step(u.path)}
    final = {u.path: folder for u in kept if (folder := _final_folder(u.path, stepped)) is not None}
    if final:
        folders = list(dict.fromkeys(final.values()))
        names = ", ".join(f"{folder.name}/" for folder in folders)
        notices.append(f"skipped {names} in {folders[0].parent}: a final model saved beside the checkpoints")
    return [u for u in kept if u.path not in final]


def _final_folder(unit: Path, stepped: set[Path]) -> Path | None:
    """The folder of a final model beside step units (whose folders are ``stepped``), where ``unit`` is one:
    a model folder with no step (a diffusers pipeline's ``unet/``), or a file in a folder with no step
    (litgpt's ``final/lit_model.pth`` beside ``step-00000100/``); None for anything else."""
    if names_a_step(unit):
        return None
    folder = unit if unit.is_dir() else unit.parent
    return folder if folder.parent in stepped and not names_a_step(folder) else None


def _matches(root: Path, path: Path, globs: Sequence[str]) -> bool:
    relative = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(relative, g) for g in globs)
