"""A torch file's pickle is scanned once before it is loaded: its cost bounded by its bytes (issue 24).

Each hostile file here is a few KB: a compressed ``data.pkl`` inflating to any size, a tuple DAG as a dict key
(2^n hashes), more kinds of objects than the cap; a protocol-4 pickle is refused as unreadable, not damaged.
"""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import TorchCheckpoint
from ema_average.checkpoints.reading import safe_unpickle
from ema_average.checkpoints.reading.pickle_scan import MAX_HASH_WORK_BASE, MAX_HASH_WORK_PER_BYTE
from ema_average.checkpoints.reading.placeholders import MAX_PLACEHOLDERS
from ema_average.errors import CheckpointError, UnsafeCheckpointError


def good(step: int = 3) -> dict:
    return {"model": {"w": torch.arange(4.0)}, "step": step}


def deflate_member(path: Path, suffix: str) -> None:
    """Rewrite the zip with the member ending ``suffix`` DEFLATE-compressed (torch.save never does)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records:
            method = zipfile.ZIP_DEFLATED if name.endswith(suffix) else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)


@pytest.mark.parametrize("suffix", ["data.pkl", "data/0", "version"])
def test_a_compressed_member_is_refused_before_it_is_inflated(tmp_path: Path, suffix: str) -> None:
    """A 1 MB string in data.pkl deflates to ~1 KB; any compressed member is refused, naming it."""
    path = tmp_path / "deflated.pt"
    torch.save({**good(), "pad": "0" * 2**20}, path)
    deflate_member(path, suffix)
    assert path.stat().st_size < 2**20 // 100 or suffix != "data.pkl"
    with pytest.raises(CheckpointError, match=rf"deflated\.pt: has a compressed zip member '[^']*{suffix}'"):
        TorchCheckpoint(path)


def tuple_dag(levels: int) -> tuple:
    """``levels`` nested pairs, each of the level below twice: 2**levels leaves, a few bytes per level pickled."""
    node: tuple = (0,)
    for _ in range(levels):
        node = (node, node)
    return node


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_tuple_dag_as_a_dict_key_is_refused_before_it_is_hashed(tmp_path: Path, zip_format: bool) -> None:
    """24 levels: 2**25 elements hashed per use in a ~1 KB file (34 levels hung the reader for hours)."""
    path = tmp_path / "dag.pt"
    torch.save({**good(), "extra": {tuple_dag(24): 1}}, path, _use_new_zipfile_serialization=zip_format)
    assert path.stat().st_size < 8192
    assert MAX_HASH_WORK_BASE + MAX_HASH_WORK_PER_BYTE * path.stat().st_size < 2**24
    with pytest.raises(
        CheckpointError, match=r"dag\.pt: would hash more than \d+ elements building its dict keys"
    ):
        TorchCheckpoint(path)


def test_a_small_tuple_key_still_reads(tmp_path: Path) -> None:
    """Tuples as keys are data (a few levels): read as before."""
    path = tmp_path / "keys.pt"
    torch.save({**good(), "extra": {tuple_dag(4): 1, ("a", 1): 2}}, path)
    assert torch.equal(TorchCheckpoint(path).read("w"), torch.arange(4.0))


def kinds(monkeypatch: pytest.MonkeyPatch, count: int) -> list[object]:
    """One object of each of ``count`` classes of modules that exist only for this test."""
    objects = []
    for i in range(count):
        module = types.ModuleType(f"hostile_kind_{i}")
        kind = type("Kind", (), {"__module__": module.__name__})
        module.Kind = kind  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        objects.append(kind())
    return objects


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_more_kinds_than_the_cap_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip_format: bool
) -> None:
    """Kind 1,025 is refused as it is met; a legacy file was refused at kind 65 after 65 loads."""
    path = tmp_path / "kinds.pt"
    torch.save(
        {**good(), "objects": kinds(monkeypatch, MAX_PLACEHOLDERS + 1)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(
        CheckpointError, match=rf"kinds\.pt: names more than {MAX_PLACEHOLDERS} kinds of pickled objects"
    ):
        TorchCheckpoint(path)


def test_a_legacy_file_is_unpickled_once_whatever_the_kinds_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, once per kind (each refusal taught one name): size times kinds."""
    path = tmp_path / "old.pt"
    torch.save({**good(), "objects": kinds(monkeypatch, 5)}, path, _use_new_zipfile_serialization=False)
    loads = []
    real = safe_unpickle._torch_load

    def counted(*args: object, **kwargs: object) -> object:
        loads.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(safe_unpickle, "_torch_load", counted)
    checkpoint = TorchCheckpoint(path)
    assert torch.equal(checkpoint.read("w"), torch.arange(4.0))
    assert len(loads) == 1


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_protocol_4_pickle_is_refused_not_called_damaged(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "p4.pt"
    torch.save(good(), path, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"p4\.pt: is pickled with protocol 4 or later") as caught:
        TorchCheckpoint(path)
    assert "is damaged" not in str(caught.value) and "--trust-pickle" in str(caught.value)


def test_a_protocol_4_pickle_reads_with_trust_pickle(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    torch.save(good(), path, pickle_protocol=4)
    with pytest.warns(UserWarning, match="full unpickling"):
        checkpoint = TorchCheckpoint(path, trust_pickle=True)
    assert torch.equal(checkpoint.read("w"), torch.arange(4.0))


def chain_key_file(path: Path, zip_format: bool) -> None:
    """A torch file whose dict key is 200,000 nested 1-tuples (200 KB): ``torch.save``'s pickler cannot
    write one (it recurses), so the key's opcodes replace a string key's in the saved pickle."""
    torch.save({**good(), "extra": {"PLACEHOLDER": 1}}, path, _use_new_zipfile_serialization=zip_format)
    placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"  # BINUNICODE, as protocol 2 writes the string
    chain = b")" + b"\x85" * 200_000  # EMPTY_TUPLE, TUPLE1 x 200,000 (the BINPUT after it memoizes it)
    if not zip_format:
        raw = path.read_bytes()
        assert raw.count(placeholder) == 1
        path.write_bytes(raw.replace(placeholder, chain))
        return
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records:
            archive.writestr(name, data.replace(placeholder, chain) if name.endswith("data.pkl") else data)


@pytest.mark.subprocess
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_deep_tuple_chain_as_a_dict_key_is_refused(tmp_path: Path, zip_format: bool) -> None:
    """Hashing 200,000 nested tuples recursed in C and ended the process (SIGSEGV): read in a child, so
    that a crash fails this test instead of ending the run."""
    path = tmp_path / "chain.pt"
    chain_key_file(path, zip_format)
    child = (
        "import sys\nfrom pathlib import Path\nfrom ema_average.checkpoints import TorchCheckpoint\n"
        "from ema_average.errors import CheckpointError\n"
        "try:\n    TorchCheckpoint(Path(sys.argv[1]))\nexcept CheckpointError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit {done.returncode}; stderr:\n{done.stderr}"
    assert done.stdout.strip() == f"{path}: hashes an object nested 200000 deep (at most 100); refused", (
        done.stderr
    )
