"""safetensors files: steps from the header, exact reads, lazy reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_state, rss_growth
from ema_average.checkpoints import SafetensorsCheckpoint
from ema_average.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reads_what_safetensors_wrote(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "a.safetensors"
    save_file(dict(make_state(3, dtype)), str(path), metadata={"global_step": "300"})
    ckpt = SafetensorsCheckpoint(path)
    expected = load_file(str(path))
    assert set(ckpt.tensor_names()) == set(expected)
    for name, tensor in expected.items():
        assert ckpt.specs()[name].dtype == tensor.dtype
        assert torch.equal(ckpt.read(name), tensor)
        out = torch.empty_like(tensor)
        assert torch.equal(ckpt.read_into(name, out), tensor)
    assert ckpt.metadata_step() is not None
    assert (ckpt.metadata_step().step, ckpt.metadata_step().source) == (300, "metadata:global_step")
    ckpt.close()


def test_no_step_in_metadata(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    assert SafetensorsCheckpoint(tmp_path / "a.safetensors").metadata_step() is None


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors file"):
        SafetensorsCheckpoint(bad)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"t\.safetensors"):
        SafetensorsCheckpoint(path).read("w")


def test_reading_one_tensor_does_not_load_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.ones(64 * 2**20), "small": torch.arange(4.0)}, str(path))  # 256 MiB + 16 B
    ckpt = SafetensorsCheckpoint(path)
    grown = rss_growth(lambda: ckpt.read("small"))
    assert ckpt.read("small").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB reading 16 bytes"
    ckpt.close()
