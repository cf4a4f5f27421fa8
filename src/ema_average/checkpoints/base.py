"""What every checkpoint layout offers the pipeline: its step and lazy, one-tensor-at-a-time access."""

from __future__ import annotations

import errno
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ema_average.checkpoints.contents.parts import ModelChoice
from ema_average.checkpoints.contents.steps import StepInfo, step_from_name
from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.errors import CheckpointError

_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


@dataclass(frozen=True)
class OpenOptions:
    """How the user asked units to be read; every layout's ``open`` takes these, using what applies."""

    state_dict_key: str | None = None  # the key of a torch file's dict holding the weights (dotted)
    trust_pickle: bool = False  # full unpickling, unsafe: only on the user's word
    submodel: str | None = None  # which model of a unit holding several (a folder, a weight file, "fp32")


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout as discovery sees it: what it claims, how it opens, how it is described, and
    the optional hooks a folder layout answers (each None where the layout has nothing to say).

    ``unit`` says whether it claims files or folders; ``claims`` is cheap (names and stats only, never
    unpickling); ``looked_for`` completes "no checkpoints found; looked for ...". ``open`` gives the reading
    side; the writing side, how a folder output gives the model back in the layout's shape (weights files,
    sub-folders, prefixes, the side files it may copy), is the checkpoint's ``saved_model``, a
    :class:`SavedModel` the layout fills.

    A step of a run is often a folder around other layouts' checkpoints (the HF Trainer's ``checkpoint-N/``
    around a DeepSpeed ``global_stepN/``, a diffusers ``checkpoint-N/`` around ``unet/`` and ``unet_ema/``).
    Discovery knows layouts only through the registry and asks these hooks of whichever layouts have them:

    - ``models(folder)``: the models ``folder`` holds directly, as (name, the file that opens it), preferred
      first: how a step folder's own weights are named for ``--submodel`` and listed in notices;
    - ``side_step(folder)``: a step from the files a trainer writes beside the weights (any step folder
      is asked, not only the ones this layout claims);
    - ``side_step_problem(folder)``: why such a file gave no step, for the plan;
    - ``name_step(folder)``: the step a folder's name carries where the layout knows its naming (a count of
      saves rather than steps); discovery falls back to the name patterns of ``contents/steps.py``;
    - ``own_model(folder, names)``: the folder's own save as its library loads it, where the weights read
      from another layout inside it (tensor ``names``) are that model: what a folder output copies;
    - ``own_folders(folder)``: the sub-folders that are part of the checkpoint (a sentence-transformers
      model's module folders): discovery does not search them for more models;
    - ``side_folder(folder)``: why a folder this layout claims, found beside other models in a step
      folder, is a trainer's side folder and not a model (optimizer state only), or None: discovery
      skips it with a notice, where another model remains.

    ``before`` names the layout this one must be asked before, for one another package declares through
    the ``ema_average.layouts`` entry points (``register(layout, before=...)`` in process).
    """

    name: str
    unit: Literal["file", "folder"]
    looked_for: str
    claims: Callable[[Path], bool]
    open: Callable[[Path, OpenOptions], Checkpoint]
    models: Callable[[Path], list[tuple[str, Path]]] | None = None
    side_step: Callable[[Path], StepInfo | None] | None = None
    side_step_problem: Callable[[Path], str | None] | None = None
    name_step: Callable[[Path], StepInfo | None] | None = None
    own_model: Callable[[Path, set[str]], SavedModel | None] | None = None
    own_folders: Callable[[Path], list[str]] | None = None
    side_folder: Callable[[Path], str | None] | None = None
    before: str | None = None


@dataclass(frozen=True)
class SavedWeights:
    """One weights file of a model as its library saves it, where a folder output writes it back: its name,
    the sub-folder it lies in (``""``: the top), the prefix its tensors carry in the checkpoint read (stored
    in the file without it: a sentence-transformers module's ``2_Dense/linear.weight`` is
    ``2_Dense/model.safetensors``'s ``linear.weight``), its largest shard's bytes where it was sharded, and
    whether its library reads shards behind an index at all (``--max-shard-size`` splits only those). A
    ``.safetensors`` name is written in safetensors; any other name as one ``torch.save`` of the plain
    state dict (litgpt's ``lit_model.pth``)."""

    name: str
    folder: str = ""
    prefix: str = ""
    shard_bytes: int | None = None
    shardable: bool = True


@dataclass(frozen=True)
class SavedModel:
    """How the model read is saved, so that a folder output (``-o DIR``) gives it back in the shape its
    library loads: a layout's writing side, declared as data (the output code names no layout).

    - ``folder``: the model's folder, where its side files are found;
    - ``weights_name`` / ``shard_bytes``: its one weights file (sharded behind an index when the input was),
      or ``weights``: several weights files instead, each routed by the prefix of the tensors it holds;
    - ``folders``: sub-folders the output has even when empty (a module with neither weights nor config);
    - ``side_files``: the only files copied beside the weights, as names in the output (``config.json``,
      ``2_Dense/config.json``), each from ``folder / name`` where it is there, else from ``fallback /
      name`` (litgpt's ``final/``); every one of them may be in an earlier output that ``--overwrite``
      replaces. None of them is ever parsed: they are copied as bytes, checked to be small regular files;
    - ``unit``: the folder every side file must lie in (a link leading out of it is refused); None: the
      checkpoint read (its folder).
    """

    folder: Path
    weights_name: str = "model.safetensors"
    shard_bytes: int | None = None
    weights: tuple[SavedWeights, ...] = ()
    folders: tuple[str, ...] = ()
    side_files: tuple[str, ...] = ()
    fallback: Path | None = None
    unit: Path | None = None


class Checkpoint(ABC):
    """One saved state of a training run: a file, or a folder of files (HF, DCP).

    ``step`` and ``step_origin`` are filled in by discovery; ``metadata_step()`` is what the file itself
    says. Tensors are read one at a time with :meth:`read`, never all at once.
    """

    # Class defaults, set again per instance where only the opened file tells (a torch file that is
    # Lightning's, a legacy file loaded whole) or a wrapper takes its inner checkpoint's.
    layout: str = "?"
    lazy: bool = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step: int | None = None
        self.step_origin = ""
        self.step_is_counter = False  # the step counts saves or epochs (see StepInfo.counter)
        self.final_copy: str | None = None  # why it is a final copy of the weights, not a step of the run
        self.notes: list[str] = []
        self.choices: list[ModelChoice] = []  # outermost first, where a unit holds several models
        # How a folder output gives this checkpoint's model back, where the layout that opened it reads its
        # files through another's reader (litgpt's torch files) and says so here; see ``saved_model``.
        self.saved_as: SavedModel | None = None

    @property
    def model(self) -> str:
        """Which model of the unit was read (``unet/diffusion_pytorch_model``, ``state_dict``), or ``""``."""
        return "/".join(choice.read for choice in self.choices)

    @property
    def other_models(self) -> dict[str, str]:
        """The unit's other models, each with the flag that reads it instead."""
        return {name: flag for choice in self.choices for name, flag in choice.others.items()}

    @property
    def saved_model(self) -> SavedModel | None:
        """How the model read is saved, for a folder output to give it back in that shape (its layout's
        own, see :class:`SavedModel`); None where it has no shape of its own (a plain torch file, DCP,
        DeepSpeed): the output is then a bare ``model.safetensors``. Layouts whose class knows it override
        this; by default it is what the layout that opened the checkpoint set as ``saved_as``."""
        return self.saved_as

    @property
    def written_by_this_tool(self) -> bool:
        """An output of this tool (its marker found in the unit's own files): never read as an input.
        Discovery also takes any unit in a folder holding the tool's ``ema_average.json`` mark as one."""
        return False

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor of the model state by name, in saved order."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU; reading it does not load the rest of the file."""

    def metadata_step(self) -> StepInfo | None:
        """The step recorded inside the checkpoint, if any."""
        return None

    def name_step(self) -> StepInfo | None:
        """The step its file or folder name carries; layouts that know a name is a counter say so."""
        return step_from_name(self.path)

    def aliases(self) -> dict[str, str]:
        """Names that share storage with an earlier name (tied weights): alias -> first name."""
        return {}

    def tensor_names(self) -> list[str]:
        return list(self.specs())

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into ``out`` (a contiguous CPU tensor of its size and dtype) and return it.

        Layouts that can read bytes straight into a reused buffer override this; the default copies.
        """
        out.copy_(self.read(name))
        return out

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of ``name`` (flattened) into ``out`` (1-d, contiguous,
        of the tensor's dtype), for streaming tensors larger than a chunk.

        Layouts that can read a byte range (files read with ``pread``, mapped files) override this; the
        default reads the whole tensor and copies the slice.
        """
        out.copy_(self.read(name).reshape(-1)[start : start + out.numel()])
        return out

    def close(self) -> None:  # noqa: B027 - optional: most layouts hold nothing open
        """Release open files and mappings; reads after this reopen them."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, step={self.step})"


def require_regular_file(path: Path) -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file.

    A FIFO named like a checkpoint would block the read forever, and a link to /dev/zero or
    /dev/urandom would be read until memory runs out.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(path, f"is {kind}; only regular files are read")
    return info


class PreadFile:
    """A checkpoint file whose tensor bytes are read with ``pread`` straight into given buffers.

    No mapping: a file cut short while it is read gives a clear error, never a SIGBUS. Descriptors come
    from one process-wide pool of a bounded size (a run of 1,100 checkpoints fits ``ulimit -n 1024``); a
    file whose descriptor was handed back is reopened on its next read. Every read checks that the file is
    still the one planned (device, inode, size, modification time), so a file replaced or rewritten since
    its header was read is refused rather than read at stale offsets. The change time is compared too: a
    rewrite that restores the size and the modification time (``os.utime``) still moves ``st_ctime_ns``.
    """

    def __init__(self, path: Path, planned: os.stat_result) -> None:
        self.path = path
        self.planned = planned
        self.fd: int | None = None
        self.users = 0  # reads under way: the pool never closes a descriptor in use
        self.closing = False

    def read_into(self, out: torch.Tensor, offset: int, name: str) -> torch.Tensor:
        """``out.nbytes`` bytes of the file from byte ``offset`` into ``out`` (contiguous, on the CPU)."""
        size = out.numel() * out.element_size()
        if size == 0:
            return out
        view = out.reshape(-1).view(torch.uint8).numpy().data
        with self.opened(name, offset + size) as fd:
            done = 0
            while done < size:  # pread may return short counts on large reads
                try:
                    n = os.preadv(fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise CheckpointError(
                        self.path, f"read failed in tensor {name!r} ({exc.strerror})"
                    ) from exc
                if n == 0:
                    raise CheckpointError(self.path, f"file ends inside tensor {name!r} (truncated?)")
                done += n
        return out

    @contextmanager
    def opened(self, name: str, end: int) -> Iterator[int]:
        """A descriptor of the file, checked to be the one planned and to reach byte ``end``, held open
        while the caller reads through it (a reader that is not ``read_into``: DCP's ``torch.load``)."""
        fd = DESCRIPTORS.acquire(self)
        try:
            self._check_unchanged(fd, name, end)
            yield fd
        finally:
            DESCRIPTORS.release(self)

    def _check_unchanged(self, fd: int, name: str, end: int) -> None:
        """Refuse to read a file that is no longer the one planned (the header's offsets no longer hold)."""
        now = os.fstat(fd)
        was = self.planned
        if (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino) or now.st_nlink < was.st_nlink:
            # another inode under the name, or the planned one unlinked (replaced while held open)
            raise CheckpointError(self.path, "was replaced by another file since it was planned; refused")
        if now.st_size < end:
            raise CheckpointError(
                self.path,
                f"file ends inside tensor {name!r} (truncated? {was.st_size} bytes when planned, "
                f"{now.st_size} now)",
            )
        if changed_since(now, was):
            raise CheckpointError(
                self.path,
                f"was modified since it was planned ({was.st_size} -> {now.st_size} bytes); refused",
            )

    def close(self) -> None:
        DESCRIPTORS.close(self)


def changed_since(now: os.stat_result, planned: os.stat_result) -> bool:
    """Whether the same file (device and inode already compared) was written to since ``planned``: its
    size, modification time or change time moved (``st_ctime_ns`` cannot be set back by the writer)."""
    return (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
        planned.st_size,
        planned.st_mtime_ns,
        planned.st_ctime_ns,
    )


class _DescriptorPool:
    """The open descriptors of every :class:`PreadFile`, at most :func:`read_descriptor_limit` of them
    (plus any in use at once, at most one per reading thread); the least recently used idle one is closed
    to make room. One lock: files are read from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[PreadFile, None] = OrderedDict()

    def acquire(self, file: PreadFile) -> int:
        with self._lock:
            if file.fd is None:
                self._make_room(read_descriptor_limit() - 1)
                file.fd = self._open_file(file)
                file.closing = False
            self._open[file] = None
            self._open.move_to_end(file)
            file.users += 1
            return file.fd

    def release(self, file: PreadFile) -> None:
        with self._lock:
            file.users -= 1
            if file.closing and file.users == 0:
                self._close(file)

    def close(self, file: PreadFile) -> None:
        with self._lock:
            if file.users:
                file.closing = True  # closed by the last read under way
            elif file.fd is not None:
                self._close(file)

    def _make_room(self, keep: int) -> None:
        for file in [f for f in self._open if f.users == 0][: max(0, len(self._open) - keep)]:
            self._close(file)

    def _open_file(self, file: PreadFile) -> int:
        try:
            return _open_for_reading(file.path)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise _unreadable(file.path, exc) from exc
        self._make_room(0)  # other parts of the process hold many: give back every idle one, once
        try:
            return _open_for_reading(file.path)
        except OSError as exc:
            raise _unreadable(file.path, exc) from exc

    def _close(self, file: PreadFile) -> None:
        self._open.pop(file, None)
        if file.fd is not None:
            os.close(file.fd)
            file.fd = None
        file.closing = False


def _open_for_reading(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        soft = _soft_limit()
        limit = f" (ulimit -n is {soft})" if soft is not None else ""
        return CheckpointError(path, f"cannot be opened: too many open files{limit}; raise the limit")
    return CheckpointError(path, f"cannot be read ({exc.strerror or exc})")


DESCRIPTORS = _DescriptorPool()
_MAX_READ_DESCRIPTORS = 256


def _soft_limit() -> int | None:
    """This process's limit on open files (``ulimit -n``), or None where there is none or it is unknown."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def read_descriptor_limit() -> int:
    """How many checkpoint files are kept open for reading at once: a quarter of ``ulimit -n`` (the
    rest is left to outputs, shards, libraries), between 4 and 256."""
    soft = _soft_limit()
    if soft is None:
        return _MAX_READ_DESCRIPTORS
    return max(4, min(_MAX_READ_DESCRIPTORS, soft // 4))


def damage_of(path: Path) -> str | None:
    """A plain-words diagnosis of a file that is not what its name says, from its first bytes.

    So that a Git LFS pointer (a clone made without ``git lfs pull``) is named as such, rather than
    reported as a corrupt or unsafe checkpoint.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:
        return None
    if head == _LFS_POINTER:
        return "is a Git LFS pointer, not the weights: fetch the real file with `git lfs pull`"
    return None
