"""Loading torch files without running code from them.

Every load goes through ``torch.load(..., weights_only=True)``. Trainers often put harmless data objects
beside the weights (fairseq's ``argparse.Namespace`` and omegaconf ``cfg``, numpy scalars for a loss),
which ``weights_only`` refuses. For a short list of such pure-data names we hand the unpickler an inert
stand-in class of our own under that name: it records nothing and calls nothing, so the file's tensors
load and no code the file names is ever imported or run. Any other global is refused with the names
listed, unless the user opts in with ``--trust-pickle`` (a full, unsafe ``torch.load``, with a warning).
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ema_average.errors import CheckpointError, UnsafeCheckpointError

# Pure data containers seen in real checkpoints; never imported, only stood in for.
_DATA_ONLY_PREFIXES = ("omegaconf.", "numpy.", "argparse.Namespace", "typing.", "pathlib.")
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
}


class InertStandIn(dict):
    """Whatever the pickle builds under a data-only name becomes this: an empty, inert dict.

    It accepts any construction, state, items or calls and keeps none of it (the tensors the pickle
    holds are rebuilt by torch's own allow-listed functions, outside of these objects).
    """

    __hash__ = object.__hash__

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


def is_data_only(name: str) -> bool:
    return name in _DATA_ONLY_NAMES or name.startswith(_DATA_ONLY_PREFIXES)


def load_torch_file(path: Path, *, trust_pickle: bool = False) -> tuple[Any, bool]:
    """The unpickled object and whether it is memory-mapped (lazy); never runs code from the file.

    Zip-format files (torch >= 1.6) are mapped, so tensors are not read until used; the legacy format
    cannot be mapped and is loaded whole (said in the plan).
    """
    mmap = zipfile.is_zipfile(path)
    if trust_pickle:
        warnings.warn(
            f"{path}: loading with full unpickling (--trust-pickle): this runs any code the file holds",
            stacklevel=2,
        )
        return _torch_load(path, mmap=mmap, weights_only=False), mmap
    stand_ins: list[tuple[type, str]] = []
    if mmap:  # globals can be listed without unpickling only in the zip format
        try:
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as exc:  # a damaged archive
            raise CheckpointError(path, f"cannot be read as a torch file ({_first_line(exc)})") from exc
        refused = [name for name in unsafe if not is_data_only(name)]
        if refused:
            raise _refusal(path, refused)
        stand_ins = [(InertStandIn, name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return _torch_load(path, mmap=mmap, weights_only=True), mmap
    except pickle.UnpicklingError as exc:  # legacy files: the refusal comes from the unpickler itself
        named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        raise _refusal(path, named or [_first_line(exc)]) from exc


def _torch_load(path: Path, *, mmap: bool, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise CheckpointError(path, f"cannot be read as a torch file ({_first_line(exc)})") from exc


def _refusal(path: Path, names: list[str]) -> UnsafeCheckpointError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return UnsafeCheckpointError(
        path,
        f"needs arbitrary unpickling ({shown}), which could run code; refused. "
        "If you trust this file, pass --trust-pickle",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
