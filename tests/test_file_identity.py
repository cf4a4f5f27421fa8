"""A data file replaced or rewritten between planning and reading is refused, in every layout (issue 24).

The promise: device, inode, size, modification time and change time are checked at every read. DCP read
its ``.distcp`` files by name at read time (torch's ``FileSystemReader``), so a replaced or rewritten data
file was averaged; and a rewrite that restores the size and the modification time (``os.utime``) was
averaged in every layout, since only ``st_ctime_ns`` (which no writer can set back) moves.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ema_average.checkpoints import DcpCheckpoint
from ema_average.checkpoints.base import Checkpoint
from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.layouts.torch_file import TorchCheckpoint
from ema_average.errors import CheckpointError
from helpers import make_state


def save_safetensors(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(make_state(seed)), str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def save_torch(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(make_state(seed)), folder / "model.pt")
    return folder / "model.pt"


def save_dcp(folder: Path, seed: int) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(make_state(seed)), checkpoint_id=str(folder))
    (data,) = folder.glob("*.distcp")
    return data


# layout -> (write a checkpoint from a seed and return its data file, open the checkpoint from that file)
LAYOUTS: dict[str, tuple[Callable[[Path, int], Path], Callable[[Path], Checkpoint]]] = {
    "safetensors": (save_safetensors, SafetensorsCheckpoint),
    "torch": (save_torch, TorchCheckpoint),
    "dcp": (save_dcp, lambda data: DcpCheckpoint(data.parent)),
}


def planned_and_other(tmp_path: Path, layout: str) -> tuple[Checkpoint, Path, Path]:
    """A checkpoint opened (planned) from seed 1, its data file, and the same layout's file for seed 2:
    the same names, shapes and size, other values."""
    save, open_ = LAYOUTS[layout]
    data = save(tmp_path / "a", 1)
    other = save(tmp_path / "b", 2)
    assert data.stat().st_size == other.stat().st_size
    ckpt = open_(data)
    assert torch.equal(ckpt.read("encoder.bias"), make_state(1)["encoder.bias"])  # read once as planned
    return ckpt, data, other


def wait_for_ctime_tick(path: Path) -> None:
    """Until the file system's clock has moved past ``path``'s change time (coarse clocks tick every few
    milliseconds): a rewrite now gets a change time of its own. Synchronises on the clock, not a sleep."""
    probe = path.parent / ".probe"
    probe.touch()
    while probe.stat().st_ctime_ns <= path.stat().st_ctime_ns:
        os.utime(probe)
    probe.unlink()


@pytest.mark.parametrize("held", [True, False], ids=["held-open", "closed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_data_file_replaced_after_planning_is_refused(tmp_path: Path, layout: str, held: bool) -> None:
    """Whether the planned file is still held open (then unlinked by the replacement) or its descriptor
    was handed back to the pool (then the name opens another inode)."""
    ckpt, data, other = planned_and_other(tmp_path, layout)
    if not held:
        ckpt.close()
    shutil.copyfile(other, tmp_path / "swap")
    os.replace(tmp_path / "swap", data)
    with pytest.raises(
        CheckpointError, match=rf"{data.name}: was replaced by another file since it was planned"
    ):
        ckpt.read("encoder.weight")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_rewrite_that_restores_size_and_mtime_is_refused(tmp_path: Path, layout: str) -> None:
    ckpt, data, other = planned_and_other(tmp_path, layout)
    planned = data.stat()
    wait_for_ctime_tick(data)
    with open(data, "r+b") as f:  # same inode, same size, other values
        f.write(other.read_bytes())
    os.utime(data, ns=(planned.st_atime_ns, planned.st_mtime_ns))  # the modification time set back
    now = data.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (
        planned.st_ino,
        planned.st_size,
        planned.st_mtime_ns,
    )
    with pytest.raises(CheckpointError, match=rf"{data.name}: was modified since it was planned"):
        ckpt.read("encoder.weight")
