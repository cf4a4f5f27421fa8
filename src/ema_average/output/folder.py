"""A folder output, in whatever shape the input's layout declares (a ``save_pretrained`` folder, a
sentence-transformers or litgpt one: ``folder_plan``), built whole beside its target and switched in.

Its files are ``file``'s writers (safetensors shards) and ``torch_file``'s (a ``torch.save`` file) in a
private staging folder; what is its own is laying out the files it is given (which weights file of which
sub-folder holds which tensors, shard split, names, indexes, side files), the check that a folder it replaces is an earlier output
of this tool (never a user's), and the one rename that switches the folder in.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from ema_average._platform import fs
from ema_average._platform.open_files import require_spare_descriptors
from ema_average._platform.output_lock import writer_lock
from ema_average.checkpoints.contents.own_outputs import MARKER_FILE, TOOL_MARKER_KEY, marked_json
from ema_average.checkpoints.safetensors_format import TensorEntry, read_header, safetensors_order
from ema_average.errors import CheckpointError, OutputError
from ema_average.output.file import SafetensorsWriter, check_entries, check_metadata
from ema_average.output.torch_file import TorchFileWriter


@dataclass(frozen=True)
class WeightsFile:
    """One weights file of a folder output: its name, the sub-folder it goes in (``""``: the top), and which
    output tensors it holds: those named ``prefix + NAME``, stored as ``NAME`` (a sentence-transformers
    module's ``2_Dense/linear.weight`` is ``2_Dense/model.safetensors``'s ``linear.weight``). A
    ``.safetensors`` name is split into shards of at most ``max_shard_size`` bytes (the writer's when
    None) behind an index; any other name is one ``torch.save`` file of a plain state dict. A file whose
    loader reads no index (a sentence-transformers ``Dense``) is not ``shardable``: always one file."""

    name: str = "model.safetensors"
    folder: str = ""
    prefix: str = ""
    max_shard_size: int | None = None
    shardable: bool = True

    @property
    def is_torch(self) -> bool:
        return not self.name.endswith(".safetensors")


class ShardedWriter:
    """A Hugging Face style output folder, built whole beside its target and switched in by one rename.

    ``FOLDER/model.safetensors`` when every tensor fits one shard of ``max_shard_size`` bytes (a larger
    tensor gets a shard of its own), else ``FOLDER/model-00001-of-0000N.safetensors`` and
    ``FOLDER/model.safetensors.index.json``; ``weights_name`` changes ``model.safetensors`` (say to
    ``adapter_model.safetensors``). ``weights`` lays out a folder of several weights files instead (one per
    sentence-transformers module, in its sub-folder; a torch file for litgpt, with ``MARKER_FILE`` beside
    it holding the metadata); ``folders`` are sub-folders to create even if nothing is written in them.
    ``add_file`` puts small side files (a config, ``1_Pooling/config.json``) beside the weights.

    Each shard file is open only while written to, through the process's one pool of open files (shared
    with the checkpoints being read: ``_platform/open_files.py``), so thousands of shards fit the usual
    ``ulimit -n``; a limit too tight even for that is refused before anything is written.

    Everything is written into ``PARENT/.FOLDER.ema-average-PID.tmp/``, each file fsynced, then the
    staging folder, then one atomic switch: a new target is created with ``renameat2(RENAME_NOREPLACE)``
    (one that appeared meanwhile is never replaced), an existing one, with ``overwrite``, is swapped
    with ``renameat2(RENAME_EXCHANGE)`` and the old folder, now at the staging name, removed. A reader
    sees the old folder or the new one, never a mix; a kill at any point leaves the target as it was or
    complete, and a staging folder the next run's ``remove_stale_temporaries`` removes. An existing
    target is replaced only if it is an ema-average output: every entry a ``*.safetensors`` or
    ``*.safetensors.index.json`` whose metadata has ``ema_average_version``, a torch weights file of
    ``weights`` beside a ``MARKER_FILE`` of ours, a side file named in ``side_files`` (declare them up
    front) or added with ``add_file``, or a sub-folder of such entries.
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
        weights: Sequence[WeightsFile] | None = None,
        folders: Collection[str] = (),
    ) -> None:
        self.path = path
        self._overwrite = overwrite
        self._metadata = dict(metadata or {})
        layout = list(weights) if weights is not None else [WeightsFile(weights_name)]
        for w in layout:
            _check_weights_file(w)
        check_entries(path, entries)
        check_metadata(path, metadata)
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        self._weights = layout
        self._side_files = set(side_files)
        self._folders = {*folders, *(w.folder for w in layout if w.folder)}
        for name in self._folders:
            _check_relative(name, path)
        self._check_target()
        routed = _route(path, entries, layout)
        self._parts: list[tuple[WeightsFile, list[str], SafetensorsWriter | TorchFileWriter]] = []
        self._indexes: list[tuple[WeightsFile, list[SafetensorsWriter]]] = []
        self._added: list[str] = []
        self.staging = fs.temp_name(path, os.getpid())
        self._staging_fd: int | None = None
        self._made_staging = False
        self._sealed = False
        self._committed = False
        self.writers: list[SafetensorsWriter | TorchFileWriter] = []
        self._route: dict[str, tuple[SafetensorsWriter | TorchFileWriter, str]] = {}
        require_spare_descriptors(path)
        self._lock = writer_lock(path)
        try:
            self._make_staging()
            for folder in sorted(self._folders):
                os.makedirs(self.staging / folder, exist_ok=True)
            for w, part in zip(layout, routed, strict=True):
                self._open_part(w, part, max_shard_size, metadata)
            if any(w.is_torch for w in layout):  # torch files carry no metadata: it goes beside them
                self.add_file(
                    MARKER_FILE, (json.dumps({"metadata": self._metadata}, indent=2) + "\n").encode()
                )
        except OSError as exc:
            self.abort()
            self._raise_of_output(exc)
        except BaseException:
            self.abort()
            raise

    def _open_part(
        self,
        w: WeightsFile,
        part: list[tuple[str, TensorEntry]],
        max_shard_size: int,
        metadata: dict[str, str] | None,
    ) -> None:
        """The writers of one weights file (its shards, or its torch file), each tensor routed to its own."""
        inner = {e.name: name for name, e in part}
        where = self.staging / w.folder
        if w.is_torch:
            writers: list[SafetensorsWriter | TorchFileWriter] = [
                TorchFileWriter(where / w.name, [e for _, e in part])
            ]
            names = [w.name]
            shards = [[e for _, e in part]]
        else:
            shards = _split(safetensors_order([e for _, e in part]), w.max_shard_size or max_shard_size)
            names = _shard_names(w.name, len(shards))
            sharded = [
                SafetensorsWriter(where / name, shard, metadata, overwrite=False, lock=False, pooled=True)
                for name, shard in zip(names, shards, strict=True)
            ]
            if len(shards) > 1:
                self._indexes.append((w, sharded))
            writers = [*sharded]
        for name, shard, writer in zip(names, shards, writers, strict=True):
            self.writers.append(writer)
            self._parts.append((w, [name], writer))
            self._route.update({inner[e.name]: (writer, e.name) for e in shard})

    def _check_target(self) -> None:
        """Refuse up front what commit would refuse: an existing target without overwrite, or not ours."""
        if not os.path.lexists(self.path):
            return
        if not self._overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        problem = _not_an_output(self.path, self._side_files, self._weights, self._folders)
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
        """The files the output folder holds once committed: weights files, indexes, side files."""
        files = [_join(w.folder, name) for w, names, _ in self._parts for name in names]
        index = [_join(w.folder, f"{w.name}.index.json") for w, _ in self._indexes]
        return [self.path / name for name in [*files, *index, *self._added]]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        writer, inner = self._shard(name)
        try:
            writer.write(inner, tensor)
        except OSError as exc:
            self._raise_of_output(exc)

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Elements ``start ..`` of tensor ``name``, into its shard (see ``SafetensorsWriter.write_range``)."""
        writer, inner = self._shard(name)
        try:
            writer.write_range(inner, start, tensor)
        except OSError as exc:
            self._raise_of_output(exc)

    def _raise_of_output(self, exc: OSError) -> NoReturn:
        """A failure of a file in the hidden staging folder, said of the output the user named (a full
        disk as such): the staging name means nothing to them and is gone once the run has failed."""
        text, staging = str(exc), str(self.staging)
        if isinstance(exc, OutputError) and not text.startswith(staging):
            raise exc  # already said of the output
        cause = exc.__cause__ if isinstance(exc, OutputError) else exc
        inner = text[len(staging) :].lstrip("/").partition(": ")[0] if text.startswith(staging) else ""
        what = f"cannot write {inner}" if inner else "cannot be written"
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OutputError(f"{self.path}: {what} ({_reason(cause)}); nothing was replaced") from exc
        raise OutputError(f"{self.path}: {what}: {text.partition(': ')[2]}") from exc

    def _shard(self, name: str) -> tuple[SafetensorsWriter | TorchFileWriter, str]:
        """The writer of the file that holds tensor ``name``, and the name it has there."""
        found = self._route.get(name)
        if found is None:
            raise OutputError(f"{self.path}: tensor {name!r} is not expected")
        return found

    def add_file(self, name: str, data: bytes) -> None:
        """A small side file (a config, say) to appear in the output folder with the weights; ``name`` may
        be in a sub-folder (``1_Pooling/config.json``)."""
        self._add(name, lambda path: _write_new_file(path, data))

    def copy_file(self, name: str, source: int, size: int, origin: Path) -> None:
        """A side file copied from the open descriptor ``source`` (its first ``size`` bytes; ``origin``
        names it in errors), streamed a block at a time: never held whole in memory."""
        self._add(name, lambda path: _copy_new_file(path, source, size, origin))

    def _add(self, name: str, write: Callable[[Path], None]) -> None:
        reserved = {*(str(p.relative_to(self.path)) for p in self.paths), *self._added}
        parts = name.split("/")
        plain = all(_plain_name(p) and not p.startswith(".") for p in parts)
        if not plain or name in reserved or _weights_like(name) or name in self._torch_names():
            raise OutputError(f"{self.path}: {name!r} cannot be a side file (a plain, new, non-weights name)")
        try:
            if len(parts) > 1:
                os.makedirs(self.staging / "/".join(parts[:-1]), exist_ok=True)
                self._folders.add("/".join(parts[:-1]))
            write(self.staging / name)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write {name} ({_reason(exc)})") from exc
        self._added.append(name)
        self._side_files.add(name)

    def _torch_names(self) -> set[str]:
        return {_join(w.folder, w.name) for w in self._weights if w.is_torch}

    def commit(self) -> None:
        """Finish every file in the staging folder, then switch it in; on failure the target is as it was."""
        self.seal()
        self.publish()

    def seal(self) -> None:
        """Every file finished inside the hidden staging folder (the part a disk can fail); see
        :meth:`SafetensorsWriter.seal`."""
        with fs.or_abort(self.path, self.abort):
            try:
                self._seal()
            except OutputError as exc:  # a file's own (a plain OSError: or_abort says it of the output)
                self._raise_of_output(exc)
        self._sealed = True

    def _seal(self) -> None:
        for writer in self.writers:
            writer.commit()
        for w, writers in self._indexes:  # a reader that finds the index finds every shard
            _write_new_file(self.staging / _join(w.folder, f"{w.name}.index.json"), self._index(writers))
        for folder in sorted(self._folders, reverse=True):
            fs.fsync_folder(self.staging / folder)
        assert self._staging_fd is not None
        fs.fsync_folder_fd(self._staging_fd)

    def publish(self) -> None:
        """Switch the sealed staging folder in: the one step a reader can see."""
        if not self._sealed:
            raise OutputError(f"{self.path}: named before it was sealed")
        with fs.or_abort(self.path, self.abort):
            self._switch()
        self._close()

    def _index(self, writers: list[SafetensorsWriter]) -> bytes:
        shards = set(writers)
        index = {
            "metadata": {"total_size": sum(w.data_size for w in writers), **self._metadata},
            "weight_map": {inner: w.path.name for w, inner in self._route.values() if w in shards},
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


def _route(
    path: Path, entries: Sequence[TensorEntry], weights: Sequence[WeightsFile]
) -> list[list[tuple[str, TensorEntry]]]:
    """Each weights file's tensors: (output name, entry under its name in the file). A tensor goes to the
    file whose prefix is the longest that its name starts with."""
    parts: list[list[tuple[str, TensorEntry]]] = [[] for _ in weights]
    for e in entries:
        fits = [i for i, w in enumerate(weights) if e.name.startswith(w.prefix) and e.name != w.prefix]
        if not fits:
            raise OutputError(f"{path}: tensor {e.name!r} belongs to none of the output's weights files")
        best = max(fits, key=lambda i: len(weights[i].prefix))
        parts[best].append((e.name, TensorEntry(e.name[len(weights[best].prefix) :], e.spec)))
    return parts


def _check_weights_file(w: WeightsFile) -> None:
    if not _plain_name(w.name) or w.name.startswith(".") or w.name.endswith(".index.json"):
        raise OutputError(f"{w.name!r}: a weights file's name must be a plain file name")
    if w.folder:
        _check_relative(w.folder, Path(w.folder))


def _check_relative(name: str, where: Path) -> None:
    """A sub-folder or side file of the output: plain names joined by ``/``, none hidden."""
    if not all(_plain_name(p) and not p.startswith(".") for p in name.split("/")):
        raise OutputError(f"{where}: {name!r} is not a plain relative name inside the output folder")


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


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


_COPY_BLOCK = 2**20  # a side file is copied a block at a time: at most this much of it is in memory


def _copy_new_file(path: Path, source: int, size: int, origin: Path) -> None:
    """``path`` made new, holding the first ``size`` bytes of the open file ``source``; a source that is
    shorter now than when it was checked is refused (it changed while being copied)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        offset = 0
        while offset < size:
            try:
                block = os.pread(source, min(_COPY_BLOCK, size - offset), offset)
            except OSError as exc:
                raise CheckpointError(origin, f"cannot be read ({exc.strerror or exc})") from exc
            if not block:
                raise CheckpointError(origin, "changed while it was copied (it is shorter now); refused")
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
            offset += len(block)
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    """Why a write failed, in the user's words: a full disk (or quota) said as such."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return exc.strerror or str(exc)


def _not_an_output(
    folder: Path,
    side_files: Collection[str],
    weights: Sequence[WeightsFile] = (),
    folders: Collection[str] = (),
) -> str | None:
    """Why ``folder`` is not an output this writer may replace; None when every entry (in sub-folders
    too) is one it writes."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    marked = _marked(folder / MARKER_FILE)
    torch_files = {_join(w.folder, w.name) for w in weights if w.is_torch} if marked else set()
    ours = {*side_files, *torch_files, *((MARKER_FILE,) if marked else ())}
    subfolders = {*folders, *(w.folder for w in weights if w.folder)}
    subfolders |= {
        "/".join(name.split("/")[:i]) for name in side_files for i in range(1, name.count("/") + 1)
    }
    counts = [0, 0]  # weights files of ours, side files
    pending = [""]
    while pending:
        here = pending.pop()
        for entry in sorted(os.scandir(folder / here), key=lambda e: e.name):
            name = _join(here, entry.name)
            if entry.is_dir(follow_symlinks=False) and name in subfolders:
                pending.append(name)
            elif not entry.is_file(follow_symlinks=False):
                return f"{name} is not a plain file"
            elif name in ours and not _weights_like(name):
                counts[name not in torch_files] += 1
            elif _marked(Path(entry.path)):
                counts[0] += 1
            else:
                return f"it holds {name}"
    if counts[1] and not counts[0]:
        return "it holds no ema-average weights"
    return None


def _marked(path: Path) -> bool:
    """A weights file, index or ``MARKER_FILE`` this tool wrote: its metadata carries the tool's marker key.
    Only a regular file is opened (a FIFO named ``ema_average.json`` would block the run)."""
    if path.name.endswith(".safetensors.index.json") or path.name == MARKER_FILE:
        return marked_json(path)
    if path.name.endswith(".safetensors"):
        try:
            return stat.S_ISREG(os.lstat(path).st_mode) and TOOL_MARKER_KEY in read_header(path).metadata
        except (OSError, CheckpointError):
            return False
    return False
