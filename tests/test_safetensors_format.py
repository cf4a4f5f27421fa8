"""The safetensors format read strictly: shapes no tensor can have are refused at the header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli
from ema_average.checkpoints.safetensors_format import read_header
from ema_average.errors import CheckpointError
from helpers import make_state


def with_extra_tensor(source: Path, target: Path, name: str, dtype: str, shape: list[int]) -> None:
    """``source`` (a file safetensors wrote) with one more tensor of no bytes in its header, as a hand or
    another writer could make it: the entry sits at the end of the data section."""
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data)]}
    encoded = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


IMPOSSIBLE = {
    "a dim of 2**63": ([2**63, 0], r"has shape \[9223372036854775808, 0\], beyond what torch can index"),
    "strides past int64": ([0, 2**62, 4], r"has shape \[0, 4611686018427387904, 4\], beyond what torch"),
    "nonzero dims overflowing": ([2**40, 2**40, 0], r"has shape \[1099511627776, 1099511627776, 0\], beyond"),
    "65 dims": ([1] * 64 + [0], r"has 65 dimensions, more than the 64 any tensor has; refused"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_a_shape_no_tensor_can_have_is_refused_at_the_header(tmp_path: Path, case: str) -> None:
    shape, message = IMPOSSIBLE[case]
    save_file(dict(make_state(1)), str(tmp_path / "plain.safetensors"))
    with_extra_tensor(tmp_path / "plain.safetensors", tmp_path / "odd.safetensors", "pos.empty", "F32", shape)
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors: tensor 'pos\.empty' {message}"):
        read_header(tmp_path / "odd.safetensors")


def test_possible_empty_shapes_are_read(tmp_path: Path) -> None:
    """Empty tensors torch can hold, up to the edge of int64, stay readable (a model may have them)."""
    save_file(dict(make_state(1)), str(tmp_path / "plain.safetensors"))
    shape = [2**63 - 1, 0]
    with_extra_tensor(tmp_path / "plain.safetensors", tmp_path / "ok.safetensors", "pos.empty", "U8", shape)
    assert read_header(tmp_path / "ok.safetensors").entries["pos.empty"].shape == tuple(shape)
    assert torch.empty(shape, dtype=torch.uint8).numel() == 0  # torch agrees it can be
    save_file(
        {"w": torch.ones(2), "e": torch.empty(0, 3, dtype=torch.bfloat16)}, str(tmp_path / "e.safetensors")
    )
    entries = read_header(tmp_path / "e.safetensors").entries
    assert entries["e"].shape == (0, 3) and entries["e"].dtype == torch.bfloat16
    assert load_file(str(tmp_path / "e.safetensors"))["e"].shape == (0, 3)


@pytest.mark.subprocess
def test_the_command_refuses_it_before_a_dry_run_passes(tmp_path: Path) -> None:
    """It passed --dry-run, then the run failed with 1.4 KB of C++ stack on one line naming no file."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        plain = tmp_path / f"plain_{step}.safetensors"
        save_file(dict(make_state(step)), str(plain))
        with_extra_tensor(plain, run / f"step_{step}.safetensors", "pos.empty", "F32", [2**63, 0])
    for extra in (["--dry-run"], ["-o", str(tmp_path / "out.safetensors")]):
        result = run_cli(run, *extra)
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"ema-average: error: {run / 'step_1.safetensors'}: tensor 'pos.empty' has shape "
            "[9223372036854775808, 0], beyond what torch can index (int64 sizes and strides); refused"
        ]
    assert not (tmp_path / "out.safetensors").exists()
