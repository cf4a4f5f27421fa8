"""Keep an average of a live run: take each new checkpoint once it is complete, refresh the output.

A checkpoint is taken when every one of its files has kept its size, modification time and inode for a
whole poll interval and it opens cleanly; one that is settled but still unreadable (a writer that paused) is
skipped with a notice and tried again at the next poll. The output is refreshed by resuming from itself,
through the same atomic writer, so a reader never sees a half-written file.

A checkpoint that changes after it was averaged (a restarted run saving the same step again) is noticed by
the same record: the average is computed again from the first checkpoint, with a notice, rather than
keeping the old weights. The first output is written as a one-shot run writes it: a file another program
puts at the output path meanwhile is kept (the run stops with an error), never replaced.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

from ema_average.checkpoints.discovery.discover import candidates, files_under
from ema_average.errors import CheckpointError, ConfigurationError, OutputError
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import one_value_hint
from ema_average.offline.run import PreparedRun, Summary, default_output, execute, prepare
from ema_average.output.folder_plan import is_folder

Snapshot = dict[Path, tuple[tuple[str, int, int, int], ...]]


def snapshot(root: Path, globs: tuple[str, ...] = ()) -> Snapshot:
    """Size, mtime and inode of every file of every candidate checkpoint (folders: all files inside); the
    inode shows a file replaced by a rename even where size and mtime happen to match."""
    found: Snapshot = {}
    for unit in candidates(root, globs=globs):
        try:
            files = files_under(unit) if unit.is_dir() else [unit]
            stats = [(str(f), f.stat()) for f in files]
            found[unit] = tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)
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
        raise ConfigurationError(f"--watch keeps one average fresh: {one_value_hint(options.all_settings)}")
    output = options.output or default_output(options.checkpoint_dir)
    if is_folder(output):
        raise ConfigurationError(
            f"--watch refreshes a single .safetensors file: {output.name} would be a folder"
        )
    live = _LiveOutput(output)
    before: Snapshot = {}
    reported: set[Path | str] = set()
    while not stop():
        now = snapshot(options.checkpoint_dir, options.globs)
        ready = settled(before, now)
        before = now
        if ready:
            again = live.changed(now, ready)
            if again:
                on_notice(
                    f"{', '.join(sorted(u.name for u in again))} changed after it was averaged: averaging again from the first checkpoint"
                )
            current = live.options(options, again=bool(again))
            prepared = _refresh(current, ready, reported, on_refresh, on_notice)
            if prepared is not None:
                live.averaged(prepared, now, ready, again=bool(again))
        sleep(poll)


class _LiveOutput:
    """What the watch wrote: the output file as it left it, and each checkpoint as it was when averaged.

    Both come from this process's own polls, so a checkpoint rewritten while the watch runs is noticed;
    one rewritten before it started (the output resumed from an earlier watch) is not.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.sources: Snapshot = {}
        self.written: tuple[int, int, int] | None = None  # inode, size, mtime of our last write

    def changed(self, now: Snapshot, ready: set[Path]) -> set[Path]:
        """Settled checkpoints that differ from what was averaged."""
        return {unit for unit in ready if unit in self.sources and self.sources[unit] != now[unit]}

    def options(self, options: RunOptions, *, again: bool) -> RunOptions:
        """Resume from the output, or (a checkpoint changed) start over and replace the output, which
        must still be the file this watch wrote: anything else put there is not ours to replace."""
        if again:
            if self.written is None or _identity(self.output) != self.written:
                raise OutputError(
                    f"{self.output}: changed by another program since this watch wrote it; not replaced"
                )
            return dataclasses.replace(options, output=self.output, resume=None, overwrite=True)
        resume = self.output if self.output.exists() else None
        return dataclasses.replace(options, output=self.output, resume=resume)

    def averaged(self, prepared: PreparedRun, now: Snapshot, ready: set[Path], *, again: bool) -> None:
        if again:
            self.sources = {}
        for checkpoint in prepared.checkpoints:
            unit = _unit_of(checkpoint.path, ready)
            if unit is not None:
                self.sources[unit] = now[unit]
        self.written = _identity(self.output)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _refresh(
    current: RunOptions,
    ready: set[Path],
    reported: set[Path | str],
    on_refresh: Callable[[PreparedRun, Summary], None],
    on_notice: Callable[[str], None],
) -> PreparedRun | None:
    """Average what ``ready`` adds; the run written, or None when a checkpoint waits or nothing is new."""
    while ready:
        try:
            prepared = prepare(current, only=ready)
        except CheckpointError as exc:
            unit = _unit_of(exc.path, ready)
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
        if prepared.up_to_date:
            return None
        on_refresh(prepared, execute(prepared))
        return prepared
    return None


def _unit_of(path: Path | None, ready: set[Path]) -> Path | None:
    """The candidate ``path`` belongs to (a folder checkpoint's error or file may name a file inside it)."""
    if path is None:
        return None
    for unit in ready:
        if path == unit or unit in path.parents:
            return unit
    return None
