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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ema_average._platform import fs
from ema_average._platform.open_files import POOL, PooledFile, too_many_open, too_many_open_words
from ema_average._platform.output_lock import writer_lock
from ema_average.checkpoints.safetensors_format import (
    DTYPE_NAMES,
    TensorEntry,
    build_header,
    name_problem,
    safetensors_order,
    utf8_problem,
)
from ema_average.errors import OutputError


def check_entries(path: Path, entries: Sequence[TensorEntry]) -> None:
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


def check_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    """Refuse, before any file exists, metadata the header cannot hold (non-strings, lone surrogates)."""
    for key, value in (metadata or {}).items():
        ok = isinstance(key, str) and isinstance(value, str)
        if not ok or utf8_problem(key) or utf8_problem(value):
            raise OutputError(f"{path}: metadata {key!r} is not a string UTF-8 can encode")


class SafetensorsWriter:
    """One safetensors file, written in any tensor order to a temporary file and committed at once.

    ``lock=False`` is for a caller that already guarantees no other writer (``ShardedWriter``'s private
    staging folder).

    ``pooled=True`` (``ShardedWriter``'s shards) writes the file at its own name, and opens it only while
    writing to it, through the process's one pool of open files (``_platform/open_files.py``), which bounds
    how many are open at once; its name is the folder's to give.

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
        pooled: bool = False,
    ) -> None:
        self.path = path
        self._overwrite = overwrite
        check_entries(path, entries)
        check_metadata(path, metadata)
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
        self.temp_path = join or (path if pooled else fs.temp_name(path, os.getpid()))
        self._pooled = PooledFile(self.temp_path, write=True) if pooled else None
        self._fd: int | None = None
        self._anonymous = False
        self._named_temp = False  # temp_path is ours to remove
        self._sealed = False  # fsynced and read back: only the name is left to give
        self._joined = join is not None
        self._lock = writer_lock(path) if lock and join is None else None
        try:
            if join is not None:
                self._open_joined()
            else:
                self._open_temporary(named=shared or pooled)
                self._reserve()
                self._pwrite(memoryview(self._header), 0)
                if pooled:  # reopened through the pool while written to
                    os.close(self._fd)  # type: ignore[arg-type]  # opened just above
                    self._fd = None
        except BaseException:
            self.abort()
            raise

    @property
    def paths(self) -> list[Path]:
        """The files the commit makes visible (as ``ShardedWriter.paths``: both writers answer alike)."""
        return [self.path]

    def _open_temporary(self, *, named: bool) -> None:
        fd = None if named else fs.open_anonymous(self.path.parent)
        self._anonymous = fd is not None
        if fd is None:
            fs.remove_leftover(self.temp_path)
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
                data.reshape(-1).view(torch.uint8).numpy().data,
                len(self._header) + self._offsets[name] + first,
            )
        self._wrote(name, data.nbytes)

    def _wrote(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` of ``name`` as written; every few MiB, start writing them to disk. A pooled
        file is closed once every tensor is in it."""
        with self._guard:
            self._unwritten[name] -= nbytes
            if self._unwritten[name] <= 0:
                self._pending.discard(name)
            self._dirty += nbytes
            kick = self._dirty >= fs.WRITEBACK_BYTES
            if kick:
                self._dirty = 0
            finished = not self._pending
        if finished and self._pooled is not None:
            POOL.close(self._pooled)
        elif kick:
            with self._io() as fd:
                fs.start_writeback(fd)

    @contextlib.contextmanager
    def _io(self) -> Iterator[int]:
        """The file's descriptor for one operation: this writer's own, or the pool's."""
        if self._fd is not None or self._pooled is None:
            assert self._fd is not None
            yield self._fd
            return
        try:
            fd = POOL.acquire(self._pooled)
        except OSError as exc:
            words = too_many_open_words() if too_many_open(exc) else exc.strerror
            raise OutputError(f"{self.path}: cannot be opened to write into ({words})") from exc
        try:
            yield fd
        finally:
            POOL.release(self._pooled)

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
        with fs.or_abort(self.path, self.abort):
            with self._io() as fd:
                os.fsync(fd)
                readable = f"/proc/self/fd/{fd}" if self._anonymous else str(self.temp_path)
                _verify_written(readable, self.path, self.entries, self._metadata)
            if self._pooled is not None:
                POOL.close(self._pooled)
        self._sealed = True

    def publish(self) -> None:
        """Name the sealed file: the output appears, whole."""
        if not self._sealed:
            raise OutputError(f"{self.path}: named before it was sealed")
        with fs.or_abort(self.path, self.abort):
            self._name()
        self._release()

    def _name(self) -> None:
        if self._pooled is not None:  # at its name already, in a folder whose rename is the commit
            self._named_temp = False
            return
        assert self._fd is not None
        if self._anonymous:  # give the unnamed file a name only now that it is whole
            os.fchmod(self._fd, 0o644)
            self._name_anonymous(self._fd)
        elif self._overwrite:
            os.replace(self.temp_path, self.path)
        else:
            fs.link_exclusive(self.temp_path, self.path)
        self._named_temp = False  # renamed, or linked and unlinked
        os.close(self._fd)
        self._fd = None
        fs.fsync_folder(self.path.parent)

    def _name_anonymous(self, fd: int) -> None:
        if self._overwrite:
            fs.remove_leftover(self.temp_path)
            self._named_temp = True
            fs.link_anonymous(fd, self.temp_path)
            os.replace(self.temp_path, self.path)
            return
        try:  # linkat creates the name or fails: it never replaces
            fs.link_anonymous(fd, self.path)
        except FileExistsError:
            raise fs.appeared(self.path) from None

    def abort(self) -> None:
        """Remove the temporary file; the output (if any existed) is untouched."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._pooled is not None:
            POOL.close(self._pooled)
        if self._named_temp:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()
            self._named_temp = False
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
