"""Units of a run that are not its model (side files), or another copy of it (an average saved as a sibling
file): skipped with a notice, never fatal.

Beside a run's checkpoints sit files that a layout claims by their suffix but that hold no model: an empty
state dict, a loss function's state (``criterion.pt``: a class-weight tensor), a metric tracker's. What makes
them side files is structure, not name: they hold no weights at all, or tensors that are not the run's model
(few of the names most checkpoints share), while the run's model is there in other units. Alone, or where the
run has no model to compare with, their problem is the error it always was.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ema_average.checkpoints.base import Checkpoint
from ema_average.checkpoints.contents.parts import mirrors
from ema_average.checkpoints.contents.steps import stem_of, step_from_name
from ema_average.errors import CheckpointError, UnsafeCheckpointError


@dataclass
class Deferred:
    """What could not be taken as a step of the run yet: units with no weights (their error), and units
    with no step (the checkpoint and its error), decided once the run's model is known."""

    no_weights: list[CheckpointError] = field(default_factory=list)
    no_step: list[tuple[Checkpoint, CheckpointError]] = field(default_factory=list)


def stepless_copies(paths: list[Path]) -> set[Path]:
    """The units whose name carries no step while others' do (``best.pt``, ``last.pt`` beside
    ``epoch10.pt``): copies of a step the run holds, or a model that is no step of it. They are never fully
    unpickled (``--trust-pickle``), so nothing in them runs before discovery decides to skip them."""
    named = {path: _name_has_step(path) for path in paths}
    return {path for path, has in named.items() if not has} if any(named.values()) else set()


def _name_has_step(path: Path) -> bool:
    try:
        return step_from_name(path) is not None
    except CheckpointError:  # a number too large for a step: a name that says one all the same
        return True


def unread_copy(path: Path, exc: UnsafeCheckpointError, trust_pickle: bool) -> str:
    """The notice for a step-less unit whose safe load was refused: skipped, not read, and how to read it."""
    why = re.split(r"; refused|\. ", exc.problem)[0]
    trust = "" if trust_pickle else " --trust-pickle"
    return (
        f"skipped {path}: not read: its name carries no step beside files whose names do (a final or best "
        f"copy), and its safe load was refused ({why}); to read it anyway, pass --glob '{path.name}'{trust} or give every step with "
        f"--steps"
    )


def run_model(checkpoints: list[Checkpoint]) -> frozenset[str] | None:
    """The names most checkpoints of the run hold, where two or more share them and they are the most
    common set; None where no model stands out."""
    counts = Counter(frozenset(c.specs()) for c in checkpoints)
    if not counts:
        return None
    ranked: list[tuple[frozenset[str], int]] = [*counts.most_common(2), (frozenset(), 0)]
    (names, count), (_, second) = ranked[0], ranked[1]
    return names if count >= 2 and count > second else None


def side_units(checkpoints: list[Checkpoint], deferred: Deferred, notices: list[str]) -> list[Checkpoint]:
    """The run's checkpoints without its side files, each skipped with a notice; the first deferred error
    of a unit that may be the run's model is raised."""
    model = run_model(checkpoints)
    if model is None and len(checkpoints) == 1:
        model = frozenset(checkpoints[0].specs())
    kept = []
    for ckpt in checkpoints:
        if model is not None and not mirrors(dict.fromkeys(ckpt.specs()), dict.fromkeys(model)):
            notices.append(f"skipped {ckpt.path}: {_not_the_model(ckpt)}")
            ckpt.close()
            continue
        kept.append(ckpt)
    for ckpt, error in deferred.no_step:
        if model is None or mirrors(dict.fromkeys(ckpt.specs()), dict.fromkeys(model)):
            raise error
        notices.append(f"skipped {ckpt.path}: no step, and {_not_the_model(ckpt)}")
        ckpt.close()
    if not kept and deferred.no_weights:
        raise deferred.no_weights[0]
    for error in deferred.no_weights:
        notices.append(f"skipped {error.path}: no model weights ({_first_clause(error.problem)})")
    return kept


def _not_the_model(ckpt: Checkpoint) -> str:
    names = list(ckpt.specs())
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    return f"its tensors ({shown}) are not the run's model"


def _first_clause(problem: str) -> str:
    return problem.split(";")[0]


# An average's marker in a file or folder name: NeMo's ``...epoch=3-step=20-EMA.ckpt``, ``model_ema.pt``.
_AVERAGE_MARK = re.compile(r"[-_.]?(?:ema|swa|averaged)(?=$|[-_.])", re.IGNORECASE)


def _without_mark(path: Path) -> str:
    stem = stem_of(path)
    return _AVERAGE_MARK.sub("", stem) + path.name[len(stem) :]


def average_siblings(paths: list[Path], want_average: bool) -> tuple[set[Path], list[str]]:
    """Units that are averages kept beside the raw weights' unit of the same name (NeMo's EMA callback
    writes ``X-EMA.ckpt`` beside ``X.ckpt``), and the notices: by default the averages are skipped;
    ``want_average`` (``--submodel ema``) reads them, and skips the raw ones instead."""
    by_name = {(p.parent, p.name): p for p in paths}
    skipped: set[Path] = set()
    notices: list[str] = []
    for path in paths:
        plain = _without_mark(path)
        raw = by_name.get((path.parent, plain)) if plain != path.name else None
        if raw is None:
            continue
        if want_average:
            skipped.add(raw)
            notices.append(f"skipped {raw}: the raw weights beside {path.name}, the average asked for")
        else:
            skipped.add(path)
            notices.append(
                f"skipped {path}: an average kept beside {raw.name} (the EMA); read the averages with --submodel ema"
            )
    return skipped, notices
