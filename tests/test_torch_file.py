"""torch files: where the state dict sits, where the step comes from, tied weights, laziness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_state, rss_growth, write_fairseq_run
from ema_average.checkpoints import TorchCheckpoint, find_run
from ema_average.errors import CheckpointError


def assert_same_tensors(ckpt: TorchCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    assert ckpt.tensor_names() == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_bare_state_dict(tmp_path: Path) -> None:
    torch.save(make_state(1), tmp_path / "a.pth")
    ckpt = TorchCheckpoint(tmp_path / "a.pth")
    assert_same_tensors(ckpt, make_state(1))
    assert ckpt.state_dict_key is None
    assert ckpt.metadata_step() is None
    assert ckpt.lazy


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict", "ema"])
def test_state_dict_under_a_known_key(tmp_path: Path, key: str) -> None:
    torch.save({key: make_state(2), "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "a.pt")
    ckpt = TorchCheckpoint(tmp_path / "a.pt")
    assert ckpt.state_dict_key == key
    assert_same_tensors(ckpt, make_state(2))


def test_state_dict_key_chooses(tmp_path: Path) -> None:
    torch.save({"model": make_state(1), "ema": make_state(2)}, tmp_path / "a.pt")
    assert_same_tensors(TorchCheckpoint(tmp_path / "a.pt"), make_state(1))
    assert_same_tensors(TorchCheckpoint(tmp_path / "a.pt", state_dict_key="ema"), make_state(2))
    with pytest.raises(CheckpointError, match=r"a\.pt: has no state dict under --state-dict-key 'nope'"):
        TorchCheckpoint(tmp_path / "a.pt", state_dict_key="nope")


def test_no_state_dict_found(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: no state dict found.*--state-dict-key"):
        TorchCheckpoint(tmp_path / "a.pt")


@pytest.mark.parametrize("key", ["global_step", "step", "num_updates", "iteration"])
def test_step_keys(tmp_path: Path, key: str) -> None:
    torch.save({"model": make_state(1), key: 1234}, tmp_path / "a.pt")
    info = TorchCheckpoint(tmp_path / "a.pt").metadata_step()
    assert info is not None and (info.step, info.source) == (1234, f"metadata:{key}")


def test_step_as_a_tensor(tmp_path: Path) -> None:
    torch.save({"model": make_state(1), "step": torch.tensor(77)}, tmp_path / "a.pt")
    info = TorchCheckpoint(tmp_path / "a.pt").metadata_step()
    assert info is not None and info.step == 77


def test_tied_weights_are_reported(tmp_path: Path) -> None:
    embed = torch.randn(10, 4)
    torch.save({"embed.weight": embed, "lm_head.weight": embed, "other": torch.zeros(3)}, tmp_path / "t.pt")
    ckpt = TorchCheckpoint(tmp_path / "t.pt")
    assert ckpt.aliases() == {"lm_head.weight": "embed.weight"}


def test_legacy_format_is_read_but_not_lazily(tmp_path: Path) -> None:
    torch.save({"model": make_state(4), "step": 4}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ckpt = TorchCheckpoint(tmp_path / "old.pt")
    assert not ckpt.lazy
    assert any("not lazily" in note for note in ckpt.notes)
    assert_same_tensors(ckpt, make_state(4))


def test_not_a_torch_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot be read as a torch file"):
        TorchCheckpoint(tmp_path / "junk.pt")


def test_opening_maps_instead_of_loading(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"model": {"big": torch.ones(64 * 2**20), "small": torch.arange(4.0)}, "step": 1}, path)
    opened: list[TorchCheckpoint] = []
    grown = rss_growth(lambda: opened.append(TorchCheckpoint(path)) or opened[0].read("small"))
    assert opened[0].read("small").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB opening a 256 MiB file"


def test_lightning_checkpoints(lightning_run: Path) -> None:
    run = find_run(lightning_run)
    assert [c.step for c in run.checkpoints] == [4, 8, 12]
    assert {c.layout for c in run.checkpoints} == {"lightning"}
    assert {c.step_source for c in run.checkpoints} == {"metadata:global_step"}
    for ckpt in run.checkpoints:
        saved = torch.load(ckpt.path, weights_only=True)
        assert saved["global_step"] == ckpt.step
        assert_same_tensors(ckpt, saved["state_dict"])  # type: ignore[arg-type]
        assert "net.1.num_batches_tracked" in ckpt.tensor_names()


def test_fairseq_run_counts_last_and_best_once(tmp_path: Path) -> None:
    states = write_fairseq_run(tmp_path, [100, 200, 300])
    run = find_run(tmp_path)
    assert [c.path.name for c in run.checkpoints] == [
        "checkpoint_1_100.pt",
        "checkpoint_1_200.pt",
        "checkpoint_1_300.pt",
    ]
    assert {c.step_source for c in run.checkpoints} == {"metadata:optimizer_history[-1].num_updates"}
    assert len(run.notices) == 2
    assert all("same step (300) and weights as" in n for n in run.notices)
    assert_same_tensors(run.checkpoints[-1], states[300])  # type: ignore[arg-type]
