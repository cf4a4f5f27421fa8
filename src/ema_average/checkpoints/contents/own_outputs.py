"""What this tool's own outputs look like, so they are never taken as inputs: the marker key in a
safetensors header, the marker file beside a folder output's weights, and a post-hoc snapshot's profile
keys. Structural signs that need no layout to know the tool's outputs."""

from __future__ import annotations

import os
from pathlib import Path

from ema_average.checkpoints.reading.json_file import read_json
from ema_average.checkpoints.safetensors_format import read_header
from ema_average.errors import CheckpointError

# The key under which this tool marks its own outputs, so that they are never taken as inputs.
TOOL_MARKER_KEY = "ema_average_version"
# Beside a folder output's torch weights, which carry no metadata: the run's metadata under that key. A
# folder holding it is an output of this tool, whatever else it holds (lit_model.pth).
MARKER_FILE = "ema_average.json"
# What a post-hoc EMA snapshot records of its profile (written by :mod:`ema_average.online.posthoc_training`): one of these, beside its step.
POSTHOC_KEYS = ("posthoc_gamma", "posthoc_sigma_rel")


def is_posthoc_snapshot(path: Path) -> bool:
    """Whether ``path`` is a post-hoc EMA snapshot (its header names a profile): read by
    ``--method posthoc``, never taken as a checkpoint of the run. Reads the header only."""
    if not path.name.endswith(".safetensors"):
        return False
    try:
        metadata = read_header(path).metadata
    except (OSError, CheckpointError, ValueError):
        return False
    return any(key in metadata for key in POSTHOC_KEYS)


def marked_json(path: Path) -> bool:
    """``path`` is an index or ``MARKER_FILE`` this tool wrote: a JSON object whose ``metadata`` holds the
    tool's marker key. Anything unreadable (a FIFO, a link, deep nesting, not JSON) is not."""
    try:
        record = read_json(path, follow_links=False)
    except CheckpointError:
        return False
    metadata = record.get("metadata") if isinstance(record, dict) else None
    return isinstance(metadata, dict) and TOOL_MARKER_KEY in metadata


def in_marked_folder(path: Path) -> bool:
    """``path`` (a unit: a folder, or a file) is, or is in, a folder output of this tool: the folder holds
    the tool's ``MARKER_FILE``. A structural sign that needs no layout to know its own outputs."""
    folder = path if path.is_dir() else path.parent
    return os.path.lexists(folder / MARKER_FILE) and marked_json(folder / MARKER_FILE)
