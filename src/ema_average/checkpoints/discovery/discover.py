"""Find the checkpoints of one training run in a folder, give each its step, and check they agree.

Discovery walks the folder and asks each registered layout (``layouts.LAYOUTS``) what it claims: folders
(a Hugging Face, DCP or DeepSpeed save) and weight files. Those are *models*; each belongs to a *unit*, one
step of the run: itself, or the step-named folder it sits in (``checkpoint-500/unet``,
``checkpoint_3/pytorch_model``, ``step_100/model.pt``). Folders of trainer state with no weights
(optimizer, ``recipe_state/``, RNG) are never units, nor files of one rank's trainer state (``rank0.pt``).
A final model saved beside the step folders (the run folder's own ``model.safetensors``, a diffusers
pipeline's ``unet/``, litgpt's ``final/``) is skipped with a notice. Finding the units on disk is
:mod:`ema_average.checkpoints.discovery.run_folder`'s part; this module opens, steps and checks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, OpenOptions, TensorSpec
from ema_average.checkpoints.contents.keys import FOREIGN_SUFFIXES, is_ema_name
from ema_average.checkpoints.contents.own_outputs import in_marked_folder
from ema_average.checkpoints.contents.steps import natural_key
from ema_average.checkpoints.discovery.model_folders import open_unit
from ema_average.checkpoints.discovery.renamed import stripped_of, with_model_names
from ema_average.checkpoints.discovery.run_folder import Unit, scan
from ema_average.checkpoints.discovery.run_folder import (
    candidates as candidates,  # watch and tests import these here
)
from ema_average.checkpoints.discovery.run_folder import files_under as files_under
from ema_average.checkpoints.discovery.run_folder import is_rank_state as is_rank_state
from ema_average.checkpoints.discovery.run_steps import StepsFrom, note_unread_step, real_steps, step_of
from ema_average.checkpoints.discovery.side_units import (
    Deferred,
    average_siblings,
    side_units,
    stepless_copies,
    unread_copy,
)
from ema_average.checkpoints.registry import looked_for, open_leaf
from ema_average.checkpoints.safetensors_format import shape_problem
from ema_average.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    NoCheckpointsError,
    NoWeightsError,
    UnsafeCheckpointError,
)

Keeps = Callable[[str], bool]  # a tensor selection: whether a tensor (by its saved name) is averaged


@dataclass
class Run:
    """The checkpoints of one run in step order, and what discovery skipped and why."""

    root: Path
    checkpoints: list[Checkpoint]
    notices: list[str] = field(default_factory=list)
    units: list[Path] = field(default_factory=list)  # the user's checkpoints found, taken or skipped


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
    strip_prefix: str = "",
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
    tensors it keeps only, so files that differ in excluded tensors (an optimizer's) make one run. Every
    checkpoint is read under the names its model loads (``renamed.with_model_names``: wrapper prefixes
    such as ``module.`` and ``_orig_mod.`` stripped, and ``strip_prefix``), which ``keeps`` then matches.

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
    found = scan(root, globs)
    notices = list(found.notices)
    units = [unit.path for unit in found.units]
    averages, said = average_siblings(units, submodel is not None and is_ema_name(submodel))
    if averages:  # the average is chosen among files, not inside one
        found.units = [unit for unit in found.units if unit.path not in averages]
        notices += said
        submodel = None if is_ema_name(submodel or "") else submodel
    options = OpenOptions(state_dict_key=state_dict_key, trust_pickle=trust_pickle, submodel=submodel)
    checkpoints: list[Checkpoint] = []
    deferred = Deferred()
    stepless = stepless_copies([unit.path for unit in found.units]) if steps is None else set()
    safe_only = replace(options, trust_pickle=False)
    for unit in found.units:
        if only is not None and unit.path not in only:
            continue
        try:
            ckpt = _open(unit, safe_only if unit.path in stepless else options)
        except NoWeightsError as exc:  # a side file beside the run's model, or the run's error
            deferred.no_weights.append(exc)
            continue
        except UnsafeCheckpointError as exc:  # a final or best copy: decided before anything runs
            if unit.path not in stepless:
                raise
            notices.append(unread_copy(unit.path, exc, trust_pickle))
            units.remove(unit.path)
            continue
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
        try:
            _check_holds_weights(ckpt)
        except NoWeightsError as exc:
            deferred.no_weights.append(exc)
            ckpt.close()
            continue
        _check_submodel(ckpt, submodel)
        ckpt = with_model_names(ckpt, strip_prefix)
        try:
            info = step_of(ckpt, steps_from)
        except CheckpointError as exc:
            if steps is None:
                deferred.no_step.append((ckpt, exc))  # a side file, or the run's error
            else:
                checkpoints.append(ckpt)  # the user gives every step (--steps): none of its own needed
            continue
        ckpt.step, ckpt.step_origin, ckpt.step_is_counter = info.step, info.origin, info.counter
        note_unread_step(ckpt, steps_from)
        checkpoints.append(ckpt)
    checkpoints = side_units(checkpoints, deferred, notices)
    if not checkpoints:
        _refuse_foreign(root)
        where = f" named {' or '.join(globs)}" if globs else ""
        raise NoCheckpointsError(root, f"no checkpoints{where} found; looked for {looked_for()}")
    if all(c.step is not None for c in checkpoints):
        checkpoints = _drop_copies(checkpoints, notices, keeps)
        checkpoints.sort(key=lambda c: c.step if c.step is not None else -1)
    else:  # --steps with checkpoints that state none: oldest first by name, as the steps are given
        checkpoints.sort(key=lambda c: natural_key(c.path.name))
        notices.append("the steps given (--steps) follow the checkpoints in the order of their names")
    real_steps(root, checkpoints, step_every, steps, notices)
    validate_run(checkpoints, keeps)
    _note_models(checkpoints, notices)
    _note_stripped(checkpoints, notices)
    _note_names(checkpoints, notices)
    return Run(root, checkpoints, notices, units)


def _open(unit: Unit, options: OpenOptions) -> Checkpoint:
    if unit.models == [unit.path]:
        return open_leaf(unit.path, options)
    return open_unit(unit.path, unit.models, options)


def _written_by_this_tool(ckpt: Checkpoint) -> bool:
    """An output of this tool, in any layout it writes: never an input. A file or folder of safetensors
    whose metadata is marked says so itself (``Checkpoint.written_by_this_tool``); a folder output holding
    torch weights (litgpt's ``lit_model.pth``) by the marker file beside them, whichever layout reads it."""
    return ckpt.written_by_this_tool or in_marked_folder(ckpt.path)


def _refuse_foreign(root: Path) -> None:
    """A folder of another framework's weights (Keras ``.keras``, ``.weights.h5``) is refused as such, in
    one line, rather than as a folder with no checkpoints."""
    files = [p for p in files_under(root)[:10_000] if p.name.lower().endswith(tuple(FOREIGN_SUFFIXES))]
    if files:
        suffix = next(s for s in FOREIGN_SUFFIXES if files[0].name.lower().endswith(s))
        raise NoCheckpointsError(
            root,
            f"holds {FOREIGN_SUFFIXES[suffix]} weights ({files[0].name}{' ...' if len(files) > 1 else ''}), "
            "which are not read: only PyTorch checkpoints (torch files, safetensors, DCP, DeepSpeed) are",
        )


def _check_holds_weights(ckpt: Checkpoint) -> None:
    """Every shape is one torch can hold, and the unit holds weights: not no tensors, nor the placeholders
    DeepSpeed ZeRO-3 and FSDP save where the weights live elsewhere (most floating tensors empty). A lone
    empty tensor (a model's empty buffer) is kept: it is copied as it is."""
    specs = ckpt.specs()
    if not specs:
        raise NoWeightsError(
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
    inside = sorted(n for n in ckpt.specs() if n.startswith((f"{submodel}/", f"{submodel}.")))
    if inside:  # a module of the model read (sentence-transformers' 2_Dense/): in the output already
        shown = inside[0][: len(submodel) + 1]
        raise CheckpointError(
            ckpt.path,
            f"has no separate model {submodel!r} (--submodel): its tensors are part of the model read, in the "
            f"output as {shown}... ({len(inside)} tensors); average only them with --include '{shown}*'",
        )
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


def _note_names(checkpoints: list[Checkpoint], notices: list[str]) -> None:
    """Where the names read are not the file's own keys (a model inside a container, prefixes stripped),
    the plan shows a few: what the output holds and what --include/--exclude match."""
    latest = checkpoints[-1]
    if "." not in latest.model and stripped_of(latest) is None:  # app_state.module, state.model: nested
        return
    names = list(latest.specs())
    shown = ", ".join(names[:3]) + (f" ... ({len(names)} tensors)" if len(names) > 3 else "")
    notices.append(f"tensor names as read, written and matched by --include/--exclude: {shown}")


def _note_stripped(checkpoints: list[Checkpoint], notices: list[str]) -> None:
    """Which prefixes were stripped from the names read: once for the run when all agree."""
    stripped = [stripped_of(c) for c in checkpoints]
    if not any(stripped):
        return
    if len(set(stripped)) == 1:
        notices.append(f"in each checkpoint: names read without the prefix {stripped[0]}")
        return
    for ckpt, text in zip(checkpoints, stripped, strict=True):
        ckpt.notes.append(f"names read without the prefix {text}" if text else "names read as saved")


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
        step = ckpt.step
        assert step is not None
        kept = by_step.get(step)
        if kept is None:
            by_step[step] = ckpt
            continue
        if not _same_tensors(kept, ckpt, keeps):
            raise CheckpointMismatchError(
                ckpt.path, f"has step {ckpt.step}, as does {kept.path}, but different weights"
            )
        # Keep the one whose name says its step (checkpoint_3_1200.pt over checkpoint_last.pt), else one
        # whose name holds a number (ultralytics' epoch3.pt over best.pt).
        if _name_rank(ckpt) > _name_rank(kept):
            kept, ckpt = ckpt, kept
            by_step[step] = kept
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


def _describe(spec: TensorSpec) -> str:
    return f"{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)}"
