"""DCP items are read from the planned data files only, and never become more bytes than they have on disk.

A DCP item is a ``torch.save`` archive in a slice of a ``.distcp`` file. torch never compresses one, but
its reader inflates DEFLATE members: 17 KB of items inflated to +780 MiB (issue 24), tensor items with no
cap at all. Every member must be stored, so an item unpacks to at most its own bytes (1x on disk).
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dcp_helpers import save_dcp
from ema_average.checkpoints import DcpCheckpoint, find_run
from ema_average.errors import CheckpointError
from helpers import make_state

dcp = pytest.importorskip("torch.distributed.checkpoint")


def deflated(archive: bytes) -> bytes:
    """``archive`` (a ``torch.save`` zip) rewritten with every member DEFLATE-compressed, as torch never
    writes but its reader reads."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(archive)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dest,
    ):
        for member in source.infolist():
            dest.writestr(member.filename, source.read(member), compresslevel=9)
    return out.getvalue()


def deflate_item(folder: Path, fqn: str, replacement: object = None) -> Path:
    """Point ``fqn``'s item at a DEFLATE copy of its archive (or of ``torch.save(replacement)``)
    appended to its data file (the metadata is this test's own, so plain pickle is fine here); returns
    the data file."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    [info] = [s for i, s in metadata.storage_data.items() if i.fqn == fqn]
    data = folder / info.relative_path
    with open(data, "rb") as f:
        f.seek(info.offset)
        archive = f.read(info.length)
    if replacement is not None:
        buffer = io.BytesIO()
        torch.save(replacement, buffer)
        archive = buffer.getvalue()
    packed = deflated(archive)
    start = data.stat().st_size
    with open(data, "ab") as f:
        f.write(packed)
    info.offset, info.length = start, len(packed)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return data


def test_a_compressed_tensor_item_is_refused_naming_its_file(tmp_path: Path) -> None:
    """The same values, DEFLATE-compressed: torch reads them, but nothing bounds what such an item
    unpacks to, so it is refused before it is unpacked."""
    save_dcp(tmp_path, {"model": dict(make_state(1))})
    data = deflate_item(tmp_path, "model.encoder.bias")
    ckpt = DcpCheckpoint(tmp_path)
    assert torch.equal(ckpt.read("encoder.weight"), make_state(1)["encoder.weight"])  # stored: read
    with pytest.raises(CheckpointError) as caught:
        ckpt.read("encoder.bias")
    assert str(caught.value).startswith(f"{data}: tensor 'model.encoder.bias' is a compressed archive (")
    assert str(caught.value).endswith("which torch never writes; refused")


def test_a_compressed_step_item_is_refused_naming_its_file(tmp_path: Path) -> None:
    save_dcp(tmp_path / "step-5", {"model": dict(make_state(1)), "train_state": {"step": 7}})
    data = deflate_item(tmp_path / "step-5", "train_state.step")
    with pytest.raises(CheckpointError) as caught:
        find_run(tmp_path)
    assert str(caught.value).startswith(f"{data}: byte item 'train_state.step' is a compressed archive (")


BOMB = """
import resource, sys
from pathlib import Path
from ema_average.checkpoints import DcpCheckpoint
from ema_average.errors import CheckpointError
ckpt = DcpCheckpoint(Path(sys.argv[1]))
with open("/proc/self/statm") as f:
    mapped = int(f.read().split()[0]) * resource.getpagesize()
limit = mapped + 128 * 2**20  # less than unpacking the item takes
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    ckpt.read("encoder.bias")
    print("read")
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.subprocess
def test_a_deflate_bomb_in_a_tensor_item_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    """A tensor item viewing 16 floats of a 256 MiB storage of zeros, compressed to about 250 KB:
    refused from the archive's directory, under an address-space limit of 128 MiB more than the child
    holds before the read (unpacking it takes 256 MiB)."""
    save_dcp(tmp_path, {"model": dict(make_state(1))})
    data = deflate_item(tmp_path, "model.encoder.bias", torch.zeros(64 * 2**20)[:16])
    assert data.stat().st_size < 2**20  # the whole folder is under 1 MiB on disk
    result = subprocess.run(
        [sys.executable, "-c", BOMB, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{data}: tensor 'model.encoder.bias' is a compressed archive ("), (
        result.stdout + result.stderr
    )
