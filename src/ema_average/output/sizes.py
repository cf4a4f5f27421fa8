"""Byte counts as people write them (``--max-shard-size 5GB``) and read them (plans, summaries).

Torch-free, so the command parses sizes where typer parses options. Hand-written: a ten-line job that no
dependency is worth.
"""

from __future__ import annotations

import os
import re

from ema_average.errors import ConfigurationError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE | re.ASCII)  # ASCII digits only
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from "512MB", "4GiB", "1.5G" or "1000000" (decimal units, binary with an ``i``)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(f"not a size: {text!r} (use e.g. 512MB, 4GiB, 2G)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    base = unit[:1] if unit[:1] in "kmgt" else ""
    scale = 1024 ** ("kmgt".index(base) + 1) if (binary and base) else _UNITS[base]
    value = int(number * scale)
    if value <= 0:
        raise ConfigurationError(f"size must be positive: {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def physical_memory() -> int | None:
    """This machine's RAM in bytes, where the OS says (not on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
