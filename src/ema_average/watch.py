"""Keep an average of a live run: take each new checkpoint once it is complete, refresh the output.

A checkpoint is taken when every one of its files has kept its size and modification time for a whole
poll interval and it opens cleanly; one that is settled but still unreadable (a writer that paused) is
skipped with a notice and tried again at the next poll. The output is refreshed by resuming from itself,
through the same atomic writer, so a reader never sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

from ema_average.checkpoints.discover import candidates
from ema_average.errors import CheckpointError, ConfigurationError
from ema_average.output_folder import is_folder
from ema_average.pipeline import PreparedRun, RunOptions, Summary, default_output, execute, prepare

Snapshot = dict[Path, tuple[tuple[str, int, int], ...]]


def snapshot(root: Path, globs: tuple[str, ...] = ()) -> Snapshot:
    """Size and mtime of every file of every candidate checkpoint (folders: all files inside)."""
    found: Snapshot = {}
    for unit in candidates(root, globs=globs):
        files = sorted(p for p in unit.rglob("*") if p.is_file()) if unit.is_dir() else [unit]
        try:
            stats = [(str(f), f.stat()) for f in files]
            found[unit] = tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)
        except FileNotFoundError:  # renamed or removed while we looked: not settled
            continue
    return found


def settled(before: Snapshot, now: Snapshot) -> set[Path]:
    """Candidates unchanged since the previous poll."""
    return {unit for unit, files in now.items() if before.get(unit) == files}


def watch(
    options: RunOptions,
    *,
    poll: float,
    on_refresh: Callable[[PreparedRun, Summary], None],
    on_notice: Callable[[str], None],
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Refresh ``options.output`` whenever complete new checkpoints appear, until ``stop()`` or Ctrl-C."""
    if not (isinstance(poll, int | float) and math.isfinite(poll) and poll > 0):
        raise ConfigurationError(f"--poll must be a positive number of seconds, got {poll!r}")
    if len(options.all_settings) > 1:
        raise ConfigurationError(
            "--watch keeps one average fresh: give one value of --decay, --half-life, --gamma or --sigma-rel"
        )
    output = options.output or default_output(options.checkpoint_dir)
    if is_folder(output):
        raise ConfigurationError(
            f"--watch refreshes a single .safetensors file: {output.name} would be a folder"
        )
    before: Snapshot = {}
    reported: set[Path | str] = set()
    while not stop():
        now = snapshot(options.checkpoint_dir, options.globs)
        ready = settled(before, now)
        before = now
        if ready:
            _refresh(options, output, ready, reported, on_refresh, on_notice)
        sleep(poll)


def _refresh(
    options: RunOptions,
    output: Path,
    ready: set[Path],
    reported: set[Path | str],
    on_refresh: Callable[[PreparedRun, Summary], None],
    on_notice: Callable[[str], None],
) -> None:
    resume = output if output.exists() else None
    current = dataclasses.replace(
        options, output=output, resume=resume, overwrite=options.overwrite or resume is None
    )
    while ready:
        try:
            prepared = prepare(current, only=ready)
        except CheckpointError as exc:
            unit = _unit_of(exc, ready)
            if unit is None:
                raise
            if unit not in reported:
                on_notice(f"waiting for {unit}: {exc.problem}")
                reported.add(unit)
            ready = ready - {unit}
            continue
        for note in prepared.left_out:
            if note not in reported:  # each checkpoint that will never be applied is named, once
                on_notice(note)
                reported.add(note)
        if not prepared.up_to_date:
            on_refresh(prepared, execute(prepared))
        return


def _unit_of(exc: CheckpointError, ready: set[Path]) -> Path | None:
    """The candidate a checkpoint error is about (a folder's error may name a file inside it)."""
    if exc.path is None:
        return None
    for unit in ready:
        if exc.path == unit or unit in exc.path.parents:
            return unit
    return None
