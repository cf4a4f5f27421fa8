"""DCP ``.metadata`` files, unpickled without running code from them: only torch's own DCP classes.

torch's ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which runs whatever the file names.
:class:`DcpMetadataUnpickler` resolves only the pure-data classes of torch's DCP (``Metadata`` and what it
is made of, and the planner's ``SavePlan``/``WriteItem``... that producers such as megatron-core's
``torch_dist`` store beside it), look-alike copies of them (olmo-core's ``_StorageInfo``) and torch's
dtype/layout constants. Before it runs, :mod:`ema_average.checkpoints.reading.pickle_scan` bounds what hashing
the file's objects costs (a 1.5 KB tuple DAG used as a dict key took 2^34 hashes).
Split from :mod:`ema_average.checkpoints.reading.safe_unpickle`, which holds the policy for torch files.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import torch

from ema_average._platform.torch_compat import layout_unpickler
from ema_average.checkpoints.reading.file_checks import damage_of, require_regular_file
from ema_average.checkpoints.reading.pickle_scan import PickleRefused, scan_pickle
from ema_average.checkpoints.reading.safe_unpickle import first_line, unsafe_refusal
from ema_average.errors import CheckpointError, TrustPickleWarning

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
    # The planner's dataclasses: megatron-core's torch_dist saves keep every rank's SavePlan in
    # Metadata.all_local_plans (megatron/core/dist_checkpointing/strategies/state_dict_saver.py).
    "torch.distributed.checkpoint.planner": (
        "SavePlan",
        "LoadPlan",
        "WriteItem",
        "ReadItem",
        "WriteItemType",
        "LoadItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    ),
    # Where older torch (before 2.2) defined TensorProperties; same fields and state.
    "torch.distributed._shard.sharded_tensor.metadata": ("TensorProperties", "MEM_FORMAT_ENCODING"),
}

# StorageMeta.checkpoint_id is the path the checkpoint was saved to: rebuilt as a pure path (no I/O).
_PATH_CLASSES: dict[str, type] = {
    f"{module}.{kind}{flavour}": pure
    for module in ("pathlib", "pathlib._local")
    for flavour, pure in (("PosixPath", PurePosixPath), ("WindowsPath", PureWindowsPath))
    for kind in ("", "Pure")
}


class RefusedGlobal(pickle.UnpicklingError):
    """A DCP ``.metadata`` names a global outside the allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class DcpMetadataUnpickler(pickle.Unpickler):
    """Resolves only what torch's DCP ``Metadata`` is made of; any other global is refused.

    Allowed: the DCP metadata and planner dataclasses and their enums, ``torch.Size``, the
    ``torch.dtype``/``torch.layout``/``torch.memory_format`` constants (pickled as ``torch.float32``...),
    ``torch.serialization._get_layout`` (how a layout pickles), ``collections.OrderedDict`` and pure
    paths. All of them only build data; none touches files or runs other code.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = dcp_metadata_global(module, name)
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


# Trainers that copy DCP's pure-data classes into their own package, with the same name and fields, read
# as DCP's own: olmo-core's filesystem writer pickles its own _StorageInfo and _StoragePrefix.
_LOOK_ALIKES = {
    f"olmo_core.distributed.checkpoint.filesystem.{name}": f"torch.distributed.checkpoint.filesystem.{name}"
    for name in ("_StorageInfo", "_StoragePrefix")
}


def dcp_metadata_global(module: str, name: str) -> Any | None:
    """The object DCP metadata may name as ``module.name``, or ``None`` where it is not allowed."""
    module, _, name = _LOOK_ALIKES.get(f"{module}.{name}", f"{module}.{name}").rpartition(".")
    if module == "torch" and name.isidentifier():
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or value is torch.Size:
            return value
        return None
    return _dcp_allowed().get(f"{module}.{name}")


@functools.cache
def _dcp_allowed() -> dict[str, Any]:
    import importlib

    allowed: dict[str, Any] = dict(_PATH_CLASSES)
    allowed["collections.OrderedDict"] = collections.OrderedDict
    allowed["torch.serialization._get_layout"] = layout_unpickler()
    for module_name, names in _DCP_CLASSES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):  # a class another torch version lacks is simply not allowed
                allowed[f"{module_name}.{name}"] = getattr(module, name)
    return allowed


def load_dcp_metadata(path: Path, *, trust_pickle: bool = False) -> Any:
    """The unpickled DCP ``.metadata`` at ``path``, built only from allow-listed data classes.

    torch's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, which runs whatever the
    file names. ``trust_pickle`` opts in to that (with a warning naming the file) only where the
    restricted load refused the file for a global it names: a file it reads is read by it, flag or not.
    """
    require_regular_file(path)
    damage = damage_of(path)
    if damage is not None:
        raise CheckpointError(path, damage)
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        # Read whole where small (walked a third faster); a larger one (a sparse giant) is streamed
        # from the file, never held in memory nor mapped (a mapping cut short ends the process).
        data: BinaryIO = io.BytesIO(f.read()) if size <= _IN_MEMORY_BYTES else f
        return _load(path, data, size, trust_pickle)


# A .metadata up to this size is read into memory at once: a model of 1,000 tensors in 128 shards, with
# its optimizer, writes about 80 MB.
_IN_MEMORY_BYTES = 64 * 2**20


def _load(path: Path, data: BinaryIO, size: int, trust_pickle: bool) -> Any:
    try:  # any protocol: what hashing its objects costs, bounded before anything is built
        scan_pickle(data, size, torch_opcodes=False, what="DCP metadata")
    except PickleRefused as exc:
        raise CheckpointError(path, str(exc)) from None
    data.seek(0)
    try:
        return DcpMetadataUnpickler(data).load()
    except RefusedGlobal as exc:
        if not trust_pickle:
            raise unsafe_refusal(path, [exc.name]) from exc
        refused = exc.name
    except Exception as exc:  # truncated, garbage, or objects that do not fit their classes
        raise CheckpointError(path, f"is damaged or not DCP metadata ({first_line(exc)})") from exc
    warnings.warn(
        f"{path}: loading with full unpickling (--trust-pickle): it names {refused}, which the safe "
        "reader refuses; this runs any code the file holds",
        TrustPickleWarning,
        stacklevel=3,
    )
    data.seek(0)
    try:
        return pickle.load(data)
    except Exception as exc:
        raise CheckpointError(path, f"is damaged or not DCP metadata ({first_line(exc)})") from exc
