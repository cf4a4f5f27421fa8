"""A folder output that the producing library loads as it is, in the shape the input's layout declares.

``-o DIR`` (any name not ending ``.safetensors``) writes the averaged weights back in the shape of the
latest averaged checkpoint, as its layout declares it (``Checkpoint.saved_model``, a ``SavedModel``): the
weights file names (``model.safetensors``, ``adapter_model.safetensors``, litgpt's ``lit_model.pth``...),
sharded behind an index when the input was or with ``--max-shard-size``, the sub-folders and the prefixes
that route tensors into them (a sentence-transformers module's ``2_Dense/model.safetensors``), and the side
files copied beside them (``config.json``, tokenizer files...). A checkpoint whose layout declares no shape
(a plain torch file, DCP, DeepSpeed) gives a bare ``model.safetensors``. Nothing here names a layout.

Side files come from folders this tool does not trust: only the names the layout declares, only regular
files (a FIFO would block, a device be read forever), a link only when it resolves inside the checkpoint,
at most ``MAX_SIDE_FILE_BYTES`` each and ``MAX_SIDE_FILES_BYTES`` together (a sparse file is small on disk,
not to copy), copied as bytes a block at a time (never held whole, parsed, executed or unpickled).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ema_average.checkpoints import Checkpoint, SavedModel
from ema_average.checkpoints.safetensors_format import TensorEntry
from ema_average.errors import CheckpointError
from ema_average.output.folder import ShardedWriter, WeightsFile
from ema_average.output.sizes import format_bytes

MAX_SIDE_FILE_BYTES = 64 * 2**20
# All side files of one folder output together: what is copied (and written) per output is bounded by this,
# whatever their sizes on disk (a sparse 64 MiB file takes a few KiB).
MAX_SIDE_FILES_BYTES = 256 * 2**20
DEFAULT_WEIGHTS_NAME = "model.safetensors"
_ONE_FILE = 2**62  # a shard size no model reaches: the weights in one file


@dataclass(frozen=True)
class SideFile:
    """A side file of a folder output: ``path``, a regular file inside the checkpoint ``unit``."""

    path: Path
    unit: Path

    def copy_into(self, writer: ShardedWriter, name: str, room: int) -> int:
        """Copy the file into ``writer`` as ``name``, streamed, checked again as it is opened; refused if it
        is larger than ``room`` (what is left of ``MAX_SIDE_FILES_BYTES``). Returns its size."""
        fd = _open_side_file(self.path, self.unit)
        try:
            size = os.fstat(fd).st_size
            if size > room:
                raise _too_large_together(self.path, self.unit)
            writer.copy_file(name, fd, size, self.path)
        finally:
            os.close(fd)
        return size


@dataclass(frozen=True)
class OutputFolder:
    """What a folder output holds: the weights' file name, how they are sharded, and the side files copied
    (output name -> the checkpoint file it is copied from, inside ``unit``). ``weights`` lays out several
    weights files instead (each in its sub-folder, or a torch file); ``folders`` are sub-folders made even
    when empty; ``declared`` every side file the layout allows, found or not."""

    weights_name: str = DEFAULT_WEIGHTS_NAME
    shard_bytes: int | None = None  # None: one weights file
    side_files: dict[str, Path] = field(default_factory=dict)
    unit: Path | None = None  # the checkpoint (or run folder) the side files come from
    weights: tuple[WeightsFile, ...] = ()
    folders: tuple[str, ...] = ()
    declared: tuple[str, ...] = ()  # every side file the layout allows: an earlier output may hold any

    def max_shard_size(self, asked: int | None) -> int:
        """``--max-shard-size`` when given, else the input's largest shard, else no sharding."""
        return asked or self.shard_bytes or _ONE_FILE

    def read_side_files(self) -> dict[str, SideFile]:
        """Every side file, to be copied into each output (checked again then: it may have changed since
        planning); nothing of them is read here."""
        if not self.side_files:
            return {}
        assert self.unit is not None
        return {name: SideFile(path, self.unit) for name, path in self.side_files.items()}

    def open_writer(
        self,
        output: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str],
        *,
        overwrite: bool,
        max_shard_size: int | None,
        side_files: dict[str, SideFile],
    ) -> ShardedWriter:
        """The writer of this folder at ``output``, its side files already in; ``max_shard_size`` is
        ``--max-shard-size`` (None: each weights file sharded as its input was)."""
        weights = [
            replace(w, max_shard_size=(max_shard_size or w.max_shard_size) if w.shardable else _ONE_FILE)
            for w in self.weights
        ]
        writer = ShardedWriter(
            output,
            entries,
            metadata,
            overwrite=overwrite,
            max_shard_size=self.max_shard_size(max_shard_size),
            weights_name=self.weights_name,
            side_files={*self.declared, *self.side_files},  # any may be in an earlier output replaced
            weights=weights or None,
            folders=self.folders,
        )
        try:
            copied = 0
            for name, side in side_files.items():
                copied += side.copy_into(writer, name, MAX_SIDE_FILES_BYTES - copied)
        except BaseException:
            writer.abort()
            raise
        return writer

    def describe(self, asked_shard_size: int | None = None) -> str:
        """One line for the plan: the weights' name and the side files copied, and from where."""
        if self.weights:
            weights = ", ".join(f"{w.folder}/{w.name}" if w.folder else w.name for w in self.weights)
        else:
            sharded = asked_shard_size or self.shard_bytes
            weights = self.weights_name + (
                f" (shards of at most {format_bytes(sharded)} + index)" if sharded else ""
            )
        if not self.side_files:
            return f"{weights}; no side files"
        sources = {path.parent for path in self.side_files.values()}
        source = sources.pop() if len(sources) == 1 else self.unit
        return f"{weights} + {', '.join(self.side_files)} (copied from {source})"


def is_folder(output: Path) -> bool:
    """An output name not ending ``.safetensors`` is a folder (the suffix is the only sign a user gives)."""
    return output.suffix != ".safetensors"


def plan_folder(latest: Checkpoint) -> OutputFolder:
    """What a folder output of a run whose latest averaged checkpoint is ``latest`` holds; every side file
    is checked now (their sizes together too), so a bad one is refused before any work."""
    folder = _plan_folder(latest)
    if folder.unit is not None:
        total = sum(_size(path) for path in folder.side_files.values())
        if total > MAX_SIDE_FILES_BYTES:
            raise _too_large_together(folder.unit, folder.unit)
    return folder


def _plan_folder(latest: Checkpoint) -> OutputFolder:
    """The output in the shape the latest checkpoint's layout declares, else a bare ``model.safetensors``."""
    saved = latest.saved_model
    if saved is None:
        return OutputFolder()
    unit = saved.unit or latest.path
    weights = tuple(
        WeightsFile(w.name, w.folder, w.prefix, w.shard_bytes, w.shardable) for w in saved.weights
    )
    return OutputFolder(
        weights_name=saved.weights_name,
        shard_bytes=saved.shard_bytes,
        side_files=_side_files(saved, unit),
        unit=unit,
        weights=weights,
        folders=saved.folders,
        declared=saved.side_files,
    )


def _side_files(saved: SavedModel, unit: Path) -> dict[str, Path]:
    """Output name -> file, for each side file ``saved`` declares that is there (in its folder, else in its
    fallback folder), each checked now."""
    side: dict[str, Path] = {}
    for name in saved.side_files:
        for folder in (saved.folder, saved.fallback):
            if folder is not None and os.path.lexists(folder / name):
                os.close(_open_side_file(folder / name, unit))
                side[name] = folder / name
                break
    return side


def _open_side_file(path: Path, unit: Path) -> int:
    """An open descriptor of ``path``, refused unless it is (or links to) a regular file inside ``unit``
    of at most ``MAX_SIDE_FILE_BYTES``. Stat before open (opening a device can act), fstat after (the
    file may have been swapped between the two)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(unit)):
        raise CheckpointError(
            path, f"links to {real}, outside the checkpoint {unit}; side files are not copied from there"
        )
    try:
        _check_regular(path, os.stat(real))
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        _check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(path, f"is {kind}; only regular files are copied as side files")
    if info.st_size > MAX_SIDE_FILE_BYTES:
        raise _too_large(path)


def _too_large(path: Path) -> CheckpointError:
    return CheckpointError(
        path, f"is larger than {MAX_SIDE_FILE_BYTES // 2**20} MiB, too large for a side file; refused"
    )


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _too_large_together(path: Path, unit: Path) -> CheckpointError:
    """The side files of ``unit`` past ``MAX_SIDE_FILES_BYTES`` together (found at planning, or at ``path``
    while copying, where they grew since)."""
    limit = MAX_SIDE_FILES_BYTES // 2**20
    where = "" if path == unit else f" (at {path.name})"
    return CheckpointError(
        unit,
        f"holds side files larger than {limit} MiB together{where}; a folder output copies no more; refused",
    )
