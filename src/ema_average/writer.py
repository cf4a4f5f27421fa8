"""A streaming safetensors writer: header first, tensors as they are ready, the final name only at the end.

Hand-written because the safetensors library only saves a complete dict of tensors held in memory; an
average of a model larger than memory is finished group by group. The layout follows the format's
spec and the library's own choices (compact JSON, tensors ordered by dtype then name, header padded with
spaces to 8 bytes), so the bytes equal ``safetensors.torch.save_file``'s for the same tensors (the
library orders several metadata keys as a hash map does, so only their order can differ).

A file output is written to a temporary file in its own folder, reserved to its full size up front (a
full disk fails before the work, not after), fsynced, read back with the safetensors library, and only
then given its final name: created exclusively (a file that appeared meanwhile is never replaced) unless
the caller asked to overwrite, then atomically replaced. On Linux the temporary file is unnamed
(``O_TMPFILE``) until commit, so even a run killed with SIGKILL leaves nothing behind; elsewhere it is a
hidden named file, removed on abort, and one left by a killed run is removed by the next run.

A sharded output is a folder (Hugging Face ``save_pretrained`` layout) built whole as a hidden staging
folder beside the target and switched in with one rename; see ``ShardedWriter``.

Only one run may write an output at a time: see ``OutputLock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open

from ema_average.checkpoints.safetensors_file import TOOL_MARKER_KEY
from ema_average.errors import CheckpointError, OutputError
from ema_average.libc import libc_call
from ema_average.safetensors_format import (
    DTYPE_NAMES,
    TensorEntry,
    TensorSpec,
    build_header,
    name_problem,
    read_header,
    safetensors_order,
    utf8_problem,
)
from ema_average.signals import deferred

__all__ = [
    "OutputLock",
    "SafetensorsWriter",
    "ShardedWriter",
    "TensorEntry",
    "TensorSpec",
    "name_problem",
    "remove_stale_temporaries",
    "temp_name",
]

# Temporary files and staging folders: ``.NAME.ema-average-PID.tmp``. Nothing else is ever removed.
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.ema-average-(?P<pid>\d+)\.tmp$")
# An output's lock file (see OutputLock): left behind only by a killed run, removed by the next.
_LOCK_PATTERN = re.compile(r"^\..+\.ema-average\.lock$")
# link() fails with these where the filesystem has no hard links (FAT, exFAT, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_MAX_INDEX_BYTES = 100_000_000


def _check_entries(path: Path, entries: Sequence[TensorEntry]) -> None:
    """Refuse, before any file exists, what would make an unreadable or wrong header."""
    seen: set[str] = set()
    for e in entries:
        problem = name_problem(e.name)
        if problem is None and e.name in seen:
            problem = "the name is listed twice"
        if problem is None and e.dtype not in DTYPE_NAMES:
            problem = f"dtype {e.dtype} has no safetensors name"
        if problem is None and not all(isinstance(d, int) and d >= 0 for d in e.shape):
            problem = f"shape {e.shape} is not a list of sizes"
        if problem is not None:
            raise OutputError(f"{path}: tensor {e.name!r} cannot be written to safetensors: {problem}")
        seen.add(e.name)


def _check_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        ok = isinstance(key, str) and isinstance(value, str)
        if not ok or utf8_problem(key) or utf8_problem(value):
            raise OutputError(f"{path}: metadata {key!r} is not a string UTF-8 can encode")


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


def _writer_lock(path: Path) -> OutputLock | None:
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
        match = _TEMP_PATTERN.match(path.name)
        if not match or path.is_symlink() or _pid_alive(int(match.group("pid"))) or _in_use(path):
            continue
        with contextlib.suppress(OSError):
            _remove(path)
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


def temp_name(path: Path, pid: int) -> Path:
    """The hidden name of ``path``'s temporary file or staging folder while process ``pid`` writes it
    (``remove_stale_temporaries`` removes it once that process is gone)."""
    return path.parent / f".{path.name}.ema-average-{pid}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_leftover(path: Path) -> None:
    """Remove a temporary name of ours (our PID in it) that no live writer holds: only a dead process
    that had our PID can have left it, since this process holds the output's lock."""
    if os.path.lexists(path) and not _in_use(path):
        with contextlib.suppress(OSError):
            _remove(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(path: Path) -> bool:
    """Whether a live writer holds ``path``'s flock: seen across PID namespaces, where a PID is not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


# --- One file ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _or_abort(path: Path, abort: Callable[[], None]) -> Iterator[None]:
    """Run a commit; on any failure (Ctrl-C included) abort, so nothing is left, and say it in one line."""
    try:
        yield
    except OutputError:
        abort()
        raise
    except OSError as exc:
        abort()
        raise OutputError(f"{path}: cannot commit ({exc.strerror or exc})") from exc
    except BaseException:
        abort()
        raise


class SafetensorsWriter:
    """One safetensors file, written in any tensor order to a temporary file and committed at once.

    ``lock=False`` is for a caller that already guarantees no other writer (``ShardedWriter``'s private
    staging folder).

    ``files`` (``ShardedWriter``'s shards) writes the file at its own name, and opens it only while writing
    to it, through a set that bounds how many are open at once; its name is the folder's to give.

    Several processes can write one file (``torchrun``: each rank its own byte ranges): one writer made
    with ``shared=True`` creates a named temporary (``temp_name(path, its PID)``: other processes, even on
    other hosts, can open it, where an unnamed one could not), reserves it and writes the header; each
    other process opens it with ``join=`` that name and the same entries and metadata, writes its ranges
    and calls ``flush``; once all have, the shared writer's ``written_elsewhere`` and ``commit`` name it.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool,
        lock: bool = True,
        shared: bool = False,
        join: Path | None = None,
        files: _OpenFiles | None = None,
    ) -> None:
        self.path = path
        self._overwrite = overwrite
        _check_entries(path, entries)
        _check_metadata(path, metadata)
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name ending .safetensors")
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        self.entries = safetensors_order(entries)
        self._metadata = dict(metadata or {})
        self._header, self._offsets = build_header(self.entries, metadata)
        self._sizes = {e.name: e.nbytes for e in self.entries}
        self._dtypes = {e.name: e.dtype for e in self.entries}
        self._pending = set(self._sizes)
        self._unwritten = dict(self._sizes)  # bytes of each tensor not yet written in pieces
        self._dirty = 0  # bytes written since writeback was last started
        self._guard = threading.Lock()
        self.data_size = sum(self._sizes.values())  # tensor bytes alone: an index's total_size
        self.size = len(self._header) + self.data_size
        self._files = files
        self.temp_path = join or (path if files is not None else temp_name(path, os.getpid()))
        self._fd: int | None = None
        self._anonymous = False
        self._named_temp = False  # temp_path is ours to remove
        self._sealed = False  # fsynced and read back: only the name is left to give
        self._joined = join is not None
        self._lock = _writer_lock(path) if lock and join is None else None
        try:
            if join is not None:
                self._open_joined()
            else:
                self._open_temporary(named=shared or files is not None)
                self._reserve()
                self._pwrite(memoryview(self._header), 0)
                if files is not None:  # reopened through ``files`` while written to
                    os.close(self._fd)  # type: ignore[arg-type]
                    self._fd = None
        except BaseException:
            self.abort()
            raise

    @property
    def paths(self) -> list[Path]:
        """The files the commit makes visible (as ``ShardedWriter.paths``: both writers answer alike)."""
        return [self.path]

    def _open_temporary(self, *, named: bool) -> None:
        fd = None if named else _open_anonymous(self.path.parent)
        self._anonymous = fd is not None
        if fd is None:
            _remove_leftover(self.temp_path)
            try:
                fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.temp_path}: cannot be created ({exc.strerror})") from exc
            self._named_temp = True
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells remove_stale_temporaries it is in use
        self._fd = fd

    def _open_joined(self) -> None:
        """Open another process's shared temporary, checked to be the same layout (size and header)."""
        try:
            fd = os.open(self.temp_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise OutputError(f"{self.temp_path}: cannot be opened to write into ({exc.strerror})") from exc
        self._fd = fd
        size = os.fstat(fd).st_size
        header = os.pread(fd, len(self._header), 0) if size == self.size else b""
        if header != self._header:
            raise OutputError(
                f"{self.temp_path}: is not the file this process would write ({size} bytes, expected "
                f"{self.size} with the same header)"
            )

    def flush(self) -> None:
        """fsync this process's writes and close the file: for a writer made with ``join``, its last step
        (the shared writer commits once every process has flushed)."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot write to disk ({exc.strerror})") from exc
        if self._joined:
            os.close(self._fd)
            self._fd = None

    def written_elsewhere(self) -> None:
        """Count every tensor as written: the other processes that joined this file wrote the rest and
        flushed (the caller has their word for it)."""
        with self._guard:
            self._pending.clear()
            self._unwritten = dict.fromkeys(self._unwritten, 0)

    def _reserve(self) -> None:
        assert self._fd is not None
        try:
            os.posix_fallocate(self._fd, 0, self.size)
        except AttributeError:  # not on macOS: sparse file, a full disk shows at write time instead
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot reserve {self.size} bytes ({exc.strerror})") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any device; moved to the CPU) at its place in the file."""
        data = self._expected(name, tensor)
        if data.nbytes != self._sizes[name]:
            raise OutputError(
                f"{self.path}: tensor {name!r} has {data.nbytes} bytes, header says {self._sizes[name]}"
            )
        self._put(name, data, 0)

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write elements ``start ..`` of tensor ``name`` (flattened) at their place in the file.

        For a tensor streamed in pieces, from any number of threads at once (``pwrite`` uses no file
        position). It counts as written once pieces covering all its bytes have come; they must not overlap.
        """
        data = self._expected(name, tensor)
        first = start * data.element_size()
        if data.dtype != self._dtypes[name] or start < 0 or first + data.nbytes > self._sizes[name]:
            raise OutputError(
                f"{self.path}: tensor {name!r}: {data.numel()} {data.dtype} elements from {start} do not fit "
                f"its {self._sizes[name]} bytes of {self._dtypes[name]}"
            )
        self._put(name, data, first)

    def _expected(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the CPU, contiguous, if ``name`` is still to be written."""
        if name not in self._pending:
            raise OutputError(f"{self.path}: tensor {name!r} is not expected or was already written")
        return tensor.detach().to("cpu").contiguous()

    def _put(self, name: str, data: torch.Tensor, first: int) -> None:
        """``data``'s bytes at byte ``first`` of tensor ``name`` in the file, counted as written."""
        if data.nbytes:
            self._pwrite(
                memoryview(data.reshape(-1).view(torch.uint8).numpy()),
                len(self._header) + self._offsets[name] + first,
            )
        self._wrote(name, data.nbytes)

    def _wrote(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` of ``name`` as written; every few MiB, start writing them to disk. A file of
        ``files`` is closed once every tensor is in it."""
        with self._guard:
            self._unwritten[name] -= nbytes
            if self._unwritten[name] <= 0:
                self._pending.discard(name)
            self._dirty += nbytes
            kick = self._dirty >= _WRITEBACK_BYTES
            if kick:
                self._dirty = 0
            finished = not self._pending
        if finished and self._files is not None:
            self._files.close(self.temp_path)
        elif kick:
            with self._io() as fd:
                _start_writeback(fd)

    @contextlib.contextmanager
    def _io(self) -> Iterator[int]:
        """The file's descriptor for one operation: this writer's own, or one that ``files`` opens."""
        if self._fd is not None or self._files is None:
            assert self._fd is not None
            yield self._fd
            return
        with self._files.use(self.temp_path) as fd:
            yield fd

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        try:
            with self._io() as fd:
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from exc

    def commit(self) -> None:
        """fsync, read back, and name: the output appears whole or not at all; on failure nothing is left."""
        self.seal()
        self.publish()

    def seal(self) -> None:
        """The part of the commit that a disk can fail (fsync, the read-back), with no name given yet: a run
        of several outputs seals every one before it names any, so a full disk leaves none of them."""
        if self._joined:
            raise OutputError(f"{self.path}: only the process that made the shared file commits it")
        if self._pending:
            raise OutputError(f"{self.path}: {len(self._pending)} tensors were never written")
        with _or_abort(self.path, self.abort):
            with self._io() as fd:
                os.fsync(fd)
                readable = f"/proc/self/fd/{fd}" if self._anonymous else str(self.temp_path)
                _verify_written(readable, self.path, self.entries, self._metadata)
            if self._files is not None:
                self._files.close(self.temp_path)
        self._sealed = True

    def publish(self) -> None:
        """Name the sealed file: the output appears, whole."""
        if not self._sealed:
            raise OutputError(f"{self.path}: named before it was sealed")
        with _or_abort(self.path, self.abort):
            self._name()
        self._release()

    def _name(self) -> None:
        if self._files is not None:  # at its name already, in a folder whose rename is the commit
            self._named_temp = False
            return
        assert self._fd is not None
        if self._anonymous:  # give the unnamed file a name only now that it is whole
            os.fchmod(self._fd, 0o644)
            self._name_anonymous(self._fd)
        elif self._overwrite:
            os.replace(self.temp_path, self.path)
        else:
            _link_exclusive(self.temp_path, self.path)
        self._named_temp = False  # renamed, or linked and unlinked
        os.close(self._fd)
        self._fd = None
        _fsync_folder(self.path.parent)

    def _name_anonymous(self, fd: int) -> None:
        if self._overwrite:
            _remove_leftover(self.temp_path)
            self._named_temp = True
            _link_anonymous(fd, self.temp_path)
            os.replace(self.temp_path, self.path)
            return
        try:  # linkat creates the name or fails: it never replaces
            _link_anonymous(fd, self.path)
        except FileExistsError:
            raise _appeared(self.path) from None

    def abort(self) -> None:
        """Remove the temporary file; the output (if any existed) is untouched."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._files is not None:
            self._files.close(self.temp_path)
        if self._named_temp:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()
            self._named_temp = False
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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


# Written bytes after which the disk is asked to start on them: measured on the offline benchmark (4 x 200 MB
# fp32), execute 0.265 s without, 0.200 s with 8 MiB, 0.229 s with 32 MiB (medians of 8, interleaved).
_WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int | None) -> None:
    """Start writing the file's dirty pages to disk now, without waiting for them (Linux
    ``sync_file_range``): the disk then works while the rest is computed, and the commit's fsync finds
    little left to do. Elsewhere a no-op."""
    call = _libc_sync_file_range()
    if call is not None and fd is not None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure here is found by the commit's fsync


def _libc_sync_file_range() -> Callable[..., int] | None:
    return libc_call("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _appeared(path: Path) -> OutputError:
    return OutputError(f"{path}: appeared while this run was writing; nothing was replaced")


def _open_anonymous(folder: Path) -> int | None:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``), or None where the OS or filesystem lacks it."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def _link_anonymous(fd: int, target: Path) -> None:
    """Name an O_TMPFILE file: linkat(AT_SYMLINK_FOLLOW) through /proc (os.link uses plain link()
    unless a directory fd is given, and plain link() does not follow the /proc magic link)."""
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), target, src_dir_fd=proc_fds, follow_symlinks=True)
    finally:
        os.close(proc_fds)


def _link_exclusive(temp: Path, final: Path) -> None:
    """Give a named temporary file its final name only if that name is free (link fails, never replaces)."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise _appeared(final) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links on this filesystem: a checked rename. A file created at ``final`` between the
        # check and the rename would still be replaced; no portable call closes that window here.
        if os.path.lexists(final):
            raise _appeared(final) from None
        os.rename(temp, final)
        return
    with contextlib.suppress(OSError):  # committed already; a name left here is removed as stale
        temp.unlink()


def _verify_written(
    readable: str, path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str]
) -> None:
    """Read the written header back with the safetensors library: what a user's ``load_file`` sees."""
    try:
        with safe_open(readable, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            found = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in names}
            found_metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise OutputError(
            f"{path}: the written file does not read back ({exc}); nothing was committed"
        ) from exc
    expected = {e.name: (DTYPE_NAMES[e.dtype], e.shape) for e in entries}
    if found != expected or found_metadata != metadata:
        wrong = sorted(set(found.items()) ^ set(expected.items()))
        what = f"tensor {wrong[0][0]!r}" if wrong else "its metadata"
        raise OutputError(
            f"{path}: the written header does not match the tensors ({what}); nothing was committed"
        )


def _fsync_folder_fd(fd: int) -> None:
    """fsync a folder; a filesystem that cannot (EINVAL) makes it a no-op, any other failure raises."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise


def _fsync_folder(folder: Path) -> None:
    """Best effort, after a rename that cannot be undone any more."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- A folder of shards -----------------------------------------------------------------------------

# Shard files a folder output keeps open at once (each reopened when written to again): a folder of 1,500
# shards fits ``ulimit -n 1024``, and streaming writes the shards in order, so few are ever reopened.
_MAX_OPEN_SHARDS = 8
# Descriptors left for everything else while a folder is written: checkpoints reopened, a read-back,
# libraries' own files.
_FILES_KEPT_FREE = 16


class _OpenFiles:
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


def _shard_files_limit(path: Path) -> int:
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


class ShardedWriter:
    """A Hugging Face style output folder, built whole beside its target and switched in by one rename.

    ``FOLDER/model.safetensors`` when every tensor fits one shard of ``max_shard_size`` bytes (a larger
    tensor gets a shard of its own), else ``FOLDER/model-00001-of-0000N.safetensors`` and
    ``FOLDER/model.safetensors.index.json``; ``weights_name`` changes ``model.safetensors`` (say to
    ``adapter_model.safetensors``). ``add_file`` puts small side files (a config) beside the weights.

    Each shard file is open only while written to, at most ``_MAX_OPEN_SHARDS`` at once, so thousands of
    shards fit the usual ``ulimit -n``; a limit too tight even for that is refused before anything is
    written.

    Everything is written into ``PARENT/.FOLDER.ema-average-PID.tmp/``, each file fsynced, then the
    staging folder, then one atomic switch: a new target is created with ``renameat2(RENAME_NOREPLACE)``
    (one that appeared meanwhile is never replaced), an existing one, with ``overwrite``, is swapped
    with ``renameat2(RENAME_EXCHANGE)`` and the old folder, now at the staging name, removed. A reader
    sees the old folder or the new one, never a mix; a kill at any point leaves the target as it was or
    complete, and a staging folder the next run's ``remove_stale_temporaries`` removes. An existing
    target is replaced only if it is an ema-average output: every entry a ``*.safetensors`` or
    ``*.safetensors.index.json`` whose metadata has ``ema_average_version``, or a side file named in
    ``side_files`` (declare them up front) or added with ``add_file``.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool,
        max_shard_size: int,
        weights_name: str = "model.safetensors",
        side_files: Collection[str] = (),
    ) -> None:
        self.path = path
        self._overwrite = overwrite
        self._metadata = dict(metadata or {})
        if not _plain_name(weights_name) or not weights_name.endswith(".safetensors"):
            raise OutputError(f"{weights_name!r}: weights_name must be a plain file name ending .safetensors")
        _check_entries(path, entries)
        _check_metadata(path, metadata)
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        self._side_files = set(side_files)
        self._check_target()
        shards = _split(safetensors_order(entries), max_shard_size)
        self._names = _shard_names(weights_name, len(shards))
        self._index_name = f"{weights_name}.index.json" if len(shards) > 1 else None
        self._added: list[str] = []
        self.staging = temp_name(path, os.getpid())
        self._staging_fd: int | None = None
        self._made_staging = False
        self._sealed = False
        self._committed = False
        self.writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        self._files = _OpenFiles(_shard_files_limit(path))
        self._lock = _writer_lock(path)
        try:
            self._make_staging()
            for name, shard in zip(self._names, shards, strict=True):
                writer = SafetensorsWriter(
                    self.staging / name, shard, metadata, overwrite=False, lock=False, files=self._files
                )
                self.writers.append(writer)
                self._route.update({e.name: writer for e in shard})
        except BaseException:
            self.abort()
            raise

    def _check_target(self) -> None:
        """Refuse up front what commit would refuse: an existing target without overwrite, or not ours."""
        if not os.path.lexists(self.path):
            return
        if not self._overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        problem = _not_an_output(self.path, self._side_files)
        if problem is not None:
            raise OutputError(f"{self.path}: is not an ema-average output ({problem}); remove it yourself")

    def _make_staging(self) -> None:
        _remove_leftover(self.staging)
        try:
            os.mkdir(self.staging)
        except OSError as exc:
            raise OutputError(f"{self.staging}: cannot be created ({exc.strerror})") from exc
        self._made_staging = True
        self._staging_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._staging_fd, fcntl.LOCK_EX)  # tells remove_stale_temporaries it is in use

    @property
    def paths(self) -> list[Path]:
        """The files the output folder holds once committed: shards, index, side files."""
        index = [self._index_name] if self._index_name else []
        return [self.path / name for name in [*self._names, *index, *self._added]]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._shard(name).write(name, tensor)

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Elements ``start ..`` of tensor ``name``, into its shard (see ``SafetensorsWriter.write_range``)."""
        self._shard(name).write_range(name, start, tensor)

    def _shard(self, name: str) -> SafetensorsWriter:
        """The writer of the shard that holds tensor ``name``."""
        writer = self._route.get(name)
        if writer is None:
            raise OutputError(f"{self.path}: tensor {name!r} is not expected")
        return writer

    def add_file(self, name: str, data: bytes) -> None:
        """A small side file (a config, say) to appear in the output folder with the weights."""
        reserved = {*self._names, self._index_name, *self._added}
        if not _plain_name(name) or name.startswith(".") or name in reserved or _weights_like(name):
            raise OutputError(f"{self.path}: {name!r} cannot be a side file (a plain, new, non-weights name)")
        try:
            _write_new_file(self.staging / name, data)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write {name} ({exc.strerror})") from exc
        self._added.append(name)
        self._side_files.add(name)

    def commit(self) -> None:
        """Finish every file in the staging folder, then switch it in; on failure the target is as it was."""
        self.seal()
        self.publish()

    def seal(self) -> None:
        """Every file finished inside the hidden staging folder (the part a disk can fail); see
        :meth:`SafetensorsWriter.seal`."""
        with _or_abort(self.path, self.abort):
            for writer in self.writers:
                writer.commit()
            if self._index_name is not None:  # a reader that finds the index finds every shard
                _write_new_file(self.staging / self._index_name, self._index())
            assert self._staging_fd is not None
            _fsync_folder_fd(self._staging_fd)
        self._sealed = True

    def publish(self) -> None:
        """Switch the sealed staging folder in: the one step a reader can see."""
        if not self._sealed:
            raise OutputError(f"{self.path}: named before it was sealed")
        with _or_abort(self.path, self.abort):
            self._switch()
        self._close()

    def _index(self) -> bytes:
        index = {
            "metadata": {"total_size": sum(w.data_size for w in self.writers), **self._metadata},
            "weight_map": {name: w.path.name for name, w in self._route.items()},
        }
        return (json.dumps(index, indent=2) + "\n").encode()

    def _switch(self) -> None:
        """The one step a reader can see: the staging folder becomes the target."""
        if not os.path.lexists(self.path):
            try:
                _rename_noreplace(self.staging, self.path)
            except FileExistsError:
                raise _appeared(self.path) from None
            self._committed = True
            _fsync_folder(self.path.parent)
            return
        if not self._overwrite:
            raise _appeared(self.path)
        self._check_target()  # again: what is about to be deleted must be ours now, not at the start
        _exchange(self.staging, self.path)
        self._committed = True
        _fsync_folder(self.path.parent)
        shutil.rmtree(self.staging, ignore_errors=True)  # the old output; a kill here leaves it stale

    def abort(self) -> None:
        """Remove the staging folder; the target (if any existed) is untouched. Nothing after commit."""
        for writer in self.writers:
            writer.abort()
        if self._made_staging and not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        self._files.close_all()
        if self._staging_fd is not None:
            os.close(self._staging_fd)
            self._staging_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _split(ordered: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    shards: list[list[TensorEntry]] = [[]]
    used = 0
    for e in ordered:
        if shards[-1] and used + e.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += e.nbytes
    return shards


def _shard_names(weights_name: str, count: int) -> list[str]:
    if count == 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _plain_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and "/" not in name and "\0" not in name


def _weights_like(name: str) -> bool:
    return name.endswith((".safetensors", ".index.json"))


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _not_an_output(folder: Path, side_files: Collection[str]) -> str | None:
    """Why ``folder`` is not an output this writer may replace; None when every entry is one it writes."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    weights = 0
    side = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            return f"{entry.name} is not a plain file"
        if entry.name in side_files and not _weights_like(entry.name):
            side += 1
        elif _marked(Path(entry.path)):
            weights += 1
        else:
            return f"it holds {entry.name}"
    if side and not weights:
        return "it holds no ema-average weights"
    return None


def _marked(path: Path) -> bool:
    """A weights file or index this tool wrote: its metadata carries the tool's marker key."""
    if path.name.endswith(".safetensors.index.json"):
        try:
            with open(path, "rb") as f:
                index = json.loads(f.read(_MAX_INDEX_BYTES))
        except (OSError, ValueError):
            return False
        return (
            isinstance(index, dict)
            and isinstance(index.get("metadata"), dict)
            and TOOL_MARKER_KEY in index["metadata"]
        )
    if path.name.endswith(".safetensors"):
        try:
            return TOOL_MARKER_KEY in read_header(path).metadata
        except CheckpointError:
            return False
    return False


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (FileExistsError otherwise)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    # No renameat2 here: check, then rename. Something created at ``dst`` between the two is replaced
    # only if it is an empty folder (rename onto a non-empty folder or a file fails).
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from exc
        raise


def _exchange(new: Path, old: Path) -> None:
    """Put the folder ``new`` at ``old``'s name and the old folder at ``new``'s name."""
    if _renameat2(new, old, _RENAME_EXCHANGE):
        return
    # No renameat2 here: old aside, new in, old to new's name. Between the first two renames the target
    # is missing; a run killed there leaves the old output at ``.FOLDER.ema-average-PID.old`` (never
    # removed automatically) and the target absent.
    aside = old.parent / f".{old.name}.ema-average-{os.getpid()}.old"
    os.rename(old, aside)
    try:
        os.rename(new, old)
    except BaseException:
        os.rename(aside, old)
        raise
    os.rename(aside, new)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2`` (Python has no binding, so through libc with ctypes); False where it or the
    flag is missing (not Linux, glibc < 2.28, an old kernel, or a filesystem without the flag)."""
    call = _libc_renameat2()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _libc_renameat2() -> Callable[..., int] | None:
    return libc_call("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
