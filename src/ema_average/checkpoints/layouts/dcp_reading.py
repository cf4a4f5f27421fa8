"""Reading a DCP folder's data files: only the files planned, only stored (uncompressed) archives.

torch's ``FileSystemReader`` opens each ``.distcp`` file by name when it reads, and ``torch.load``s the
slice it finds there: a file replaced or rewritten after the metadata was checked would be read at the
planned offsets, and a slice whose ``torch.save`` archive is DEFLATE-compressed (torch never writes one)
inflates to any size (17 KB of items gave 780 MiB). Here every slice is read through the
:class:`~ema_average.checkpoints.reading.positioned.PreadFile` of its data file, checked to be the file planned (device,
inode, size, modification and change time) at every read, and its archive is checked to hold only stored
members before ``torch.load`` sees it: an item never becomes more bytes than it has on disk.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ema_average._platform.torch_compat import narrow_by_index
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import ALLOWED_GLOBALS_LOCK, first_line, refused_globals
from ema_average.errors import CheckpointError

_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells a zip archive from a legacy pickle stream


class FileSlice(io.RawIOBase):
    """Bytes ``offset .. offset + length`` of an open descriptor, read with ``pread`` (seekable, so
    ``zipfile`` and ``torch.load`` can read the archive an item is without copying it first)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        n = os.preadv(self._fd, [view[:want]], self._offset + self._pos)
        self._pos += n
        return n


def check_stored(data: io.RawIOBase | io.BytesIO, where: Path, what: str) -> None:
    """Refuse an item whose ``torch.save`` archive holds a compressed member, before it is unpickled:
    stored members are at most the item's own bytes (the bound: 1x what is on disk); a legacy
    (non-zip) item is read as it lies. ``what`` names the item (``tensor 'w'``, ``byte item 'step'``)."""
    data.seek(0)
    head = data.read(len(_ZIP_MAGIC))
    data.seek(0)
    if head != _ZIP_MAGIC:
        return
    try:
        with zipfile.ZipFile(data) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise CheckpointError(where, f"{what} is damaged ({first_line(exc)})") from exc
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size:
            raise CheckpointError(
                where,
                f"{what} is a compressed archive ({member.filename!r}: {member.compress_size} bytes on "
                f"disk, {member.file_size} unpacked), which torch never writes; refused",
            )
    data.seek(0)


def read_byte_item(file: PreadFile, fqn: str, offset: int, length: int) -> Any:
    """A byte item's object, unpickled with ``weights_only`` (plain data and tensors; no code runs),
    from its ``length`` bytes (bounded by the caller) at ``offset`` of its data file, checked to be the
    file planned and to be a stored archive."""
    data = torch.empty(length, dtype=torch.uint8)
    file.read_into(data, offset, fqn)
    stream = io.BytesIO(data.numpy().tobytes())
    check_stored(stream, file.path, f"byte item {fqn!r}")
    try:
        with ALLOWED_GLOBALS_LOCK:  # no other load's stand-ins are allowed while this one unpickles
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = refused_globals(str(exc))
        if named:
            problem = f"names {', '.join(named[:3])}, not a step counter; refused"
        else:
            problem = f"is damaged ({first_line(exc)})"
    except Exception as exc:  # torch raises many kinds for bytes that are not a torch.save archive
        problem = f"is damaged ({first_line(exc)})"
    raise CheckpointError(file.path, f"byte item {fqn!r} {problem}")


def _read_tensor(file: PreadFile, fqn: str, info: Any) -> torch.Tensor:
    """One stored tensor chunk: its slice of the planned data file, checked, then ``torch.load``."""
    with file.opened(fqn, info.offset + info.length) as fd:
        stream = FileSlice(fd, info.offset, info.length)
        check_stored(stream, file.path, f"tensor {fqn!r}")
        # buffered: a raw stream's read(n) may return fewer bytes, a buffered one's only at its end
        return torch.load(io.BufferedReader(stream), map_location="cpu", weights_only=True)


@functools.cache
def reader_type() -> type:
    """:class:`CheckedReader`, defined on first use (importing DCP is slow, and may fail)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class CheckedReader(FileSystemReader):
        """A FileSystemReader handed our checked metadata (it never unpickles ``.metadata`` itself) and
        the planned data files (it never opens a file by name)."""

        def __init__(self, path: Path, metadata: Any, files: dict[str, PreadFile]) -> None:
            super().__init__(str(path))
            self._checked_metadata = metadata
            self._files = files

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = self._checked_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            for req in plan.items:
                if req.type == LoadItemType.BYTE_IO:  # DCP would unpickle them with plain pickle
                    raise CheckpointError(Path(self.path), "a read asks for pickled objects; refused")
                info = self.storage_data[req.storage_index]
                tensor = _read_tensor(self._files[info.relative_path], req.storage_index.fqn, info)
                tensor = narrow_by_index(tensor, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise AssertionError(
                        f"{req.storage_index.fqn!r}: stored {tensor.size()}, {target.size()}"
                    )
                target.copy_(tensor)
                planner.commit_tensor(req, target)
            done: Future = Future()
            done.set_result(None)
            return done

    return CheckedReader
