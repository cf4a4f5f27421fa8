"""Platform calls and atomic naming: everything the writers ask of the OS to make an output appear whole.

Kept apart so ``file`` and ``folder`` read as their commit protocols, and so that a platform without a
call (no ``renameat2``, no ``O_TMPFILE``, no hard links) is one seam a test replaces here. Python has no
binding for ``renameat2`` or ``sync_file_range``; they go through libc with ctypes (``ema_average._platform.libc``)
and fall back where missing. The hidden ``.NAME.ema-average-PID.tmp`` names of temporaries and staging
folders live here too, with the checks (process gone, no flock held) that tell a killed run's leftover
from a live one's.

The writers call these through the module (``fs.open_anonymous(...)``), so a test's ``monkeypatch`` of
a name here is seen by every caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ema_average._platform.libc import libc_call
from ema_average.errors import OutputError

# Temporary files and staging folders: ``.NAME.ema-average-PID.tmp``. Nothing else is ever removed.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.ema-average-(?P<pid>\d+)\.tmp$")
# link() fails with these where the filesystem has no hard links (FAT, exFAT, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


# The longest suffix a hidden name of an output gets: ".ema-average-" + a PID or UID (at most 10 digits) +
# ".lock"; with the leading dot and the output's stem it stays within a file name's 255 bytes.
NAME_MAX = 255
_SUFFIX_ROOM = 32
_DIGEST_CHARS = 16


def hidden_stem(name: str) -> str:
    """The part of an output's hidden names (``.STEM.ema-average...``) that stands for its name ``name``:
    the name itself, or, where the name and the longest suffix would pass 255 bytes (an output name of
    223 to 255 bytes), its start and a hash of the whole name, so every legal output name has a lock file
    and a staging name (64 bits of SHA-256 tell two long names with one start apart)."""
    room = NAME_MAX - 1 - _SUFFIX_ROOM
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:_DIGEST_CHARS]
    start = name
    while len(os.fsencode(start)) > room - 1 - _DIGEST_CHARS:  # cut whole characters, not bytes
        start = start[:-1]
    return f"{start}~{digest}"


def hidden_name(path: Path, suffix: str) -> Path:
    """``path``'s hidden companion ``.STEM{suffix}`` in its folder (see ``hidden_stem``)."""
    assert len(suffix.encode()) <= _SUFFIX_ROOM, suffix
    return path.parent / f".{hidden_stem(path.name)}{suffix}"


def temp_name(path: Path, pid: int) -> Path:
    """The hidden name of ``path``'s temporary file or staging folder while process ``pid`` writes it
    (``remove_stale_temporaries`` removes it once that process is gone)."""
    return hidden_name(path, f".ema-average-{pid}.tmp")


def remove_path(path: Path) -> None:
    """Remove a leftover, a staging folder with all it holds or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_leftover(path: Path) -> None:
    """Remove a temporary name of ours (our PID in it) that no live writer holds: only a dead process
    that had our PID can have left it, since this process holds the output's lock."""
    if os.path.lexists(path) and not in_use(path):
        with contextlib.suppress(OSError):
            remove_path(path)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts: it may still be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def in_use(path: Path) -> bool:
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


@contextlib.contextmanager
def or_abort(path: Path, abort: Callable[[], None]) -> Iterator[None]:
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


# Written bytes after which the disk is asked to start on them: measured on the offline benchmark (4 x 200 MB
# fp32), execute 0.265 s without, 0.200 s with 8 MiB, 0.229 s with 32 MiB (medians of 8, interleaved).
WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int | None) -> None:
    """Start writing the file's dirty pages to disk now, without waiting for them (Linux
    ``sync_file_range``): the disk then works while the rest is computed, and the commit's fsync finds
    little left to do. Elsewhere a no-op."""
    call = _libc_sync_file_range()
    if call is not None and fd is not None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure here is found by the commit's fsync


def _libc_sync_file_range() -> Callable[..., int] | None:
    return libc_call("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def appeared(path: Path) -> OutputError:
    return OutputError(f"{path}: appeared while this run was writing; nothing was replaced")


def open_anonymous(folder: Path) -> int | None:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``), or None where the OS or filesystem lacks it."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def link_anonymous(fd: int, target: Path) -> None:
    """Name an O_TMPFILE file: linkat(AT_SYMLINK_FOLLOW) through /proc (os.link uses plain link()
    unless a directory fd is given, and plain link() does not follow the /proc magic link)."""
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), target, src_dir_fd=proc_fds, follow_symlinks=True)
    finally:
        os.close(proc_fds)


def link_exclusive(temp: Path, final: Path) -> None:
    """Give a named temporary file its final name only if that name is free (link fails, never replaces)."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise appeared(final) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links on this filesystem: a checked rename. A file created at ``final`` between the
        # check and the rename would still be replaced; no portable call closes that window here.
        if os.path.lexists(final):
            raise appeared(final) from None
        os.rename(temp, final)
        return
    with contextlib.suppress(OSError):  # committed already; a name left here is removed as stale
        temp.unlink()


def fsync_folder_fd(fd: int) -> None:
    """fsync a folder; a filesystem that cannot (EINVAL) makes it a no-op, any other failure raises."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise


def fsync_folder(folder: Path) -> None:
    """Best effort, after a rename that cannot be undone any more."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rename_noreplace(src: Path, dst: Path) -> None:
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


def exchange(new: Path, old: Path) -> None:
    """Put the folder ``new`` at ``old``'s name and the old folder at ``new``'s name."""
    if _renameat2(new, old, _RENAME_EXCHANGE):
        return
    # No renameat2 here: old aside, new in, old to new's name. Between the first two renames the target
    # is missing; a run killed there leaves the old output at ``.FOLDER.ema-average-PID.old`` (never
    # removed automatically) and the target absent.
    aside = hidden_name(old, f".ema-average-{os.getpid()}.old")
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
