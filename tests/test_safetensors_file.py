"""safetensors files: steps from the header, exact reads, lazy reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ema_average.checkpoints import SafetensorsCheckpoint
from ema_average.errors import CheckpointError
from helpers import make_state, rss_growth


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
    assert (ckpt.metadata_step().step, ckpt.metadata_step().origin) == (300, "metadata:global_step")
    ckpt.close()


def test_no_step_in_metadata(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    assert SafetensorsCheckpoint(tmp_path / "a.safetensors").metadata_step() is None


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors file"):
        SafetensorsCheckpoint(bad)


def test_truncated_file_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=r"t\.safetensors: not a readable safetensors file: is truncated"
    ):
        SafetensorsCheckpoint(path)


def test_file_truncated_after_opening_is_an_error_on_read(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    ckpt = SafetensorsCheckpoint(path)
    os.truncate(path, path.stat().st_size - 100)  # e.g. a trainer rewriting the file under us
    with pytest.raises(CheckpointError, match=r"t\.safetensors: file ends inside tensor 'w'"):
        ckpt.read("w")
    ckpt.close()


def header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, "is truncated"),
        (
            b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            b"\0" * 12,
            "bytes after the last tensor",
        ),
        (b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, "do not fit F32[3]"),
        (b'{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', b"\0" * 8, "has shape"),
        (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12, "starts at 4, expected 0"),
        (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":"x"}}', b"", "data_offsets"),
        (b'{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8, "dtype 'C64'"),
        (b'{"w":1,"w":2}', b"", "a key appears twice"),
        (b'{"__metadata__":{"step":3}}', b"", "must map strings to strings"),
        (b"[" * 100_000 + b"]" * 100_000, b"", "not a JSON object"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"", "not valid JSON"),
        (b"\xff\xfe", b"", "not a JSON object"),
    ],
)
def test_hostile_headers_are_one_error(tmp_path: Path, header: bytes, data: bytes, problem: str) -> None:
    path = header_file(tmp_path / "h.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"h\.safetensors: ") as info:
        SafetensorsCheckpoint(path)
    assert problem in str(info.value)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="claims a 1000000000000000-byte header in a 10-byte file"):
        SafetensorsCheckpoint(path)


def test_sparse_huge_file_opens_without_mapping_it(tmp_path: Path) -> None:
    # A 1 TiB tensor in a sparse file: the header is checked without mapping (safe_open maps the whole
    # file, which fails under an address-space limit), and reading one small tensor stays cheap.
    huge = 2**40
    header = json.dumps(
        {
            "small": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "huge": {"dtype": "U8", "shape": [huge], "data_offsets": [8, 8 + huge]},
        }
    ).encode()
    path = header_file(tmp_path / "sparse.safetensors", header)
    with open(path, "r+b") as f:
        f.truncate(8 + len(header) + 8 + huge)
    ckpt = SafetensorsCheckpoint(path)
    assert ckpt.specs()["huge"].nbytes == huge
    assert ckpt.read("small").tolist() == [0.0, 0.0]
    ckpt.close()


def test_git_lfs_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match=r"is a Git LFS pointer, not the weights: .*git lfs pull"):
        SafetensorsCheckpoint(path)


def test_unreadable_file_says_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make open() answer as it does for everyone else
        real_open = open

        def denied(file: object, *args: object, **kwargs: object) -> object:
            if Path(str(file)) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(CheckpointError, match=r"p\.safetensors: cannot be read \(Permission denied\)"):
        SafetensorsCheckpoint(path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        SafetensorsCheckpoint(tmp_path / "f.safetensors")


@pytest.mark.parametrize("value", ["²", "-5", "1" * 30, "1e6"])
def test_hostile_step_in_metadata_is_one_error(tmp_path: Path, value: str) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s.safetensors"), metadata={"step": value})
    with pytest.raises(
        CheckpointError, match=r"s\.safetensors: has step .* \(metadata:step\), not a whole number"
    ):
        SafetensorsCheckpoint(tmp_path / "s.safetensors").metadata_step()


def test_reading_one_tensor_does_not_load_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.ones(64 * 2**20), "small": torch.arange(4.0)}, str(path))  # 256 MiB + 16 B
    ckpt = SafetensorsCheckpoint(path)
    grown = rss_growth(lambda: ckpt.read("small"))
    assert ckpt.read("small").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB reading 16 bytes"
    ckpt.close()


def test_read_range_into_reads_exactly_that_slice(tmp_path: Path) -> None:
    path = tmp_path / "r.safetensors"
    tensors = {"a": torch.arange(10.0), "b": torch.arange(100, dtype=torch.bfloat16).reshape(10, 10)}
    save_file(tensors, str(path))
    ckpt = SafetensorsCheckpoint(path)
    out = torch.empty(7, dtype=torch.bfloat16)
    assert torch.equal(ckpt.read_range_into("b", 42, out), tensors["b"].reshape(-1)[42:49])
    assert torch.equal(ckpt.read_range_into("a", 0, torch.empty(10)), tensors["a"])
    ckpt.close()
