"""How many files a folder output keeps open, and the pool that keeps it to that.

A folder output may have thousands of shards; each is open only while written to, so a run fits the
usual ``ulimit -n``. Apart from ``folder`` because ``file``'s writer reopens its shard through the pool.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ema_average.errors import OutputError

# Shard files a folder output keeps open at once (each reopened when written to again): a folder of 1,500
# shards fits ``ulimit -n 1024``, and streaming writes the shards in order, so few are ever reopened.
_MAX_OPEN_SHARDS = 8
# Descriptors left for everything else while a folder is written: checkpoints reopened, a read-back,
# libraries' own files.
_FILES_KEPT_FREE = 16


class OpenFiles:
    """At most ``limit`` files open for writing at once, by path: ``use`` reopens one closed before (the
    least recently used idle one makes room), waiting while every open one is in use by another thread."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        self._users: dict[Path, int] = {}
        self._closing: set[Path] = set()  # to close once their last user is done
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def use(self, path: Path) -> Iterator[int]:
        fd = self._acquire(path)
        try:
            yield fd
        finally:
            with self._changed:
                self._users[path] -= 1
                if not self._users[path]:
                    del self._users[path]
                    if path in self._closing:
                        self._close_now(path)
                self._changed.notify_all()

    def _acquire(self, path: Path) -> int:
        with self._changed:
            while path not in self._open:
                if len(self._open) < self._limit or self._make_room():
                    self._open[path] = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    break
                self._changed.wait()
            self._open.move_to_end(path)
            self._closing.discard(path)
            self._users[path] = self._users.get(path, 0) + 1
            return self._open[path]

    def _make_room(self) -> bool:
        idle = next((path for path in self._open if path not in self._users), None)
        if idle is not None:
            self._close_now(idle)
        return idle is not None

    def close(self, path: Path) -> None:
        """Close ``path`` (once its users are done): its file is finished, or abandoned."""
        with self._changed:
            if path in self._users:
                self._closing.add(path)
            elif path in self._open:
                self._close_now(path)
            self._changed.notify_all()

    def close_all(self) -> None:
        with self._changed:
            for path in list(self._open):
                self._close_now(path)
            self._users.clear()

    def _close_now(self, path: Path) -> None:
        self._closing.discard(path)
        with contextlib.suppress(OSError):
            os.close(self._open.pop(path))


def shard_files_limit(path: Path) -> int:
    """How many shard files writing ``path`` may keep open; refused up front where even one would leave
    too few descriptors for the rest of the run (``ulimit -n``)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return _MAX_OPEN_SHARDS  # no way to count here: the plain bound
    if soft == resource.RLIM_INFINITY:
        return _MAX_OPEN_SHARDS
    spare = soft - in_use - _FILES_KEPT_FREE - 1  # the staging folder's own
    if spare < 1:
        raise OutputError(
            f"{path}: too few open files allowed (ulimit -n {soft}, {in_use} in use): writing a folder "
            f"output needs {in_use + _FILES_KEPT_FREE + 2}; raise ulimit -n"
        )
    return min(_MAX_OPEN_SHARDS, spare)
