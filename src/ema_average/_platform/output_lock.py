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

from ema_average._platform import fs
from ema_average.errors import OutputError

# An output's lock files (see OutputLock), one per user: left behind only by a killed run, removed by the
# next run of that user. Without "-uUID": an earlier version's, one for every user.
_LOCK_PATTERN = re.compile(r"^\..+\.ema-average(?:-u\d+)?\.lock$")


# --- One writer per output --------------------------------------------------------------------------

_held: dict[str, OutputLock] = {}  # the locks this process holds, by key
_held_guard = threading.Lock()


class OutputLock:
    """The right to write one output, held by one run at a time: ``OutputLock(path)`` takes it or raises.

    An ``flock`` on a hidden ``.NAME.ema-average-uUID.lock`` beside the output (in its folder's real path,
    so two spellings of one output share it; a long NAME is cut and hashed, see ``fs.hidden_stem``): the
    kernel frees it when its holder dies, however it dies, and release removes the file (one left by a
    killed run is free, and the next run of that user takes it and removes it). Only a run of this user
    can hold it: the file is created ``0600`` without following a link, and used only if it is a regular
    file this user owns; anything else at that name (a link, a FIFO, another user's file) is refused,
    saying what it is. So a local user who cannot write the output cannot block it either (an abstract
    socket name, which anyone can bind, could); one who can write its folder is named, not guessed at.

    One file per user, because in a shared sticky folder (``/tmp``, mode 1777) no user can remove or open
    another's 0600 file: a single name would let a killed run of one user block every other user's run
    on that output for good. Runs of different users still exclude each other: having taken its own lock,
    a run looks for the other users' lock files of this output (and an earlier version's
    ``.NAME.ema-average.lock``) and refuses if the kernel lists one as held (``/proc/locks``); two that
    start together may both refuse, never both proceed. One that is held names its holder's process where
    the kernel says. A killed run's lock file of another user blocks nothing (and stays until its owner's
    next run, or root, removes it); where ``/proc/locks`` cannot be read, it is named as what to remove.

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
        lock_file = fs.hidden_name(target, f".ema-average-u{os.geteuid()}.lock")
        for _ in range(100):
            fd = _open_lock_file(self.path, lock_file)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                listed = _listed_holder(os.fstat(fd))
                os.close(fd)
                raise OutputError(f"{self.path}: locked by {_by(listed)} (it holds {lock_file})") from None
            if _same_file(fd, lock_file):  # else its holder removed it between our open and flock
                try:
                    _refuse_other_users_holders(self.path, target, lock_file)
                except BaseException:
                    with contextlib.suppress(OSError):
                        lock_file.unlink()
                    os.close(fd)
                    raise
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
    if info.st_mode & 0o077:  # made readable (an earlier version made 0644 ones): anyone could flock it
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
        return (
            f"belongs to user {info.st_uid}, not to this one ({os.geteuid()}), though named for this "
            "user's runs; remove it (its owner or root can)"
        )
    return None


def _refuse_other_users_holders(path: Path, target: Path, own: Path) -> None:
    """Refuse if another user's run (or an earlier version's) holds a lock file of this output, as the
    kernel lists it; one of theirs that no process holds (a killed run's) is passed over."""
    for other in _other_lock_files(target, own):
        try:
            info = os.lstat(other)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):  # never a lock file of ours: no run holds it
            continue
        listed = _listed_holder(info)
        if listed is None:
            raise OutputError(
                f"{path}: {other}, a lock file of user {info.st_uid}, may be held by a run of that user "
                "(no /proc/locks to tell); if none is writing this output, remove it (its owner or root can)"
            )
        if listed[0]:
            raise OutputError(f"{path}: locked by {_by(listed)} of user {info.st_uid} (it holds {other})")


def _other_lock_files(target: Path, own: Path) -> list[Path]:
    """Lock files of ``target`` other than ``own``: other users' and an earlier version's. In a folder this
    user may write but not list, only the earlier version's name can be looked at."""
    stem = re.escape(fs.hidden_stem(target.name))
    pattern = re.compile(rf"^\.{stem}\.ema-average(?:-u\d+)?\.lock$")
    legacy = target.parent / f".{target.name}.ema-average.lock"
    try:
        with os.scandir(target.parent) as entries:
            names = [e.name for e in entries if e.name != own.name and pattern.match(e.name)]
    except OSError:
        return [legacy]
    return [target.parent / name for name in names]


def _listed_holder(info: os.stat_result) -> tuple[bool, int | None] | None:
    """Whether the kernel lists an flock on the file ``info`` describes in ``/proc/locks``, and its
    holder's PID as this process sees it (None where it is not known); None where ``/proc/locks`` cannot
    be read. A holder in another PID namespace is not listed."""
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 24).splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" in field 2
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            return True, (int(fields[4]) or None) if fields[4].isdigit() else None
    return False, None


def _by(listed: tuple[bool, int | None] | None) -> str:
    holder = listed[1] if listed is not None else None
    return f"process {holder}" if holder is not None else "another process"


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
