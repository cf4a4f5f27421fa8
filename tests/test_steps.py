"""Steps from file and folder names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import step_from_name
from ema_average.checkpoints.steps import checked_step, step_of_count
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
    from ema_average.checkpoints.steps import names_a_step

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
