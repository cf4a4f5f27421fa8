"""A ``torch.save`` file of a plain state dict, written tensor by tensor: the weights file of a folder output
whose producer loads torch files (litgpt's ``lit_model.pth``).

``torch.save`` needs every tensor whole in memory; an average is finished chunk by chunk. So the file is
laid out first by ``torch.save`` itself, of placeholder tensors with no storage (``skip_data``: the
pickled structure and zip records are torch's own, each tensor's bytes a hole), and the averaged bytes are
then written into each record with ``pwrite``, in any order, from any thread. Sealing fills in the zip
CRCs (``skip_data`` leaves them 0; torch ignores them, a zip tool does not) and reads the file back with
``torch.load(weights_only=True, mmap=True)``. It lives in a folder output's staging folder, so the
folder's rename is its commit.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ema_average._platform import fs
from ema_average._platform.torch_compat import fake_tensor_mode
from ema_average.checkpoints.safetensors_format import TensorEntry
from ema_average.errors import OutputError

_CRC_BLOCK = 8 * 2**20
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_CENTRAL_HEADER = 46
_CENTRAL_SIGNATURE = 0x02014B50
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_HAS_DESCRIPTOR = 0x08  # general purpose flag bit 3: CRC and sizes follow the data


class TorchFileWriter:
    """``path`` (inside a staging folder) as ``torch.save`` writes a dict of ``entries``, filled by
    :meth:`write` and :meth:`write_range` and finished by :meth:`seal`; :meth:`abort` removes it."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry]) -> None:
        self.path = path
        self.entries = list(entries)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise OutputError(f"{path}: a tensor name is listed twice")
        self._sizes = {e.name: e.nbytes for e in self.entries}
        self._dtypes = {e.name: e.dtype for e in self.entries}
        self._unwritten = dict(self._sizes)
        self._guard = threading.Lock()
        self.data_size = sum(self._sizes.values())
        self._fd: int | None = None
        try:
            _save_layout(path, self.entries)
            self._records = _records(path, self.entries)
            self.size = path.stat().st_size
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            _reserve(self._fd, self.size, path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from exc
        except BaseException:
            self.abort()
            raise

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """One whole tensor (any device) into its record."""
        self.write_range(name, 0, tensor)
        if self._unwritten.get(name):
            raise OutputError(f"{self.path}: tensor {name!r} was given only in part")

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Elements ``start ..`` of tensor ``name`` (flattened) into its record; pieces must not overlap."""
        if self._unwritten.get(name) is None:
            raise OutputError(f"{self.path}: tensor {name!r} is not expected")
        data = tensor.detach().to("cpu").contiguous()
        first = start * data.element_size()
        if data.dtype != self._dtypes[name] or start < 0 or first + data.nbytes > self._sizes[name]:
            raise OutputError(
                f"{self.path}: tensor {name!r}: {data.numel()} {data.dtype} elements from {start} do not fit "
                f"its {self._sizes[name]} bytes of {self._dtypes[name]}"
            )
        if data.nbytes:
            self._pwrite(data.reshape(-1).view(torch.uint8).numpy().data, self._records[name][0] + first)
        with self._guard:
            self._unwritten[name] -= data.nbytes

    def _pwrite(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from exc

    def commit(self) -> None:
        """Finish the file: every tensor written, CRCs filled in, fsynced, read back by torch."""
        missing = [name for name, left in self._unwritten.items() if left > 0]
        if missing:
            raise OutputError(f"{self.path}: {len(missing)} tensors were never written ({missing[0]!r} ...)")
        assert self._fd is not None
        try:
            _fill_crcs(self._fd, self._records.values())
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write to disk ({exc.strerror})") from exc
        os.close(self._fd)
        self._fd = None
        _verify_written(self.path, self.entries)

    def abort(self) -> None:
        """Close and remove the file (it only ever exists in a staging folder)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fs.remove_leftover(self.path)


def _save_layout(path: Path, entries: Sequence[TensorEntry]) -> None:
    """``torch.save`` of a dict of placeholders: torch's structure and records, each tensor's bytes a hole."""
    with fake_tensor_mode():
        placeholders = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(placeholders, path)


def _records(path: Path, entries: Sequence[TensorEntry]) -> dict[str, tuple[int, int, int, int]]:
    """Each tensor's record in the zip: (data offset, bytes, central directory entry offset, where its CRC
    goes beside the data: the data descriptor after it, or the local header before it). torch.save numbers
    storages in the order it pickles them, the dict's order; each record's size is checked."""
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
        central = _central_offsets(path, archive.start_dir, len(archive.infolist()))
    with open(path, "rb") as f:
        records = {}
        for key, entry in enumerate(entries):
            info = infos.get(f"data/{key}")
            if info is None or info.file_size != entry.nbytes:
                raise OutputError(f"{path}: torch.save did not lay out tensor {entry.name!r} as expected")
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
            crc_at = info.header_offset + 14  # the local header's CRC field
            if info.flag_bits & _HAS_DESCRIPTOR:
                f.seek(start + entry.nbytes)
                crc_at = start + entry.nbytes + (4 if f.read(4) == _DESCRIPTOR_SIGNATURE else 0)
            records[entry.name] = (start, entry.nbytes, central[info.filename], crc_at)
    return records


def _central_offsets(path: Path, start: int, count: int) -> dict[str, int]:
    """Where each record's central directory entry starts (its CRC is at +16)."""
    offsets = {}
    with open(path, "rb") as f:
        f.seek(start)
        for _ in range(count):
            at = f.tell()
            fixed = f.read(_CENTRAL_HEADER)
            if len(fixed) < _CENTRAL_HEADER or struct.unpack_from("<I", fixed)[0] != _CENTRAL_SIGNATURE:
                raise OutputError(f"{path}: torch.save wrote a zip this writer does not know")
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", fixed, 28)
            name = f.read(name_len).decode()
            offsets[name] = at
            f.seek(extra_len + comment_len, os.SEEK_CUR)
    return offsets


def _reserve(fd: int, size: int, path: Path) -> None:
    """Room for every byte now, so a full disk fails before the work, not after."""
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # not on macOS: sparse, a full disk shows at write time
        pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot reserve {size} bytes ({exc.strerror})") from exc


def _fill_crcs(fd: int, records: Iterable[tuple[int, int, int, int]]) -> None:
    """Each tensor record's CRC-32, into its data descriptor and its central directory entry."""
    for start, size, central, crc_at in records:
        crc = 0
        for offset in range(start, start + size, _CRC_BLOCK):
            crc = zlib.crc32(os.pread(fd, min(_CRC_BLOCK, start + size - offset), offset), crc)
        packed = struct.pack("<I", crc)
        os.pwrite(fd, packed, crc_at)
        os.pwrite(fd, packed, central + 16)


def _verify_written(path: Path, entries: Sequence[TensorEntry]) -> None:
    """Read the file back as a user's ``torch.load(weights_only=True)`` does (mapped: no data read), and
    check every record's local header is intact (what a load that is not mapped reads)."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                f.seek(info.header_offset)
                if f.read(4) != b"PK\x03\x04":
                    raise OutputError(
                        f"{path}: record {info.filename} was damaged while written; nothing was committed"
                    )
        loaded = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except OutputError:
        raise
    except Exception as exc:  # torch raises many kinds for a file it cannot read
        raise OutputError(
            f"{path}: the written file does not read back ({exc}); nothing was committed"
        ) from exc
    found = (
        [(name, tuple(t.shape), t.dtype) for name, t in loaded.items()] if isinstance(loaded, dict) else []
    )
    expected = [(e.name, tuple(e.shape), e.dtype) for e in entries]
    if found != expected:
        raise OutputError(
            f"{path}: the written file does not hold the tensors planned; nothing was committed"
        )
