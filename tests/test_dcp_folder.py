"""torch.distributed.checkpoint folders, read without a process group."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_state
from ema_average.checkpoints import find_run

dcp = pytest.importorskip("torch.distributed.checkpoint")


def save_dcp(folder: Path, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))


def test_model_and_optimizer_with_step_tensor(tmp_path: Path) -> None:
    for step in (100, 200):
        state = {
            "model": dict(make_state(step)),
            "optimizer": {"lr": torch.tensor(0.1)},
            "step": torch.tensor(step),
        }
        save_dcp(tmp_path / f"save_{step}", state)
    run = find_run(tmp_path)
    assert [(c.step, c.step_source, c.layout) for c in run.checkpoints] == [
        (100, "metadata:step", "dcp"),
        (200, "metadata:step", "dcp"),
    ]
    ckpt = run.checkpoints[1]
    assert ckpt.tensor_names() == list(make_state(200))  # the model's part, under its own names
    for name, tensor in make_state(200).items():
        assert torch.equal(ckpt.read(name), tensor)


def test_bare_state_with_step_in_folder_name(tmp_path: Path) -> None:
    for step in (3, 1):
        save_dcp(tmp_path / f"step_{step}", dict(make_state(step)))
    run = find_run(tmp_path)
    assert [(c.step, c.step_source) for c in run.checkpoints] == [
        (1, "filename:step=N"),
        (3, "filename:step=N"),
    ]
    assert torch.equal(run.checkpoints[0].read("encoder.weight"), make_state(1)["encoder.weight"])
