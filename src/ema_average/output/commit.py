"""Several outputs of one run named all or none: the step that spans both writers.

Apart from them because it is neither: it seals every writer (file or folder) before naming any, and
holds Ctrl-C and SIGTERM (``signals.deferred``) while the names are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ema_average._platform.signals import deferred
from ema_average.errors import OutputError
from ema_average.output.file import SafetensorsWriter
from ema_average.output.folder import ShardedWriter


def commit_together(
    writers: Sequence[SafetensorsWriter | ShardedWriter],
    before_naming: Callable[[], None] | None = None,
    after_naming: Callable[[], None] | None = None,
) -> None:
    """Several outputs of one run: every one sealed (all that a disk can fail) before any is named, so a
    failure leaves none of them. Then ``before_naming`` (the command stops taking Ctrl-C as a cancel),
    then the renames, one per output: not one step together, so Ctrl-C and SIGTERM are held until the last
    is done and ``after_naming`` (the run's locks released) has run: a run never stops with some outputs
    new and others old, nor with its lock files left. A rename that fails says which outputs are new."""
    for writer in writers:
        writer.seal()
    if before_naming is not None:
        before_naming()
    with deferred():
        for i, writer in enumerate(writers):
            try:
                writer.publish()
            except OutputError as exc:
                if len(writers) == 1:
                    raise
                raise OutputError(f"{exc}; {_which_are_new(writers, i)}") from exc
        if after_naming is not None:
            after_naming()


def _which_are_new(writers: Sequence[SafetensorsWriter | ShardedWriter], failed: int) -> str:
    """What a run of several outputs left when output ``failed`` could not be named."""
    new = [str(w.path) for w in writers[:failed]]
    old = [str(w.path) for w in writers[failed + 1 :]]
    parts = [f"new: {', '.join(new)}" if new else "no output was named"]
    if old:
        parts.append(f"not written: {', '.join(old)}")
    return "; ".join(parts)
