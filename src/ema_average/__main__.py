"""``python -m ema_average`` and the ``ema-average`` console script (torchrun launches modules this way).

Ctrl-C while the command's modules are still importing is answered like any other interrupt: one
line and exit 130, not a traceback from the middle of an import; one that lands after the command is done
(during the interpreter's shutdown) is ignored. The package and this module import nothing heavy (3-4 ms,
not typing nor pathlib), so the window before this guard is Python's own start-up.
"""

from __future__ import annotations

import sys

from ema_average.errors import interrupted


def _interrupted() -> SystemExit:
    sys.stderr.write("ema-average: interrupted; no output written\n")
    return SystemExit(130)


def main() -> None:
    try:
        from ema_average.cli import ignore_interrupts
        from ema_average.cli import main as run_command
    except BaseException as exc:
        if interrupted(exc):
            raise _interrupted() from None
        raise
    try:
        run_command()
    except BaseException as exc:
        # Typer builds the command from its signature (annotations evaluated, a fraction of a second)
        # before click's own interrupt handling is in place: an interrupt then escapes click.
        if interrupted(exc):
            raise _interrupted() from None
        raise
    finally:
        # The command is over (its output committed or cleaned up): a Ctrl-C now would land in the
        # interpreter's shutdown (atexit finalizers) and print "Exception ignored ... Traceback".
        ignore_interrupts()


if __name__ == "__main__":
    main()
