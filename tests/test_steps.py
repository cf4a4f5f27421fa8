"""Steps from file and folder names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import step_from_name
from ema_average.checkpoints.contents.steps import checked_step, step_of_count
from ema_average.errors import CheckpointError


@pytest.mark.parametrize(
    ("name", "step", "label"),
    [
        ("epoch=3-step=1200.ckpt", 1200, "step=N"),
        ("model_step_500.safetensors", 500, "step=N"),
        ("step00042.pt", 42, "step=N"),
        ("checkpoint-7000", 7000, "checkpoint-N"),
        ("global_step300", 300, "global_stepN"),
        ("checkpoint_3_1200.pt", 1200, "_N"),
        ("weights_99.pth", 99, "_N"),
        ("iter_0004000", 4000, "iter_N"),
        ("epoch_1_train_step_8_eval_step_2", 8, "train_step_N"),  # torchtnt fit: not the eval steps
    ],
)
def test_patterns(name: str, step: int, label: str) -> None:
    info = step_from_name(Path(name))
    assert info is not None
    assert (info.step, info.origin) == (step, f"filename:{label}")


@pytest.mark.parametrize(
    "name", ["checkpoint_last.pt", "checkpoint_best.pt", "model.safetensors", "last.ckpt"]
)
def test_names_without_a_step(name: str) -> None:
    assert step_from_name(Path(name)) is None


@pytest.mark.parametrize(
    ("value", "step"),
    [
        (12, 12),
        (" 7 ", 7),
        ("0", 0),
        (torch.tensor(3), 3),
        (torch.tensor([5], dtype=torch.int32), 5),
        (2**63 - 1, 2**63 - 1),
    ],
)
def test_checked_step_accepts_whole_numbers(value: object, step: int) -> None:
    assert checked_step(Path("x.pt"), value, "metadata:step") == step


@pytest.mark.parametrize(
    "value",
    [
        "²",
        "١٢",
        "-5",
        -5,
        10**400,
        2**63,
        torch.tensor(1 + 2j),
        torch.tensor(True),
        True,
        3.0,
        torch.tensor(2.0),
        "1e6",
        "",
    ],
)
def test_checked_step_refuses_anything_else_in_one_line(value: object) -> None:
    with pytest.raises(
        CheckpointError, match=r"^x\.pt: has step .{1,40} \(metadata:step\), not a whole number in 0\.\."
    ) as info:
        checked_step(Path("x.pt"), value, "metadata:step")
    assert "\n" not in str(info.value)


def test_unicode_digits_in_names_are_not_steps() -> None:
    assert step_from_name(Path("model_step_²3.pt")) is None
    assert step_from_name(Path("ckpt_١٢.pt")) is None


@pytest.mark.parametrize(
    ("name", "step", "label", "counter"),
    [
        ("ep1-ba42-rank0.pt", 42, "baN", False),  # composer
        ("epoch_3", 3, "epoch_N", True),  # torchtune
        ("checkpoint-7.pth.tar", 7, "checkpoint-N", False),  # timm
        ("checkpoint_2", 2, "_N", False),  # accelerate (a counter only where accelerate wrote it)
    ],
)
def test_producer_names(name: str, step: int, label: str, counter: bool) -> None:
    info = step_from_name(Path(name))
    assert info is not None
    assert (info.step, info.origin, info.counter) == (step, f"filename:{label}", counter)


@pytest.mark.parametrize(
    ("name", "names_step"),
    [
        ("checkpoint-500", True),
        ("global_step6", True),
        ("epoch_0", True),
        ("checkpoint_3", True),
        ("step_100", True),
        ("unet", False),
        ("unet_ema", False),
        ("text_encoder_2", False),
        ("pytorch_model", False),
    ],
)
def test_names_a_step(name: str, names_step: bool) -> None:
    from ema_average.checkpoints.contents.steps import names_a_step

    assert names_a_step(Path(name)) is names_step


@pytest.mark.parametrize(
    ("count", "origin", "step", "formula"),
    [
        (3, "metadata:epoch (epochs completed, from 1)", 300, "counted from 1: n x 100"),  # open_clip epoch_3
        (3, "metadata:epoch", 400, "counted from 0: (n+1) x 100"),  # timm checkpoint-3: the 4th epoch
        (0, "filename:checkpoint_K (accelerate save count)", 100, "counted from 0: (n+1) x 100"),
        (1, "sub/metadata:meta.epoch (epochs completed, from 1)", 100, "counted from 1: n x 100"),
    ],
)
def test_a_count_becomes_a_step_by_how_it_is_based(count: int, origin: str, step: int, formula: str) -> None:
    """--step-every N: a count of epochs completed (first save 1) is E x N; an index or a save count (first
    save 0) is (K + 1) x N; the origin says which counting was used."""
    assert step_of_count(Path("c.pt"), count, origin, 100) == (step, f"{origin}, {formula}")


def test_a_count_past_int64_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"c\.pt: has step .*counted from 0"):
        step_of_count(Path("c.pt"), 2**62, "metadata:epoch", 4)


# Steps from any record that states one, then names; --steps always usable (issue 25) -------------------


@pytest.mark.parametrize(
    ("key", "record"),
    [
        ("optimizer_step", True),
        ("trainIteration", True),
        ("num_steps_completed", True),
        ("max_steps", False),
        ("warmup_steps", False),
        ("num_train_steps", False),
        ("save_steps", False),
        ("epoch", False),
    ],
)
def test_keys_that_name_a_step_record(key: str, record: bool) -> None:
    from ema_average.checkpoints.contents.steps import names_a_step_record

    assert names_a_step_record(key) is record


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}


def test_step_in_safetensors_metadata_under_any_step_key(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ema_average.checkpoints import find_run

    for i, step in enumerate((500, 1000)):
        meta = {"optimizer_step": str(step), "max_steps": "5000", "run": "a"}
        save_file(_weights(i), str(tmp_path / f"weights_{'ab'[i]}.safetensors"), metadata=meta)
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (500, "metadata:optimizer_step"),
        (1000, "metadata:optimizer_step"),
    ]


def test_step_in_a_json_record_beside_the_file(tmp_path: Path) -> None:
    import json

    from ema_average.checkpoints import find_run

    for i, step in enumerate((30, 60)):
        torch.save(_weights(i), tmp_path / f"snap_{'ab'[i]}.pt")
        (tmp_path / f"snap_{'ab'[i]}.json").write_text(
            json.dumps({"completed_steps": step, "total_steps": 90})
        )
    run = find_run(tmp_path)
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        ("snap_a.pt", 30, "snap_a.json beside it:completed_steps"),
        ("snap_b.pt", 60, "snap_b.json beside it:completed_steps"),
    ]


def test_an_unreadable_json_record_beside_the_file_is_no_step(tmp_path: Path) -> None:
    """A record beside a checkpoint is a hint: nested too deep for the parser (was 'unexpected
    RecursionError', naming no file) or a FIFO (was a read that never returns) says nothing, and the step
    comes from the name."""
    from ema_average.checkpoints import find_run

    for i, step in enumerate((100, 200)):
        torch.save(_weights(i), tmp_path / f"step_{step}.pt")
    (tmp_path / "step_100.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "step_200.json")
    run = find_run(tmp_path)
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        ("step_100.pt", 100, "filename:step=N"),
        ("step_200.pt", 200, "filename:step=N"),
    ]


def test_given_steps_need_no_step_in_the_names(tmp_path: Path) -> None:
    from ema_average.checkpoints import find_run

    for name in ("first", "second", "third"):
        torch.save(_weights(len(name)), tmp_path / f"{name}.pt")
    with pytest.raises(CheckpointError, match="no training step found"):
        find_run(tmp_path)
    run = find_run(tmp_path, steps=[100, 200, 300])
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        ("first.pt", 100, "given"),
        ("second.pt", 200, "given"),
        ("third.pt", 300, "given"),
    ]
    assert "the steps given (--steps) follow the checkpoints in the order of their names" in run.notices
