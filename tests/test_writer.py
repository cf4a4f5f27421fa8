"""The streaming safetensors writer against the safetensors library itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ema_average.errors import OutputError
from ema_average.writer import SafetensorsWriter, ShardedWriter, TensorEntry, remove_stale_temporaries


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(7, 3, generator=g),
        "a.weight": torch.randn(5, generator=g).bfloat16(),
        "steps": torch.tensor([3], dtype=torch.int64),
        "m.bias": torch.randn(2, generator=g).double(),
        "empty": torch.zeros(0),
        "h": torch.randn(4, generator=g).half(),
        "flag": torch.tensor(True),
    }


def entries(ts: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(n, tuple(t.shape), t.dtype) for n, t in ts.items()]


def test_bytes_equal_save_file_in_any_write_order(tmp_path: Path) -> None:
    ts = tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"step": "3"})
    writer = SafetensorsWriter(tmp_path / "mine.safetensors", entries(ts), {"step": "3"}, overwrite=False)
    for name in reversed(list(ts)):
        writer.write(name, ts[name])
    writer.commit()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3"}


def test_nothing_is_visible_until_commit_and_abort_leaves_nothing(tmp_path: Path) -> None:
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=False)
    writer.write("z.weight", ts["z.weight"])
    assert not (tmp_path / "out.safetensors").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_a_missing_tensor(tmp_path: Path) -> None:
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=False)
    with pytest.raises(OutputError, match="7 tensors were never written"):
        writer.commit()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    with pytest.raises(OutputError, match=r"out\.safetensors: already exists; pass --overwrite"):
        SafetensorsWriter(tmp_path / "out.safetensors", entries(tensors()), None, overwrite=False)
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"  # untouched until commit
    for name, t in ts.items():
        writer.write(name, t)
    writer.commit()
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in ts.items())


def test_wrong_size_is_refused(tmp_path: Path) -> None:
    writer = SafetensorsWriter(
        tmp_path / "o.safetensors", [TensorEntry("w", (3,), torch.float32)], None, overwrite=False
    )
    with pytest.raises(OutputError, match="'w' has 16 bytes, header says 12"):
        writer.write("w", torch.zeros(4))
    writer.abort()


def test_shards_and_index(tmp_path: Path) -> None:
    ts = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    writer = ShardedWriter(
        tmp_path / "model.safetensors", entries(ts), {"k": "v"}, overwrite=False, max_shard_size=2048
    )
    for name, t in ts.items():
        writer.write(name, t)
    writer.commit()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / shard))[name], ts[name])
    assert not (tmp_path / "model.safetensors").exists()


def test_one_shard_is_a_plain_file(tmp_path: Path) -> None:
    ts = {"w": torch.ones(4)}
    writer = ShardedWriter(
        tmp_path / "model.safetensors", entries(ts), None, overwrite=False, max_shard_size=10**9
    )
    writer.write("w", ts["w"])
    writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_stale_named_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".out.safetensors.ema-average-999999999.tmp"
    alive = tmp_path / f".out.safetensors.ema-average-{os.getpid()}.tmp"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists()
