"""The command's own process: its signal dispositions, its allocator, and the Ctrl-C story in one place.

Signal dispositions and malloc tuning belong to the process, so only the command's own process changes
them (:func:`own`, run by the entry point): a host that calls the command in process (a test runner, a
notebook) keeps its handlers, and :func:`ignore_interrupts` does nothing there. The command's warnings
filters follow the same rule (:func:`owned`: for the process's life in its own, for the run in a host's). Each change goes through
:func:`ema_average._platform.signals.settle`, which leaves no window for CPython's race.

What Ctrl-C (SIGINT) and SIGTERM do, stage by stage, in one process:

- start-up (Python's, then the command's imports, then typer building it): ``__main__.main`` answers an
  interrupt with one line, "interrupted; no output written", and exit 130, not a traceback from an import;
  :func:`ema_average.errors.interrupted` finds one that a library's import or a class definition wrapped.
- once the command runs (:func:`own`): SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C, so both unwind
  the same way.
- planning and streaming: the interrupt unwinds; each writer removes its temporary output and the run's
  locks are released; the command prints the same line and exits 130. ``--watch`` takes Ctrl-C as its
  stop: "stopped watching", exit 0 (its lines are printed under ``signals.deferred`` so none is cut).
- naming: once every output is written whole, :func:`ignore_interrupts` runs just before the first rename
  (``on_committed``): Ctrl-C is ignored from then on and SIGTERM is back to its default; the renames
  themselves run under ``signals.deferred``, so a SIGTERM that lands there ends the process only after the
  last output is named and the locks are gone: never some outputs new and others old.
- after naming and at shutdown: Ctrl-C stays ignored (it would say "no output written", untrue now, or
  print "Exception ignored ... Traceback" from the interpreter's finalizers); ``__main__`` ignores it also
  after a run that failed, once its line is out.

Under torchrun each rank is such a process, and torchrun passes Ctrl-C or SIGTERM on to every rank: each
unwinds on its own without agreeing with the others (torchrun is tearing them all down). Rank 0 names the
outputs; every rank calls :func:`ignore_interrupts` once the outputs are named (rank 0 just before). A rank
that learns another failed ignores SIGTERM while it leaves (:func:`ignore_sigterm`), so a peer's exit,
which makes torchrun terminate the rest, does not cut its clean-up short.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from typing import NoReturn

from ema_average._platform.libc import libc_call
from ema_average._platform.signals import settle

__all__ = ["ignore_interrupts", "ignore_sigterm", "own", "owned", "steady_malloc"]


class _Process:
    """Whether this process is the command's own (its entry point ran), so that process-wide settings
    (signal handlers, malloc tuning) are ours to change: never when the command runs inside a host."""

    owned = False


_process = _Process()


def own() -> None:
    """The console script's process: SIGTERM unwinds like Ctrl-C (temporary output removed), and glibc's
    allocator is set for large buffers. Only from the main thread (the only one with signal handlers)."""
    _process.owned = threading.current_thread() is threading.main_thread()
    if _process.owned:
        signal.signal(signal.SIGTERM, _terminate)
        steady_malloc()


def owned() -> bool:
    """Whether this is the command's own process (:func:`own` ran here), whose process-wide settings are
    the command's to change for the rest of its life."""
    return _process.owned


def ignore_interrupts() -> None:
    """The outputs are about to be named: from now on Ctrl-C is ignored and SIGTERM ends the process as it is, where
    either would have said "interrupted; no output written" (untrue now) or, landing in the interpreter's
    shutdown, printed "Exception ignored ... Traceback" for nothing.

    Only in the command's own process: signal dispositions are the process's, and a host (a test runner
    calling the command in process) would pass an ignored Ctrl-C on to every program it starts later.
    """
    if not _process.owned:
        return
    settle(signal.SIGINT, signal.SIG_IGN)
    if signal.getsignal(signal.SIGTERM) is _terminate:
        settle(signal.SIGTERM, signal.SIG_DFL)


def ignore_sigterm() -> None:
    """A rank leaving after another failed: torchrun's SIGTERM, sent once a peer exits, must not cut this
    rank's clean-up (its temporary output, its one line) short. Not gated on :func:`own`: a rank is always
    a process that torchrun started for the command."""
    settle(signal.SIGTERM, signal.SIG_IGN)


def _terminate(signum: int, _frame: object) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C, so the temporary output is removed on the way out."""
    raise KeyboardInterrupt


def steady_malloc() -> None:
    """Pin glibc's mmap threshold at 4 MiB for this process (the command owns it, and the offline benchmark
    does as the command; the library never does).

    glibc raises the threshold each time a large block is freed, after which freed tensor memory stays in
    the heap instead of going back to the OS: peak memory then drifts by tens of MiB from run to run
    above the budget. Measured on the bf16 benchmark: 274-354 MiB above bare torch without, 274 with.
    """
    mallopt = libc_call("mallopt", ctypes.c_int, ctypes.c_int)  # None off glibc
    if mallopt is not None:
        mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; a fixed value also turns the adjustment off
