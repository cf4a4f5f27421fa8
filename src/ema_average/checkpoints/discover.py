"""Find the checkpoints of one training run in a folder, give each its step, and check they agree.

Discovery walks the folder and asks each registered layout (``layouts.LAYOUTS``) what it claims: folders
(a Hugging Face, DCP or DeepSpeed save) and weight files. Those are *models*; each belongs to a *unit*, one
step of the run: itself, or the step-named folder it sits in (``checkpoint-500/unet``,
``checkpoint_3/pytorch_model``, ``step_100/model.pt``). Folders of trainer state with no weights
(optimizer, ``recipe_state/``, RNG) are never units, nor files of one rank's trainer state (``rank0.pt``).
A final model saved beside the step folders (the run folder's own ``model.safetensors``, a diffusers
pipeline's ``unet/``, litgpt's ``final/``) is skipped with a notice.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, OpenOptions, TensorSpec
from ema_average.checkpoints.layouts import layout_of, looked_for, models_in, open_leaf, own_folders
from ema_average.checkpoints.run_steps import StepsFrom, note_unread_step, real_steps, step_of
from ema_average.checkpoints.safetensors_file import is_posthoc_snapshot
from ema_average.checkpoints.steps import names_a_step, stem_of, step_from_name
from ema_average.checkpoints.unit_folder import open_unit
from ema_average.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    NoCheckpointsError,
)
from ema_average.safetensors_format import shape_problem

Keeps = Callable[[str], bool]  # a tensor selection: whether a tensor (by its saved name) is averaged


@dataclass
class Run:
    """The checkpoints of one run in step order, and what discovery skipped and why."""

    root: Path
    checkpoints: list[Checkpoint]
    notices: list[str] = field(default_factory=list)
    units: list[Path] = field(default_factory=list)  # the user's checkpoints found, taken or skipped


@dataclass
class Unit:
    """One step of the run as found on disk: its path and the models in it (itself, when it is one)."""

    path: Path
    models: list[Path]


@dataclass
class Scan:
    units: list[Unit]
    notices: list[str]


def discover(
    path: str | Path,
    *,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    steps_from: StepsFrom = "auto",
    submodel: str | None = None,
) -> list[Checkpoint]:
    """The checkpoints under ``path`` in step order (see :func:`find_run` for the notices too)."""
    return find_run(
        path,
        state_dict_key=state_dict_key,
        trust_pickle=trust_pickle,
        steps_from=steps_from,
        submodel=submodel,
    ).checkpoints


def find_run(
    path: str | Path,
    *,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    steps_from: StepsFrom = "auto",
    only: set[Path] | None = None,
    submodel: str | None = None,
    step_every: int | None = None,
    steps: Sequence[int] | None = None,
    globs: Sequence[str] = (),
    keeps: Keeps | None = None,
) -> Run:
    """Find, open, step, de-duplicate and validate the checkpoints of the run under ``path``.

    ``only`` restricts the run to those units (``--watch`` passes the ones that are complete).
    ``submodel`` picks one model of units that hold several (``unet_ema``, ``adapter_model``, ``fp32``).
    ``step_every`` turns steps that count saves or epochs (flagged by the layouts) into training steps:
    ``(count + 1) * step_every`` where the first save counts 0 (an index, a save count), ``count *
    step_every`` where it counts 1 (epochs completed: open_clip, mmengine); ``steps`` gives every
    checkpoint's step outright, oldest first. ``globs`` keeps only the units whose name (or path below
    ``path``) matches one of them, e.g. ``checkpoint_*_*.pt``. ``keeps`` is the
    tensor selection (``--include``/``--exclude``): checkpoints are compared, and copies told apart, on the
    tensors it keeps only, so files that differ in excluded tensors (an optimizer's) make one run.

    Nothing is read beyond headers, pickled structure and step records, except the tensors of two
    checkpoints that claim the same step (to tell a copy, such as fairseq's checkpoint_last.pt, from
    a real conflict).
    """
    root = Path(path)
    if not root.exists():
        raise NoCheckpointsError(root, "does not exist")
    if not root.is_dir():
        raise NoCheckpointsError(
            root, "is not a directory; point at the folder holding the run's checkpoints"
        )
    if step_every is not None and (type(step_every) is not int or step_every < 1):
        raise ConfigurationError(f"--step-every must be a whole number of steps >= 1, got {step_every!r}")
    options = OpenOptions(state_dict_key=state_dict_key, trust_pickle=trust_pickle, submodel=submodel)
    found = scan(root, globs)
    notices = list(found.notices)
    units = [unit.path for unit in found.units]
    checkpoints: list[Checkpoint] = []
    for unit in found.units:
        if only is not None and unit.path not in only:
            continue
        ckpt = _open(unit, options)
        if _written_by_this_tool(ckpt):
            notices.append(f"skipped {unit.path}: written by ema-average itself")
            units.remove(unit.path)
            ckpt.close()
            continue
        if _is_final_copy(ckpt):
            notices.append(f"skipped {unit.path}: {ckpt.final_copy}")
            units.remove(unit.path)
            ckpt.close()
            continue
        _check_holds_weights(ckpt)
        _check_submodel(ckpt, submodel)
        info = step_of(ckpt, steps_from)
        ckpt.step, ckpt.step_origin, ckpt.step_is_counter = info.step, info.origin, info.counter
        note_unread_step(ckpt, steps_from)
        checkpoints.append(ckpt)
    if not checkpoints:
        where = f" named {' or '.join(globs)}" if globs else ""
        raise NoCheckpointsError(root, f"no checkpoints{where} found; looked for {looked_for()}")
    checkpoints = _drop_copies(checkpoints, notices, keeps)
    checkpoints.sort(key=lambda c: c.step if c.step is not None else -1)
    real_steps(root, checkpoints, step_every, steps, notices)
    validate_run(checkpoints, keeps)
    _note_models(checkpoints, notices)
    return Run(root, checkpoints, notices, units)


def candidates(root: Path, globs: Sequence[str] = ()) -> list[Path]:
    """The run's units below ``root`` (files and folders), all from one folder (one run)."""
    return [unit.path for unit in scan(root, globs).units]


def scan(root: Path, globs: Sequence[str] = ()) -> Scan:
    """The units of the run under ``root``, and what was skipped as a final model."""
    owners: dict[Path, list[Path]] = {}
    notices: list[str] = []
    for model in _models(root, notices):
        owners.setdefault(_owner(root, model), []).append(model)
    units = [Unit(path, models) for path, models in owners.items()]
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


def _open(unit: Unit, options: OpenOptions) -> Checkpoint:
    if unit.models == [unit.path]:
        return open_leaf(unit.path, options)
    return open_unit(unit.path, unit.models, options)


def _written_by_this_tool(ckpt: Checkpoint) -> bool:
    """An output of this tool (a file, or a folder of shards, its metadata marked): never an input. The
    layouts that can be one say so with a ``written_by_this_tool`` property."""
    return getattr(ckpt, "written_by_this_tool", False) is True


def _check_holds_weights(ckpt: Checkpoint) -> None:
    """Every shape is one torch can hold, and the unit holds weights: not no tensors, nor the placeholders
    DeepSpeed ZeRO-3 and FSDP save where the weights live elsewhere (most floating tensors empty). A lone
    empty tensor (a model's empty buffer) is kept: it is copied as it is."""
    specs = ckpt.specs()
    if not specs:
        raise CheckpointError(
            ckpt.path, "holds no tensors (weights saved elsewhere, e.g. by DeepSpeed ZeRO-3?)"
        )
    for name, spec in specs.items():
        problem = shape_problem(spec.shape, spec.dtype)
        if problem is not None:
            raise CheckpointError(ckpt.path, f"tensor {name!r} {problem}")
    floating = [name for name, spec in specs.items() if spec.is_floating]
    empty = [name for name in floating if specs[name].numel == 0]
    if empty and 2 * len(empty) > len(floating):
        raise CheckpointError(
            ckpt.path,
            f"tensor {empty[0]!r} has no elements: a placeholder (as DeepSpeed ZeRO-3 and FSDP save), "
            f"not weights: {len(empty)} of its {len(floating)} floating tensors are empty; refused",
        )


def _check_submodel(ckpt: Checkpoint, submodel: str | None) -> None:
    if submodel is None or submodel in ckpt.model.split("/"):
        return
    models = [m for m in [*ckpt.model.split("/")[:1], *ckpt.other_models] if m]
    listed = f"; its models: {', '.join(models)}" if models else "; it holds one model"
    raise CheckpointError(ckpt.path, f"has no model {submodel!r} (--submodel){listed}")


def _note_models(checkpoints: list[Checkpoint], notices: list[str]) -> None:
    """Which model was read where units hold several: once for the run when all agree."""
    described = [(c, "; ".join(choice.describe() for choice in c.choices)) for c in checkpoints if c.choices]
    if not described:
        return
    texts = {text for _, text in described}
    if len(texts) == 1 and len(described) == len(checkpoints):
        notices.append(f"in each checkpoint: {texts.pop()}")
        return
    for ckpt, text in described:
        ckpt.notes.append(text)


def selected(ckpt: Checkpoint, keeps: Keeps | None) -> dict[str, TensorSpec]:
    """The checkpoint's tensors that the selection keeps (all of them without one)."""
    specs = ckpt.specs()
    return specs if keeps is None else {name: spec for name, spec in specs.items() if keeps(name)}


def _same_tensors(a: Checkpoint, b: Checkpoint, keeps: Keeps | None) -> bool:
    specs = selected(a, keeps)
    if specs != selected(b, keeps):
        return False
    return all(torch.equal(a.read(name), b.read(name)) for name in specs)


def _drop_copies(checkpoints: list[Checkpoint], notices: list[str], keeps: Keeps | None) -> list[Checkpoint]:
    """Keep one of each set of same-step files with the same selected tensors; a same-step conflict is an
    error."""
    by_step: dict[int, Checkpoint] = {}
    for ckpt in checkpoints:
        assert ckpt.step is not None
        kept = by_step.get(ckpt.step)
        if kept is None:
            by_step[ckpt.step] = ckpt
            continue
        if not _same_tensors(kept, ckpt, keeps):
            raise CheckpointMismatchError(
                ckpt.path, f"has step {ckpt.step}, as does {kept.path}, but different weights"
            )
        # Keep the one whose name says its step (checkpoint_3_1200.pt over checkpoint_last.pt), else one
        # whose name holds a number (ultralytics' epoch3.pt over best.pt).
        if _name_rank(ckpt) > _name_rank(kept):
            kept, ckpt = ckpt, kept
            by_step[kept.step] = kept  # type: ignore[index]
        notices.append(f"skipped {ckpt.path}: same step ({ckpt.step}) and weights as {kept.path}")
        ckpt.close()
    return list(by_step.values())


def _is_final_copy(ckpt: Checkpoint) -> bool:
    """A file that says it is a final copy of the run's weights (ultralytics' stripped ``last.pt``) and
    carries no step: skipped with a notice, as a final model beside the step folders is."""
    return ckpt.final_copy is not None and ckpt.metadata_step() is None and ckpt.name_step() is None


def _name_rank(ckpt: Checkpoint) -> int:
    """2: the name says the file's step; 1: it holds another number (an epoch); 0: none (last, best)."""
    info = ckpt.name_step()
    return 0 if info is None else 2 if info.step == ckpt.step else 1


def validate_run(checkpoints: list[Checkpoint], keeps: Keeps | None = None) -> None:
    """Every checkpoint must hold the first one's tensor names, shapes and dtypes, of those ``keeps``
    selects (all without it)."""
    first = checkpoints[0]
    reference = selected(first, keeps)
    for ckpt in checkpoints[1:]:
        specs = selected(ckpt, keeps)
        for name, spec in reference.items():
            other = specs.get(name)
            if other is None:
                raise CheckpointMismatchError(
                    ckpt.path, f"has no tensor {name!r} (present in {first.path.name})"
                )
            if other != spec:
                raise CheckpointMismatchError(
                    ckpt.path,
                    f"tensor {name!r} is {_describe(other)}, but {_describe(spec)} in {first.path.name}",
                )
        extra = next((name for name in specs if name not in reference), None)
        if extra is not None:
            raise CheckpointMismatchError(ckpt.path, f"has tensor {extra!r}, absent from {first.path.name}")


def _describe(spec: object) -> str:
    shape = getattr(spec, "shape", ())
    dtype = str(getattr(spec, "dtype", "")).removeprefix("torch.")
    return f"{dtype}{list(shape)}"
