"""``python -m ema_average`` and the ``ema-average`` console script (torchrun launches modules this way).

Ctrl-C while the command's modules are still importing is answered like any other interrupt: one
line and exit 130, not a traceback from the middle of an import; one that lands after the command is done
(during the interpreter's shutdown) is ignored. The package and this module import nothing heavy (3-4 ms,
not typing nor pathlib), so the window before this guard is Python's own start-up. The whole story, stage
by stage, is in :mod:`ema_average._platform.process`.
"""

from __future__ import annotations

import sys

from ema_average.errors import interrupted


def _interrupted() -> SystemExit:
    sys.stderr.write("ema-average: interrupted; no output written\n")
    return SystemExit(130)


def main() -> None:
    try:
        _run()
    except SystemExit as exc:
        if exc.code == 130 and _answered_silently(exc):
            raise _interrupted() from None
        raise
    except BaseException as exc:
        if interrupted(exc):
            raise _interrupted() from None
        raise


def _answered_silently(exc: SystemExit) -> bool:
    """typer answers a Ctrl-C while it parses the arguments with a bare exit 130 (click's ``Exit`` raised
    from the interrupt); the command's own exit 130, after its line, is raised ``from None``."""
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return cause is not None and interrupted(cause)


def _run() -> None:
    """The command, whose interrupts :func:`main` answers wherever they land: in its imports, while typer
    builds it from its signature (before click's own interrupt handling is in place), or in the run."""
    from ema_average._platform.process import ignore_interrupts
    from ema_average.cli.app import main as run_command

    try:
        run_command()
    finally:
        # The command is over (its output committed or cleaned up): a Ctrl-C now would land in the
        # interpreter's shutdown (atexit finalizers) and print "Exception ignored ... Traceback".
        ignore_interrupts()


if __name__ == "__main__":
    main()
