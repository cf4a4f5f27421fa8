"""Checkpoint files are untrusted: nothing in them runs unless the user opts in."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import TorchCheckpoint
from ema_average.errors import UnsafeCheckpointError

MARKER_ENV = "EMA_AVERAGE_TEST_MARKER"


class WritesMarker:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class Harmless:
    def __init__(self) -> None:
        self.value = 3


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_never_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "payload": WritesMarker(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: needs arbitrary unpickling.*--trust-pickle"):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Harmless()}, path)
    with pytest.raises(UnsafeCheckpointError, match="Harmless"):
        TorchCheckpoint(path)


def test_trust_pickle_opts_in_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "extra": Harmless()}, path)
    with pytest.warns(UserWarning, match="full unpickling"):
        ckpt = TorchCheckpoint(path, trust_pickle=True)
    assert ckpt.read("w").tolist() == [0.0, 1.0, 2.0]


def test_pure_data_objects_load_without_opt_in(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    path = tmp_path / "fs.pt"
    torch.save(
        {
            "args": argparse.Namespace(lr=[0.1]),
            "cfg": OmegaConf.create({"a": {"b": [1, 2]}}),
            "model": {"w": torch.arange(2.0)},
            "num_updates": 5,
        },
        path,
    )
    ckpt = TorchCheckpoint(path)
    assert ckpt.read("w").tolist() == [0.0, 1.0]
    assert ckpt.metadata_step() is not None and ckpt.metadata_step().step == 5
