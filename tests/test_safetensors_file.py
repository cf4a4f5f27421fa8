"""safetensors files: steps from the header, exact reads, lazy reads."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ema_average._platform import open_files
from ema_average.checkpoints import SafetensorsCheckpoint
from ema_average.errors import CheckpointError
from helpers import float64_reference, make_state, rss_growth, write_safetensors_run


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


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_open_descriptors_are_bounded_and_reopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(open_files, "pooled_limit", lambda: 4)
    states = write_safetensors_run(tmp_path, list(range(1, 21)))
    checkpoints = [SafetensorsCheckpoint(tmp_path / f"model_step_{step}.safetensors") for step in states]
    before = open_descriptors()
    most = before
    for _ in range(2):  # the second round reopens every file the pool gave back
        for ckpt, state in zip(checkpoints, states.values(), strict=True):
            for name, tensor in state.items():
                assert torch.equal(ckpt.read(name), tensor)
            most = max(most, open_descriptors())
    assert most - before <= 4
    for ckpt in checkpoints:
        ckpt.close()
    assert open_descriptors() <= before


def test_a_file_replaced_after_planning_is_refused(tmp_path: Path) -> None:
    path, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(dict(make_state(1)), str(path))
    ckpt = SafetensorsCheckpoint(path)
    save_file(dict(make_state(2)), str(other))  # same names and shapes: the same header, other values
    os.replace(other, path)
    with pytest.raises(
        CheckpointError, match=r"a\.safetensors: was replaced by another file since it was planned"
    ):
        ckpt.read("encoder.weight")


def test_a_file_rewritten_in_place_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(dict(make_state(1)), str(path))
    ckpt = SafetensorsCheckpoint(path)
    assert torch.equal(ckpt.read("encoder.bias"), make_state(1)["encoder.bias"])  # the file is open
    rewritten = tmp_path / "b.safetensors"
    save_file(dict(make_state(2)), str(rewritten))
    with open(path, "r+b") as f:  # same inode, same size: only the values and the time change
        f.write(rewritten.read_bytes())
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # coarse clocks: a visible change
    with pytest.raises(CheckpointError, match=r"a\.safetensors: was modified since it was planned"):
        ckpt.read("encoder.bias")


@pytest.mark.subprocess
def test_more_checkpoints_than_the_open_file_limit(tmp_path: Path) -> None:
    """150 checkpoints averaged by the command under ``ulimit -n 64``: each was held open for the whole
    pass ("Too many open files" past ~60); read descriptors now come from a pool sized to the limit."""
    steps = list(range(10, 1510, 10))
    states = write_safetensors_run(tmp_path / "run", steps)
    out = tmp_path / "ema.safetensors"

    def small_limit() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    command = [str(Path(sys.executable).parent / "ema-average"), str(tmp_path / "run"), "-o", str(out)]
    result = subprocess.run(
        [*command, "--decay", "0.9"], capture_output=True, text=True, timeout=600, preexec_fn=small_limit
    )
    assert result.returncode == 0, result.stderr
    expected = float64_reference([states[s] for s in steps], steps, 0.9)
    written = load_file(str(out))
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7)


def test_too_many_open_files_gives_back_idle_descriptors_then_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = write_safetensors_run(tmp_path, [1, 2, 3, 4, 5])
    held = [SafetensorsCheckpoint(tmp_path / f"model_step_{step}.safetensors") for step in (1, 2, 3)]
    for ckpt in held:
        ckpt.read("encoder.bias")  # each keeps its descriptor in the pool
    real_open = open_files._open_descriptor
    refusals = iter([OSError(errno.EMFILE, "Too many open files")])

    def open_once_refused(path: Path, flags: int) -> int:
        refusal = next(refusals, None)
        if refusal is not None:
            raise refusal
        return real_open(path, flags)

    monkeypatch.setattr(open_files, "_open_descriptor", open_once_refused)
    fourth = SafetensorsCheckpoint(tmp_path / "model_step_4.safetensors")
    assert torch.equal(fourth.read("head.weight"), states[4]["head.weight"])
    assert all(ckpt._file.fd is None for ckpt in held)  # given back to make room, reopened when next read

    def always_refused(path: Path, flags: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(open_files, "_open_descriptor", always_refused)
    fifth = SafetensorsCheckpoint(tmp_path / "model_step_5.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model_step_5\.safetensors: cannot be opened: too many open files"
    ):
        fifth.read("head.weight")
    for ckpt in (*held, fourth, fifth):
        ckpt.close()
