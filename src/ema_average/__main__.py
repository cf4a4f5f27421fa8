"""``python -m ema_average`` and the ``ema-average`` console script (torchrun launches modules this way).

Ctrl-C while the command's modules are still importing is answered like any other interrupt: one
line and exit 130, not a traceback from the middle of an import.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from ema_average.cli import main as run_command
    except KeyboardInterrupt:
        sys.stderr.write("ema-average: interrupted; no output written\n")
        raise SystemExit(130) from None
    run_command()


if __name__ == "__main__":
    main()
