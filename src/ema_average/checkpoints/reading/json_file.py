"""JSON side files (indexes, ``trainer_state.json``, ``modules.json``, a step record, our own marker), read
one way: a regular file of bounded size, parsed as JSON (which runs no code), any failure one error naming
the file. Nesting too deep for the parser is refused as such, never raised as a ``RecursionError``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ema_average.errors import CheckpointError

__all__ = ["MAX_JSON_BYTES", "read_json"]

MAX_JSON_BYTES = 100_000_000  # far above any real index (a 1T-parameter model's is a few MB)
_NOT_REGULAR = "is not a regular file (a link, folder, FIFO or device); not read"


def read_json(path: Path, limit: int = MAX_JSON_BYTES, *, follow_links: bool = True) -> object:
    """The JSON in ``path``, checked to be a regular file before it is opened (a FIFO would block the read)
    and again on the descriptor. ``follow_links=False`` refuses a link too (an output's marker file, which
    this tool writes itself); an input's index may be one (the Hugging Face cache links its snapshots)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        before = os.stat(path) if follow_links else os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            raise CheckpointError(path, _NOT_REGULAR)
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(path, _NOT_REGULAR)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(path, f"is larger than {limit} bytes; not read as JSON")
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(path, "is not valid JSON (nested too deeply to read)") from None
    except ValueError as exc:
        raise CheckpointError(path, f"is not valid JSON ({str(exc)[:80]})") from None
