"""``python -m ema_average`` and the ``ema-average`` console script (torchrun launches modules this way).

Ctrl-C while the command's modules are still importing is answered like any other interrupt: one
line and exit 130, not a traceback from the middle of an import; one that lands after the command is done
(during the interpreter's shutdown) is ignored.
"""

from __future__ import annotations

import sys


def _interrupted() -> SystemExit:
    sys.stderr.write("ema-average: interrupted; no output written\n")
    return SystemExit(130)


def main() -> None:
    try:
        from ema_average.cli import ignore_interrupts
        from ema_average.cli import main as run_command
    except KeyboardInterrupt:
        raise _interrupted() from None
    try:
        run_command()
    except KeyboardInterrupt:
        # Typer builds the command from its signature (annotations evaluated, a fraction of a second)
        # before click's own interrupt handling is in place: an interrupt then escapes click.
        raise _interrupted() from None
    finally:
        # The command is over (its output committed or cleaned up): a Ctrl-C now would land in the
        # interpreter's shutdown (atexit finalizers) and print "Exception ignored ... Traceback".
        ignore_interrupts()


if __name__ == "__main__":
    main()
