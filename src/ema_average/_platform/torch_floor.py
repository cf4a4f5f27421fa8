"""The oldest torch this package runs on, checked when the package is imported, before torch is.

2.13 is the oldest torch the whole test suite was run on (older CPU builds cannot be installed where the
suite runs); the package also leans on APIs older releases lack (``torch.uint16`` came in 2.3,
``serialization.safe_globals`` with (class, name) pairs later still). One clear line beats an
``AttributeError`` deep inside a run. The version is read from torch's ``version.py`` without importing
torch, so ``--version`` and ``--help`` stay fast.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import os
import sys

OLDEST_TORCH = (2, 13)


def check_torch_version() -> None:
    """Raise ImportError with one line when the torch that would be imported is older than OLDEST_TORCH."""
    found = _installed_torch_version()
    if found is None:
        return  # no torch: the import that needs it says so
    release = _major_minor(found)
    if release is None or release >= OLDEST_TORCH:
        return
    oldest = ".".join(map(str, OLDEST_TORCH))
    raise ImportError(
        f"ema-average needs torch {oldest} or newer (the oldest it is tested on); this environment has "
        f"torch {found}: pip install 'torch>={oldest}'"
    )


def _installed_torch_version() -> str | None:
    """torch.__version__, read from the loaded module or from the source of the one that would load."""
    loaded = sys.modules.get("torch")
    if loaded is not None:
        return str(getattr(loaded, "__version__", "")) or None
    spec = importlib.machinery.PathFinder.find_spec("torch")  # importlib.util would cost 5 ms more
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "version.py")
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read(4096)
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.split(":")[0].strip() == "__version__":  # also '__version__: str = ...'
            return value.strip().strip("'\"") or None
    return None


def _major_minor(version: str) -> tuple[int, int] | None:
    """(2, 13) from '2.13.0+cpu' or '2.13.0a0+git1234'; None when it does not start that way (not
    importing ``re`` or ``packaging`` keeps the package's import fast)."""
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    minor = "".join(itertools.takewhile(str.isdigit, parts[1]))
    return (int(parts[0]), int(minor)) if minor else None
