"""Positioned reads of a checkpoint file: tensor bytes read with ``pread`` straight into given buffers,
from the file planned and no other."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ema_average._platform.open_files import POOL, PooledFile, too_many_open, too_many_open_words
from ema_average.errors import CheckpointError


class PreadFile:
    """A checkpoint file whose tensor bytes are read with ``pread`` straight into given buffers.

    No mapping: a file cut short while it is read gives a clear error, never a SIGBUS. Descriptors come
    from the process's one pool of open files (``_platform/open_files.py``: a run of 1,100 checkpoints
    fits ``ulimit -n 1024``); a file whose descriptor was handed back is reopened on its next read. Every
    read checks that the file is still the one planned (device, inode, link count, size, modification
    time), so a file replaced or rewritten since its header was read is refused rather than read at stale
    offsets. The change time is compared too: a rewrite that restores the size and the modification time
    (``os.utime``) still moves ``st_ctime_ns``.
    """

    def __init__(self, path: Path, planned: os.stat_result) -> None:
        self.path = path
        self.planned = planned
        self._pooled = PooledFile(path)

    @property
    def fd(self) -> int | None:
        """The descriptor the pool keeps open for this file, or None while it is closed."""
        return self._pooled.fd

    def read_into(self, out: torch.Tensor, offset: int, name: str) -> torch.Tensor:
        """``out.nbytes`` bytes of the file from byte ``offset`` into ``out`` (contiguous, on the CPU)."""
        size = out.numel() * out.element_size()
        if size == 0:
            return out
        view = out.reshape(-1).view(torch.uint8).numpy().data
        with self.opened(name, offset + size) as fd:
            done = 0
            while done < size:  # pread may return short counts on large reads
                try:
                    n = os.preadv(fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise CheckpointError(
                        self.path, f"read failed in tensor {name!r} ({exc.strerror})"
                    ) from exc
                if n == 0:
                    raise CheckpointError(self.path, f"file ends inside tensor {name!r} (truncated?)")
                done += n
        return out

    @contextmanager
    def opened(self, name: str, end: int) -> Iterator[int]:
        """A descriptor of the file, checked to be the one planned and to reach byte ``end``, held open
        while the caller reads through it (a reader that is not ``read_into``: DCP's ``torch.load``)."""
        try:
            fd = POOL.acquire(self._pooled)
        except OSError as exc:
            raise _unreadable(self.path, exc) from exc
        try:
            self._check_unchanged(fd, name, end)
            yield fd
        finally:
            POOL.release(self._pooled)

    def _check_unchanged(self, fd: int, name: str, end: int) -> None:
        """Refuse to read a file that is no longer the one planned (the header's offsets no longer hold)."""
        now = os.fstat(fd)
        was = self.planned
        if (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino) or now.st_nlink < was.st_nlink:
            # another inode under the name, or the planned one unlinked (replaced while held open)
            raise CheckpointError(self.path, "was replaced by another file since it was planned; refused")
        if now.st_size < end:
            raise CheckpointError(
                self.path,
                f"file ends inside tensor {name!r} (truncated? {was.st_size} bytes when planned, "
                f"{now.st_size} now)",
            )
        if changed_since(now, was):
            raise CheckpointError(
                self.path,
                f"was modified since it was planned ({was.st_size} -> {now.st_size} bytes); refused",
            )

    def close(self) -> None:
        POOL.close(self._pooled)


def changed_since(now: os.stat_result, planned: os.stat_result) -> bool:
    """Whether the same file (device and inode already compared) was written to since ``planned``: its
    size, modification time or change time moved (``st_ctime_ns`` cannot be set back by the writer)."""
    return (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
        planned.st_size,
        planned.st_mtime_ns,
        planned.st_ctime_ns,
    )


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    if too_many_open(exc):
        return CheckpointError(path, f"cannot be opened: {too_many_open_words()}")
    return CheckpointError(path, f"cannot be read ({exc.strerror or exc})")
