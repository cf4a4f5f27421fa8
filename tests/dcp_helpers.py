"""Writing and editing DCP folders in tests: one process's ``dcp.save``, and a ``.metadata`` rewritten as an
attacker (or another producer) would."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_dcp(folder: Path, state: dict) -> None:
    """``torch.distributed.checkpoint.save`` of ``state`` into ``folder`` by this one process (its
    no-process-group warning silenced)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))


def rewrite_metadata(folder: Path, change: Callable[[Any], None]) -> None:
    """Edit a DCP .metadata the test wrote itself (so plain pickle is fine here), as an attacker would."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    change(metadata)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def olmo_core_look_alike(folder: Path) -> None:
    """olmo-core's filesystem writer pickles its own copy of DCP's ``_StorageInfo`` (same name, same
    fields, module ``olmo_core.distributed.checkpoint.filesystem``; reproduced: not installed)."""
    names = ["olmo_core", "olmo_core.distributed", "olmo_core.distributed.checkpoint"]
    module = types.ModuleType("olmo_core.distributed.checkpoint.filesystem")

    @dataclasses.dataclass
    class _StorageInfo:
        relative_path: str
        offset: int
        length: int

    _StorageInfo.__module__, _StorageInfo.__qualname__ = module.__name__, "_StorageInfo"
    module._StorageInfo = _StorageInfo  # type: ignore[attr-defined]
    fakes = {**{n: types.ModuleType(n) for n in names}, module.__name__: module}
    saved = {n: sys.modules.get(n) for n in fakes}
    sys.modules.update(fakes)
    try:

        def olmo(metadata: Any) -> None:
            for index, info in metadata.storage_data.items():
                metadata.storage_data[index] = _StorageInfo(info.relative_path, info.offset, info.length)

        rewrite_metadata(folder, olmo)
    finally:
        for name, before in saved.items():
            if before is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before
