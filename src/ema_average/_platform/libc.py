"""Linux libc calls that Python does not wrap (or not as needed), looked up once through ctypes.

Written by hand because no maintained library exposes them: ``sync_file_range`` (start writeback early),
``renameat2`` (atomic exchange / no-replace rename of a folder), ``madvise`` on a mapping torch made,
``signal`` (the OS disposition alone, without Python's pending-signal window) and glibc's ``mallopt``.
Each lookup gives ``None`` off Linux or where libc lacks the call; callers then fall back.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

__all__ = ["libc_call"]


@functools.cache
def libc_call(name: str, *argtypes: type) -> Callable[..., int] | None:
    """libc's ``name`` with these argument types and an ``int`` result (errno kept), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call
