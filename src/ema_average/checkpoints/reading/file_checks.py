"""What a checkpoint file must be before it is opened: a regular file, and not a Git LFS pointer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ema_average.errors import CheckpointError

_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def require_regular_file(path: Path) -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file.

    A FIFO named like a checkpoint would block the read forever, and a link to /dev/zero or
    /dev/urandom would be read until memory runs out.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(path, f"is {kind}; only regular files are read")
    return info


def damage_of(path: Path) -> str | None:
    """A plain-words diagnosis of a file that is not what its name says, from its first bytes.

    So that a Git LFS pointer (a clone made without ``git lfs pull``) is named as such, rather than
    reported as a corrupt or unsafe checkpoint.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:
        return None
    if head == _LFS_POINTER:
        return "is a Git LFS pointer, not the weights: fetch the real file with `git lfs pull`"
    return None
