"""A streaming safetensors writer: header first, tensors as they are ready, rename on commit.

Hand-written because the safetensors library only saves a complete dict of tensors held in memory; an
average of a model larger than memory is finished group by group. The layout follows the format's
spec and the library's own choices (compact JSON, tensors ordered by dtype then name, header padded with
spaces to 8 bytes), so the bytes equal ``safetensors.torch.save_file``'s for the same tensors (the
library orders several metadata keys as a hash map does, so only their order can differ).

Each output is written to a temporary file in its own folder, reserved to its full size up front (a full
disk fails before the work, not after), fsynced, and renamed into place only when every tensor is in.
On Linux the temporary file is unnamed (``O_TMPFILE``) until commit, so even a run killed with SIGKILL
leaves nothing behind; elsewhere it is a hidden named file, removed on abort, and a named one left by a
killed run is removed by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ema_average.checkpoints.safetensors_file import DTYPE_NAMES
from ema_average.errors import OutputError

# The safetensors Dtype enum in declaration order; save_file sorts tensors by it, largest first.
_DTYPE_RANK = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
]
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.ema-average-(?P<pid>\d+)\.tmp$")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def safetensors_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """The order ``save_file`` stores tensors in: dtype rank descending, then name."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.index(DTYPE_NAMES[e.dtype]), e.name))


def build_header(
    entries: Sequence[TensorEntry], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, int]]:
    """The padded header bytes and each tensor's byte offset within the data section."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offsets[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files of earlier runs that were killed (their process is gone)."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP_PATTERN.match(path.name)
        if match and not _pid_alive(int(match.group("pid"))):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SafetensorsWriter:
    """One safetensors file, written in any tensor order to a temporary file and committed at once."""

    def __init__(
        self, path: Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None, *, overwrite: bool
    ) -> None:
        self.path = path
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        self.entries = safetensors_order(entries)
        self._header, self._offsets = build_header(self.entries, metadata)
        self._sizes = {e.name: e.nbytes for e in self.entries}
        self._pending = set(self._sizes)
        self.data_size = sum(self._sizes.values())  # tensor bytes alone: an index's total_size
        self.size = len(self._header) + self.data_size
        self.temp_path = path.parent / f".{path.name}.ema-average-{os.getpid()}.tmp"
        self._fd: int | None = None
        self._anonymous = _open_anonymous(path.parent)
        if self._anonymous is not None:
            self._fd = self._anonymous
        else:
            self._fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._reserve()
            self._pwrite(memoryview(self._header), 0)
        except BaseException:
            self.abort()
            raise

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
        if name not in self._pending:
            raise OutputError(f"{self.path}: tensor {name!r} is not expected or was already written")
        data = tensor.detach().to("cpu").contiguous()
        if data.nbytes != self._sizes[name]:
            raise OutputError(
                f"{self.path}: tensor {name!r} has {data.nbytes} bytes, header says {self._sizes[name]}"
            )
        if data.nbytes:
            self._pwrite(
                memoryview(data.reshape(-1).view(torch.uint8).numpy()),
                len(self._header) + self._offsets[name],
            )
        self._pending.discard(name)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from exc

    def commit(self) -> None:
        """fsync and rename into place; the output appears whole or not at all."""
        if self._pending:
            raise OutputError(f"{self.path}: {len(self._pending)} tensors were never written")
        assert self._fd is not None
        os.fsync(self._fd)
        if self._anonymous is not None:  # give the unnamed file a name only now that it is whole
            os.fchmod(self._fd, 0o644)
            _link_anonymous(self._fd, self.temp_path)
        os.close(self._fd)
        self._fd = None
        os.replace(self.temp_path, self.path)
        _fsync_folder(self.path.parent)

    def abort(self) -> None:
        """Remove the temporary file; the output (if any existed) is untouched."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


def _open_anonymous(folder: Path) -> int | None:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``), or None where the OS or filesystem lacks it."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o600)
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


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ShardedWriter:
    """Hugging Face style shards (``model-00001-of-00003.safetensors``) and their index.

    Tensors are split in safetensors order into shards of at most ``max_shard_size`` bytes (a larger
    tensor gets a shard of its own). One shard is written as plain ``path``, as transformers does.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None,
        *,
        overwrite: bool,
        max_shard_size: int,
    ) -> None:
        ordered = safetensors_order(entries)
        shards: list[list[TensorEntry]] = [[]]
        used = 0
        for e in ordered:
            if shards[-1] and used + e.nbytes > max_shard_size:
                shards.append([])
                used = 0
            shards[-1].append(e)
            used += e.nbytes
        self.index_path: Path | None = None
        if len(shards) == 1:
            names = [path]
        else:
            stem = path.name.removesuffix(".safetensors")
            names = [
                path.parent / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                for i in range(1, len(shards) + 1)
            ]
            self.index_path = path.parent / f"{path.name}.index.json"
            if self.index_path.exists() and not overwrite:
                raise OutputError(f"{self.index_path}: already exists; pass --overwrite to replace it")
        self.writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        try:
            for shard_path, shard in zip(names, shards, strict=True):
                writer = SafetensorsWriter(shard_path, shard, metadata, overwrite=overwrite)
                self.writers.append(writer)
                self._route.update({e.name: writer for e in shard})
        except BaseException:
            self.abort()
            raise
        self._metadata = metadata or {}

    @property
    def paths(self) -> list[Path]:
        return [w.path for w in self.writers] + ([self.index_path] if self.index_path else [])

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._route[name].write(name, tensor)

    def commit(self) -> None:
        for writer in self.writers:
            writer.commit()
        if self.index_path is not None:  # written last: a reader that finds the index finds every shard
            index = {
                "metadata": {
                    "total_size": sum(w.data_size for w in self.writers),
                    **self._metadata,
                },
                "weight_map": {name: w.path.name for name, w in self._route.items()},
            }
            temp = self.index_path.parent / f".{self.index_path.name}.ema-average-{os.getpid()}.tmp"
            temp.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(temp, self.index_path)

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()
