"""Helpers shared by the tests that are not fixtures (fixtures and producers live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path


class WritesMarker:
    """Unpickling this calls os.system to create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))
