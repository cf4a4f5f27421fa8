"""One run per output: ``OutputLock``, and the removal of what killed runs left (``remove_stale_temporaries``).

A lock file and the leftovers of killed runs are one story: the lock file is itself left by a killed run,
and the next run's cleanup removes it only once it can take it. Kept apart from the writers, which only
take a lock (``writer_lock``) unless their caller already holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import stat
import threading
from pathlib import Path
from types import TracebackType

from ema_average.errors import OutputError
from ema_average.output import fs

# An output's lock file (see OutputLock): left behind only by a killed run, removed by the next.
_LOCK_PATTERN = re.compile(r"^\..+\.ema-average\.lock$")


# --- One writer per output --------------------------------------------------------------------------

_held: dict[str, OutputLock] = {}  # the locks this process holds, by key
_held_guard = threading.Lock()


class OutputLock:
    """The right to write one output, held by one run at a time: ``OutputLock(path)`` takes it or raises.

    An ``flock`` on a hidden ``.NAME.ema-average.lock`` beside the output (in its folder's real path, so two
    spellings of one output share it): the kernel frees it when its holder dies, however it dies, and
    release removes the file (one left by a killed run is free, and the next run on that output takes it
    and removes it). Only a run of this user can hold it: the file is created ``0600`` without following
    a link, and used only if it is a regular file this user owns; anything else at that name (a link, a
    FIFO, another user's file) is refused, saying what it is. So a local user who cannot write the output
    cannot block it either (an abstract socket name, which anyone can bind, could); one who can write its
    folder is named, not guessed at. A lock that is held names its holder's process where the kernel
    says (``/proc/locks``).

    Writers take the lock themselves, unless the caller already holds it in this process (the pipeline
    holds it for its whole run); a forked child shares its parent's lock until it exits.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.key = _lock_key(self.path)
        self._by_writer = False
        self._fd: int | None = None
        self._file: Path | None = None
        with _held_guard:
            self._flock()
            _held[self.key] = self

    def _flock(self) -> None:
        target = Path(os.path.realpath(self.path.parent)) / self.path.name
        lock_file = target.parent / f".{target.name}.ema-average.lock"
        for _ in range(100):
            fd = _open_lock_file(self.path, lock_file)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _flock_holder(fd)
                os.close(fd)
                by = f"process {holder}" if holder is not None else "another process"
                raise OutputError(f"{self.path}: locked by {by} (it holds {lock_file})") from None
            if _same_file(fd, lock_file):  # else its holder removed it between our open and flock
                self._fd, self._file = fd, lock_file
                return
            os.close(fd)
        raise OutputError(f"{self.path}: cannot take the output lock ({lock_file} keeps being replaced)")

    def release(self) -> None:
        """Give the output up (idempotent)."""
        with _held_guard:
            if _held.get(self.key) is self:
                del _held[self.key]
            if self._fd is not None:
                assert self._file is not None
                with contextlib.suppress(OSError):  # removed while still locked: a waiter re-checks
                    self._file.unlink()
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _open_lock_file(path: Path, lock_file: Path) -> int:
    """``lock_file`` opened to be flocked: created private, or an existing regular file of this user's
    (made private); anything else refused, saying what is there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
    try:
        fd = os.open(lock_file, flags, 0o600)
    except OSError as exc:
        problem = _lock_file_problem(lock_file) or exc.strerror
        raise OutputError(f"{path}: cannot take the output lock: {lock_file} {problem}") from None
    info = os.fstat(fd)
    problem = _not_ours(info)
    if problem is not None:
        os.close(fd)
        raise OutputError(f"{path}: cannot take the output lock: {lock_file} {problem}")
    if info.st_mode & 0o077:  # an earlier version's (0644): anyone could open it, and flock it
        os.fchmod(fd, 0o600)
    return fd


def _lock_file_problem(lock_file: Path) -> str | None:
    """What is at ``lock_file`` that could not be opened, if it explains why."""
    try:
        info = os.lstat(lock_file)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link, not a lock file; remove it"
    return _not_ours(info)


def _not_ours(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file; remove it"
    if info.st_uid != os.geteuid():
        return f"belongs to user {info.st_uid}, not to this one ({os.geteuid()})"
    return None


def _flock_holder(fd: int) -> int | None:
    """The process that holds an flock on ``fd``'s file, as the kernel lists it in ``/proc/locks`` (its
    PID as this process sees it), or None where that is not known."""
    info = os.fstat(fd)
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 24).splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" in field 2
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            return int(fields[4]) or None
    return None


def _lock_key(path: Path) -> str:
    try:
        folder = os.stat(path.parent)
    except OSError as exc:
        raise OutputError(f"{path.parent}: output folder does not exist") from exc
    raw = f"{folder.st_dev}:{folder.st_ino}:".encode() + os.fsencode(path.name)
    return hashlib.sha256(raw).hexdigest()[:32]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def writer_lock(path: Path) -> OutputLock | None:
    """A writer's own lock, or None when the caller holds this output's lock in this process."""
    with _held_guard:
        held = _held.get(_lock_key(path))
        if held is not None and not held._by_writer:
            return None
    lock = OutputLock(path)
    lock._by_writer = True
    return lock


# --- Leftovers of killed runs -----------------------------------------------------------------------


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files, staging folders and output locks of earlier runs that were killed (their process
    is gone)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if _LOCK_PATTERN.match(path.name):
            if _remove_free_lock_file(path):
                removed.append(path)
            continue
        match = fs.TEMP_PATTERN.match(path.name)
        if not match or path.is_symlink() or fs.pid_alive(int(match.group("pid"))) or fs.in_use(path):
            continue
        with contextlib.suppress(OSError):
            fs.remove_path(path)
            removed.append(path)
    return removed


def _remove_free_lock_file(path: Path) -> bool:
    """Remove an output lock file of this user's that no run holds, taking it first, as ``OutputLock``'s
    release does (a run that opened it meanwhile finds it gone once it has the flock, and makes another)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if _not_ours(os.fstat(fd)) is not None:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(fd, path):
            return False
        path.unlink()
        return True
    except OSError:  # held (BlockingIOError), or gone meanwhile
        return False
    finally:
        os.close(fd)
