"""One pool of open files for the whole process: checkpoints read with ``pread`` and shards written with
``pwrite`` take their descriptors from it.

A run may read thousands of checkpoints (or DCP data files) and write a folder output of thousands of
shards; each file keeps its descriptor only while in use or among the most recently used, and is opened
again on its next use, so the run fits the usual ``ulimit -n``. One bound for both: :func:`pooled_limit`.
Whoever uses a pooled file checks that it is still the file meant (readers compare identity at every
read: ``checkpoints/reading/positioned.py``; writers open their own staging files without following
links).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ema_average.errors import OutputError

# The most descriptors the pool keeps, whatever ``ulimit -n`` allows: more buys nothing (streaming reads
# the checkpoints in turn and writes the shards in order, so few are ever reopened).
_MOST_POOLED = 256
# The fewest: a run reads several checkpoints at a time (the plan's look at each, then the pass).
_FEWEST_POOLED = 4
# Descriptors left for everything else while a folder is written: checkpoints reopened, a read-back,
# libraries' own files.
_FILES_KEPT_FREE = 16

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # flags Windows lacks are 0 there: checkpoints are still read
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC  # a FIFO swapped in never blocks
_WRITE_FLAGS = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC  # a staging file of ours: no link


def soft_limit() -> int | None:
    """This process's limit on open files (``ulimit -n``), or None where there is none or it is unknown."""
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def pooled_limit() -> int:
    """How many files the pool keeps open at once, read and written together: a quarter of
    ``ulimit -n`` (the rest is left to outputs' own files, libraries, the interpreter), between 4 and 256.
    A file in use is never closed: past the bound, at most one more per thread using a file."""
    soft = soft_limit()
    if soft is None:
        return _MOST_POOLED
    return max(_FEWEST_POOLED, min(_MOST_POOLED, soft // 4))


def too_many_open(exc: OSError) -> bool:
    """Whether ``exc`` says the process or the system has no descriptor left."""
    return exc.errno in (errno.EMFILE, errno.ENFILE)


def too_many_open_words() -> str:
    """The end of an error line for :func:`too_many_open`: what the limit is and what to do."""
    soft = soft_limit()
    limit = f" (ulimit -n is {soft})" if soft is not None else ""
    return f"too many open files{limit}; raise the limit"


class PooledFile:
    """A file opened through :data:`POOL`, for reading or for writing: its descriptor (``fd``) is open
    only while in use or kept by the pool, and opened again on the next use."""

    def __init__(self, path: Path, *, write: bool = False) -> None:
        self.path = path
        self.flags = _WRITE_FLAGS if write else _READ_FLAGS
        self.fd: int | None = None
        self.users = 0  # uses under way: the pool never closes a descriptor in use
        self.closing = False  # to close once its last user is done


def _open_descriptor(path: Path, flags: int) -> int:
    """The one ``open`` of the pool (a test replaces it to play a process out of descriptors)."""
    return os.open(path, flags)


class OpenFiles:
    """The open descriptors of every :class:`PooledFile`, at most :func:`pooled_limit` idle or in use
    (plus any in use at once past it, at most one per thread); the least recently used idle one is closed
    to make room. Where ``open`` finds no descriptor left (other parts of the process hold many), every
    idle one is given back and the open tried once more. One lock: files are used from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[PooledFile, None] = OrderedDict()  # least recently used first

    @contextlib.contextmanager
    def use(self, file: PooledFile) -> Iterator[int]:
        """``file``'s descriptor, held open while the caller uses it. Raises ``OSError`` where it cannot
        be opened (:func:`too_many_open` says whether for want of descriptors)."""
        fd = self.acquire(file)
        try:
            yield fd
        finally:
            self.release(file)

    def acquire(self, file: PooledFile) -> int:
        with self._lock:
            if file.fd is None:
                self._make_room(pooled_limit() - 1)
                file.fd = self._open_file(file)
            file.closing = False
            self._open[file] = None
            self._open.move_to_end(file)
            file.users += 1
            return file.fd

    def release(self, file: PooledFile) -> None:
        with self._lock:
            file.users -= 1
            if file.closing and file.users == 0:
                self._close(file)

    def close(self, file: PooledFile) -> None:
        """Close ``file`` (once its users are done): it is finished, or abandoned; a later use reopens it."""
        with self._lock:
            if file.users:
                file.closing = True  # closed by the last use under way
            elif file.fd is not None:
                self._close(file)

    def _make_room(self, keep: int) -> None:
        idle = [f for f in self._open if f.users == 0]
        for file in idle[: max(0, len(self._open) - keep)]:
            self._close(file)

    def _open_file(self, file: PooledFile) -> int:
        try:
            return _open_descriptor(file.path, file.flags)
        except OSError as exc:
            if not too_many_open(exc):
                raise
        self._make_room(0)  # other parts of the process hold many: give back every idle one, once
        return _open_descriptor(file.path, file.flags)

    def _close(self, file: PooledFile) -> None:
        self._open.pop(file, None)
        if file.fd is not None:
            with contextlib.suppress(OSError):
                os.close(file.fd)
            file.fd = None
        file.closing = False


POOL = OpenFiles()


def require_spare_descriptors(path: Path) -> None:
    """Refuse writing the folder output ``path`` up front where ``ulimit -n`` leaves too few descriptors
    for one shard beside the rest of the run (its staging folder, the files kept free)."""
    soft = soft_limit()
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return  # no way to count here: the pool's retry and its error line remain
    if soft is None:
        return
    if soft - in_use - _FILES_KEPT_FREE - 1 < 1:  # the staging folder's own, then one shard
        raise OutputError(
            f"{path}: too few open files allowed (ulimit -n {soft}, {in_use} in use): writing a folder "
            f"output needs {in_use + _FILES_KEPT_FREE + 2}; raise ulimit -n"
        )
