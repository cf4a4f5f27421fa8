"""Unpickling checkpoint files without running code from them: the one home of that policy.

torch files go through ``torch.load(..., weights_only=True)``. Trainers often put harmless data objects
beside the weights (fairseq's ``argparse.Namespace`` and omegaconf ``cfg``, numpy scalars for a loss,
``datetime`` stamps, ``torch.__version__``), which ``weights_only`` refuses. For a short list of such
pure-data names we hand the unpickler an inert stand-in class of our own under that name: it records
nothing and calls nothing, so the file's tensors load and no code the file names is ever imported or
run. A trainer's own objects (mmengine's ``HistoryBuffer``, a pickled model) load the same way as
placeholders that record their class's name (:mod:`ema_average.checkpoints.reading.placeholders`). Callables of
the standard library and of torch are refused with the names listed; ``--trust-pickle`` then opts in to
a full, unsafe ``torch.load``, with a warning, but only where the safe load failed (a refusal, a pickle
it cannot read) or found the weights in a pickled model; a package that full unpickling needs and that
is missing is named.

Before any load, the pickle is scanned once (:mod:`ema_average.checkpoints.reading.pickle_scan`): every global it
names (a legacy file is then loaded once, with all its stand-ins), and refusals of what would cost more than
the file (kinds past the cap, dict keys that expand exponentially, a compressed zip member) or what the safe
reader cannot read (a newer protocol). Every tensor loaded is then stripped of state the file gave it
(:mod:`ema_average.checkpoints.reading.tensor_state`).

DCP ``.metadata`` files are plain pickles of torch's own metadata dataclasses; they are read by
:mod:`ema_average.checkpoints.layouts.dcp_metadata`, which resolves only those classes and torch's constants.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average._platform.torch_compat import weights_only_allowed_globals
from ema_average.checkpoints.reading.file_checks import damage_of, require_regular_file
from ema_average.checkpoints.reading.pickle_scan import PickleRefused, scan_pickle
from ema_average.checkpoints.reading.placeholders import (
    MAX_PLACEHOLDERS,
    Placeholder,
    RefusedCall,
    inert_getattr,
    may_stand_in,
    placeholder_class,
)
from ema_average.checkpoints.reading.tensor_state import without_tensor_state
from ema_average.errors import (
    CheckpointError,
    MissingPackageError,
    TrustPickleWarning,
    UnsafeCheckpointError,
)

# Pure data seen in real checkpoints; never imported, only stood in for. An enum member pickles under
# its own class's name, so an enum is added here by its full name once a trainer is known to save one.
_DATA_ONLY_PREFIXES = ("omegaconf.", "numpy.", "argparse.Namespace", "typing.", "pathlib.", "datetime.")
_DATA_ONLY_NAMES = {
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.set",
    "builtins.frozenset",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.bytes",
    "collections.defaultdict",
    "collections.OrderedDict",
    "collections.deque",
    "torch.torch_version.TorchVersion",  # torch.__version__, a str subclass
    # DeepSpeed's optimizer partitions: an int enum, a loss scale's numbers, a (numel, start) pair.
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    # MosaicML composer's time records (a count and its unit enum), should a checkpoint hold them as objects.
    "composer.core.time.Timestamp",
    "composer.core.time.Time",
    "composer.core.time.TimeUnit",
}

# torch's weights_only refusals of a pickle's structure (an object that is a dict or list subclass, a
# call of something that is no global): the file needs more than data, which is no damage.
_REFUSED_STRUCTURE = re.compile(
    r"(Can only (?:build|create new object|append|extend|SETITEMS?)\b[^\n]*"
    r"|Trying to call reduce for unrecognized function[^\n]*)"
)

# How weights_only names a global it refuses (torch 2.x messages); builtins are shown without "builtins.".
_REFUSED_GLOBAL = re.compile(
    r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module|``(\S+)`` must be imported"
)

_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped), name length, extra length
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"
_DATA_PICKLE = re.compile(r"[^/]+/data\.pkl")


class InertStandIn(dict):
    """Whatever the pickle builds under a data-only name becomes this: an empty, inert dict.

    It accepts any construction, state, items or calls and keeps none of it (the tensors the pickle
    holds are rebuilt by torch's own allow-listed functions, outside of these objects).
    """

    # hashable by identity, as the objects it stands in for are (a dict is not)
    __hash__ = object.__hash__  # type: ignore[assignment]  # typeshed: dict.__hash__ is None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> InertStandIn:
        return InertStandIn()

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


# torch keeps the globals a weights_only load allows in one process-wide set, which its safe_globals()
# adds to on entry and removes from on exit: two threads loading at once (the reader pool, two ranks'
# files) removed each other's stand-ins mid-load, a false "needs arbitrary unpickling" now and then.
ALLOWED_GLOBALS_LOCK = threading.Lock()


def is_data_only(name: str) -> bool:
    """Whether ``name`` (``module.qualname``) is pure data we may stand in for."""
    return name in _DATA_ONLY_NAMES or name.startswith(_DATA_ONLY_PREFIXES)


def stand_in_for(name: str) -> Any | None:
    """What the unpickler gets for the global ``name`` instead of the real thing, or ``None`` where the
    name is refused: an inert dict for pure data, a placeholder for a trainer's object, ``getattr``
    only on placeholders."""
    if is_data_only(name):
        return InertStandIn
    if name == "builtins.getattr":
        return inert_getattr
    if may_stand_in(name):
        return placeholder_class(name)
    return None


def load_torch_file(path: Path, *, trust_pickle: bool = False) -> tuple[Any, bool]:
    """The unpickled object and whether it is memory-mapped (lazy); never runs code from the file.

    Zip-format files (torch >= 1.6) are mapped, so tensors are not read until used; the legacy format
    cannot be mapped and is loaded whole (said in the plan).
    """
    size = require_regular_file(path).st_size  # a FIFO would block the read forever
    damage = damage_of(path)
    if damage is not None:
        raise CheckpointError(path, damage)
    mmap = zipfile.is_zipfile(path)
    if mmap:
        check_zip_members(path, size)  # a record past the end of a mapped file is a SIGBUS, not an error
    return _load(path, trust_pickle, mmap=mmap)[0], mmap


@dataclass(frozen=True)
class ZipMember:
    """Where one member of a zip archive lies in its file: its bytes start at ``data_offset``."""

    name: str
    data_offset: int
    size: int  # bytes in the file (compressed size where it is compressed)
    stored: bool  # not compressed: the member's bytes are the file's bytes


@dataclass(frozen=True)
class TorchFile:
    """A torch file's unpickled object, its tensors not read.

    Zip files (``lazy``) are unpickled onto the meta device: each tensor's storage carries
    ``_checkpoint_offset``, where its bytes start in the file, and ``members`` gives the zip member that
    starts there (its size bounds what may be read). Otherwise the tensors are in memory: loaded whole
    (legacy files), or mapped (``mapped_because`` says why: a tensor the meta device cannot hold, such as
    a quantized one, a big-endian file, or a zip not laid out as ``torch.save`` writes it).
    """

    obj: Any
    planned: os.stat_result
    lazy: bool
    members: dict[int, ZipMember]
    mapped_because: str | None = None
    trusted: bool = False  # fully unpickled (--trust-pickle): real objects, the file's code run


_DATA_MEMBER = re.compile(r"[^/]+/data/[^/]+")


def open_torch_file(
    path: Path, *, trust_pickle: bool = False, mapped_because: str | None = None, full: bool = False
) -> TorchFile:
    """``path`` unpickled for reading its tensors later with ``pread``; never runs code from the file.

    The pickle goes through ``weights_only`` (or the user's ``--trust-pickle``) as in
    :func:`load_torch_file`; zip files are loaded with ``map_location="meta"``, so nothing of the tensor
    data is read or mapped (a file cut short later cannot SIGBUS). The legacy format is loaded whole.
    ``mapped_because``: map a zip file instead, for that reason. ``full``: unpickle fully at once
    (``--trust-pickle``, where the safe load found the weights in a pickled object).
    """
    planned = require_regular_file(path)
    damage = damage_of(path)
    if damage is not None:
        raise CheckpointError(path, damage)
    if not zipfile.is_zipfile(path):
        obj, trusted = _load(path, trust_pickle, mmap=False, full=full)
        return TorchFile(obj, planned, lazy=False, members={}, trusted=trusted)
    members = zip_members(path, planned.st_size)
    if mapped_because is not None:
        obj, trusted = _load(path, trust_pickle, mmap=True, full=full)
        return TorchFile(obj, planned, False, {}, mapped_because=mapped_because, trusted=trusted)
    data = {m.data_offset: m for m in members if _DATA_MEMBER.fullmatch(m.name)}
    if _big_endian(path, members):  # torch's meta loading swaps the (absent) bytes of meta storages: a crash
        return open_torch_file(
            path, trust_pickle=trust_pickle, mapped_because="big-endian, swapped as loaded", full=full
        )
    try:
        obj, trusted = _load(path, trust_pickle, mmap=False, meta=True, full=full)
    except (UnsafeCheckpointError, MissingPackageError):
        raise
    except CheckpointError as exc:  # a tensor the meta device cannot hold (quantized, nested)
        because = f"the meta device cannot hold its tensors ({first_line(exc.__cause__ or exc)})"
        return open_torch_file(path, trust_pickle=trust_pickle, mapped_because=because, full=full)
    return TorchFile(obj, planned, lazy=True, members=data, trusted=trusted)


def _load(
    path: Path, trust_pickle: bool, *, mmap: bool, meta: bool = False, full: bool = False
) -> tuple[Any, bool]:
    """The object unpickled with ``weights_only`` and stand-ins, and ``False``; or, where that fails
    (a refusal; a pickle it cannot read, such as protocol 4) or ``full`` asks, and the user trusts the
    file, fully unpickled, and ``True``."""
    if not full:
        try:
            obj = _load_with_stand_ins(path, mmap, _scanned_stand_ins(path), meta=meta)
            return without_tensor_state(path, obj), False
        except CheckpointError:
            if not trust_pickle:
                raise
    if not trust_pickle:
        raise ValueError("full unpickling is only for --trust-pickle")
    warnings.warn(
        f"{path}: loading with full unpickling (--trust-pickle): this runs any code the file holds",
        TrustPickleWarning,
        stacklevel=3,
    )
    return without_tensor_state(path, _torch_load(path, mmap=mmap, weights_only=False, meta=meta)), True


def _big_endian(path: Path, members: list[ZipMember]) -> bool:
    """Whether the archive says its tensor bytes are big-endian (torch writes ``byteorder``)."""
    record = next((m for m in members if m.name.endswith("/byteorder")), None)
    if record is None:
        return False  # before torch 1.12: written by little-endian machines
    if not record.stored or record.size > 8:
        raise CheckpointError(path, "is damaged: its byteorder record is not 'little' or 'big'")
    with open(path, "rb") as f:
        f.seek(record.data_offset)
        order = f.read(record.size)
    if order not in (b"little", b"big"):
        raise CheckpointError(path, f"is damaged: byteorder {order[:8]!r} is not 'little' or 'big'")
    return order == b"big"


def _scanned_stand_ins(path: Path) -> dict[str, Any]:
    """The file's globals, listed in one pass over its pickle without building anything: stand-ins for
    data and a trainer's objects, a refusal for the rest. The pass also refuses, before the load, what
    would cost more than the file (past 1,024 kinds of objects, a dict key that expands exponentially)
    and what the safe reader cannot read (a newer pickle protocol: not damage)."""
    with ALLOWED_GLOBALS_LOCK:  # the allowed names, less the stand-ins of a load under way
        allowed = weights_only_allowed_globals()
    try:
        names = _pickle_globals(path, allowed.__contains__)
    except PickleRefused as exc:
        error = UnsafeCheckpointError if exc.unsafe else CheckpointError
        raise error(path, str(exc)) from None
    stand_ins = {name: stand_in_for(name) for name in names}
    refused = [name for name, stand_in in stand_ins.items() if stand_in is None]
    if refused:
        raise unsafe_refusal(path, refused)
    return stand_ins


def _pickle_globals(path: Path, is_allowed: Callable[[str], bool]) -> list[str]:
    """The globals the file's pickle names that ``is_allowed`` does not allow. A zip's ``data.pkl`` is
    read as stored (a compressed member is refused by :func:`zip_members`); a legacy file holds four
    pickles in a row (magic number, protocol, system info, the object), then the storages."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        record = next((m for m in zip_members(path, size) if _DATA_PICKLE.fullmatch(m.name)), None)
        if record is None:
            raise CheckpointError(path, "is damaged or not a torch file (its zip holds no data.pkl)")
        with open(path, "rb") as f:
            f.seek(record.data_offset)
            data = io.BytesIO(f.read(record.size))
        return scan_pickle(data, record.size, is_allowed=is_allowed, max_kinds=MAX_PLACEHOLDERS).globals
    names: list[str] = []
    with open(path, "rb") as f:
        for _ in range(4):
            left = MAX_PLACEHOLDERS - len(names)
            found = scan_pickle(f, size - f.tell(), is_allowed=is_allowed, max_kinds=left).globals
            names.extend(name for name in found if name not in names)
    return names


def _load_with_stand_ins(path: Path, mmap: bool, stand_ins: dict[str, Any], *, meta: bool = False) -> Any:
    """One ``weights_only`` load with the stand-ins the scan of the pickle found (zip and legacy files
    alike: never a load per name refused). A name it still refuses is refused, never called damage."""
    try:
        return _load_allowing(path, mmap, stand_ins, meta=meta)
    except RefusedCall as exc:  # getattr on a real object
        raise unsafe_refusal(path, [exc.name]) from None
    except pickle.UnpicklingError as exc:
        named = refused_globals(str(exc))
        if named:
            raise unsafe_refusal(path, named) from exc
        raise _structure_refusal(path, exc) from exc  # the pickle's structure, or the pickle is broken
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:  # torch could not build something from what a placeholder stood in for
        objects = [
            name
            for name, stand_in in stand_ins.items()
            if isinstance(stand_in, type) and issubclass(stand_in, Placeholder)
        ]
        if not objects or exc.__cause__ is None:
            raise
        shown = ", ".join(objects[:3]) + (f" and {len(objects) - 3} more" if len(objects) > 3 else "")
        raise UnsafeCheckpointError(
            path,
            f"pickles objects of {shown}, which only their own code can rebuild "
            f"({first_line(exc.__cause__)}); refused. If you trust this file, pass --trust-pickle",
        ) from exc


def _load_allowing(path: Path, mmap: bool, stand_ins: dict[str, Any], *, meta: bool = False) -> Any:
    """A ``weights_only`` load with ``stand_ins`` allowed, one such load at a time: also one that needs
    none, which could otherwise resolve a name while another load's stand-in is allowed and build it after
    that was removed (a false "damaged")."""
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]]
    allowed = [(stand_in, name) for name, stand_in in sorted(stand_ins.items())]
    with ALLOWED_GLOBALS_LOCK, torch.serialization.safe_globals(allowed):
        return _torch_load(path, mmap=mmap, weights_only=True, meta=meta)


def refused_globals(message: str) -> list[str]:
    """The globals a ``weights_only`` error names as refused ("Unsupported global: GLOBAL x"), if any."""
    names = []
    for match in _REFUSED_GLOBAL.finditer(message):
        name = next(group for group in match.groups() if group)
        names.append(name if "." in name else f"builtins.{name}")
    return list(dict.fromkeys(names))


def _torch_load(path: Path, *, mmap: bool, weights_only: bool, meta: bool = False) -> Any:
    """``torch.load``; with ``meta``, tensors on the meta device, their storages marked with where their
    bytes start in the file (nothing of the data is read)."""
    try:
        return torch.load(path, map_location="meta" if meta else "cpu", mmap=mmap, weights_only=weights_only)
    except RefusedCall:
        raise  # a call we never make: refused by the caller
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise  # sorted into refusal or damage by the caller
        raise _damaged(path, exc) from exc
    except (ImportError, AttributeError) as exc:
        if weights_only:
            raise _damaged(path, exc) from exc
        raise _missing_package(path, exc) from exc
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise _damaged(path, exc) from exc


def _missing_package(path: Path, exc: ImportError | AttributeError) -> MissingPackageError:
    """Full unpickling needed a class that is not installed (``No module named 'mmengine'``, ``Can't get
    attribute 'X' on <module 'm'>``): the trainer's package, named, never "damaged"."""
    if isinstance(exc, ImportError):
        missing = f"module {exc.name!r}" if exc.name else first_line(exc)
        return MissingPackageError(
            path,
            f"pickles objects of {missing}, which is not installed here: the trainer's package is "
            "needed to unpickle them (--trust-pickle)",
        )
    return MissingPackageError(
        path,
        f"pickles an object whose class the installed package lacks ({first_line(exc)}): the trainer's "
        "own version of its package is needed to unpickle it (--trust-pickle)",
    )


def check_zip_members(path: Path, size: int) -> None:
    """Refuse a zip whose members (local header + data) do not all lie within its ``size`` bytes.

    torch slices storages out of a mapping of the file; reading a mapping past the end of its file is a
    SIGBUS (the process dies with no message), so a short file is one clear error before any mapping.
    """
    zip_members(path, size)


def zip_members(path: Path, size: int) -> list[ZipMember]:
    """Every member of the zip at ``path``, each checked to lie (local header and data) within its
    ``size`` bytes. Reads the central directory and one 30-byte local header per member."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _damaged(path, exc) from exc
    members = []
    with open(path, "rb") as f:
        for info in infos:
            if info.header_offset < 0 or info.header_offset + _ZIP_LOCAL_HEADER.size > size:
                raise _truncated(path, info.filename, size)
            f.seek(info.header_offset)
            signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
            if signature != _ZIP_LOCAL_SIGNATURE:
                raise CheckpointError(path, f"is damaged: zip member {info.filename!r} has no local header")
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
            if start + info.compress_size > size:
                raise _truncated(path, info.filename, size)
            if info.compress_type != zipfile.ZIP_STORED:
                raise _compressed(path, info)
            members.append(ZipMember(info.filename, start, info.compress_size, True))
    return members


def _compressed(path: Path, info: zipfile.ZipInfo) -> CheckpointError:
    """torch.save stores every member as it is; a compressed one would be inflated to any size (a few KB
    of deflate make hundreds of MB): what is read of a torch zip is its bytes on disk, at most."""
    return CheckpointError(
        path,
        f"has a compressed zip member {info.filename!r} ({info.compress_size} bytes inflating to "
        f"{info.file_size}), which torch.save never writes; refused (a torch zip is read as stored)",
    )


def _truncated(path: Path, member: str, size: int) -> CheckpointError:
    return CheckpointError(
        path, f"is truncated: zip member {member!r} extends past the end of the file ({size} bytes)"
    )


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(path, f"is damaged or not a torch file ({first_line(exc)})")


def _structure_refusal(path: Path, exc: BaseException) -> CheckpointError:
    """torch refused how the pickle builds an object (a dict subclass filled item by item): a refusal
    naming it; any other unpickling error is damage."""
    found = _REFUSED_STRUCTURE.search(str(exc))
    if found is None:
        return _damaged(path, exc)
    return UnsafeCheckpointError(
        path,
        f"pickles an object that cannot be rebuilt without its own code ({found.group(1)[:150]}); "
        "refused. If you trust this file, pass --trust-pickle",
    )


def unsafe_refusal(path: Path, names: list[str]) -> UnsafeCheckpointError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return UnsafeCheckpointError(
        path,
        f"needs arbitrary unpickling ({shown}), which could run code; refused. "
        "If you trust this file, pass --trust-pickle",
    )


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``; of a ``weights_only`` failure, the reason torch gives (after
    "WeightsUnpickler error:"), never its advice to load with ``weights_only=False``."""
    text = str(exc).strip()
    reason = text.partition("WeightsUnpickler error:")[2].strip()
    if reason:
        text = reason
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
