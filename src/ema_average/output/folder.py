"""A sharded output: a Hugging Face ``save_pretrained`` folder built whole beside its target and switched in.

Its shards are ``file``'s writers in a private staging folder; what is its own is the layout (shard
split, names, index, side files), the check that a folder it replaces is an earlier output of this tool
(never a user's), and the one rename that switches the folder in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from ema_average.checkpoints.safetensors_file import TOOL_MARKER_KEY
from ema_average.errors import CheckpointError, OutputError
from ema_average.output import fs
from ema_average.output.file import SafetensorsWriter, check_entries, check_metadata
from ema_average.output.lock import writer_lock
from ema_average.output.pool import OpenFiles, shard_files_limit
from ema_average.safetensors_format import TensorEntry, read_header, safetensors_order

_MAX_INDEX_BYTES = 100_000_000


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
        check_entries(path, entries)
        check_metadata(path, metadata)
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        self._side_files = set(side_files)
        self._check_target()
        shards = _split(safetensors_order(entries), max_shard_size)
        self._names = _shard_names(weights_name, len(shards))
        self._index_name = f"{weights_name}.index.json" if len(shards) > 1 else None
        self._added: list[str] = []
        self.staging = fs.temp_name(path, os.getpid())
        self._staging_fd: int | None = None
        self._made_staging = False
        self._sealed = False
        self._committed = False
        self.writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        self._files = OpenFiles(shard_files_limit(path))
        self._lock = writer_lock(path)
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
        fs.remove_leftover(self.staging)
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
        with fs.or_abort(self.path, self.abort):
            for writer in self.writers:
                writer.commit()
            if self._index_name is not None:  # a reader that finds the index finds every shard
                _write_new_file(self.staging / self._index_name, self._index())
            assert self._staging_fd is not None
            fs.fsync_folder_fd(self._staging_fd)
        self._sealed = True

    def publish(self) -> None:
        """Switch the sealed staging folder in: the one step a reader can see."""
        if not self._sealed:
            raise OutputError(f"{self.path}: named before it was sealed")
        with fs.or_abort(self.path, self.abort):
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
                fs.rename_noreplace(self.staging, self.path)
            except FileExistsError:
                raise fs.appeared(self.path) from None
            self._committed = True
            fs.fsync_folder(self.path.parent)
            return
        if not self._overwrite:
            raise fs.appeared(self.path)
        self._check_target()  # again: what is about to be deleted must be ours now, not at the start
        fs.exchange(self.staging, self.path)
        self._committed = True
        fs.fsync_folder(self.path.parent)
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
