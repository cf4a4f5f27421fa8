"""The one registry of checkpoint layouts: discovery loops over ``LAYOUTS``, in this order.

Adding a layout: write its module with a ``LAYOUT = Layout(...)`` (what it claims, how it opens, how it is
described), list it here, and add its row to docs/layouts.md's table. Folder layouts come first (a folder they
claim is one checkpoint and is not searched further), then file layouts.
"""

from __future__ import annotations

from pathlib import Path

from ema_average.checkpoints import dcp_folder, deepspeed_folder, hf_folder, safetensors_file, torch_file
from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions

LAYOUTS: tuple[Layout, ...] = (
    dcp_folder.LAYOUT,
    deepspeed_folder.LAYOUT,
    hf_folder.LAYOUT,
    safetensors_file.LAYOUT,
    torch_file.LAYOUT,
)


def layout_of(path: Path, unit: str) -> Layout | None:
    """The first layout of that kind (``"file"`` or ``"folder"``) that claims ``path``."""
    return next((layout for layout in LAYOUTS if layout.unit == unit and layout.claims(path)), None)


def looked_for() -> str:
    """What discovery looks for, for the "no checkpoints found" message: files first, then folders."""
    ordered = sorted(LAYOUTS, key=lambda layout: layout.unit != "file")
    return "; ".join(layout.looked_for for layout in ordered)


def open_leaf(path: Path, options: OpenOptions) -> Checkpoint:
    """Open a file or folder that a layout claims."""
    layout = layout_of(path, "folder" if path.is_dir() else "file")
    if layout is None:
        raise ValueError(f"no layout claims {path}")  # discovery only opens what a layout claimed
    return layout.open(path, options)


def open_weights_file(
    path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """A single weights file, by its name: safetensors, else a torch file (whatever its suffix)."""
    options = OpenOptions(state_dict_key=state_dict_key, trust_pickle=trust_pickle)
    if path.name.lower().endswith(".safetensors"):
        return safetensors_file.LAYOUT.open(path, options)
    return torch_file.LAYOUT.open(path, options)
