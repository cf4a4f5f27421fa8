"""Steps from file and folder names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ema_average.checkpoints import step_from_name


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
    ],
)
def test_patterns(name: str, step: int, label: str) -> None:
    info = step_from_name(Path(name))
    assert info is not None
    assert (info.step, info.source) == (step, f"filename:{label}")


@pytest.mark.parametrize(
    "name", ["checkpoint_last.pt", "checkpoint_best.pt", "model.safetensors", "last.ckpt"]
)
def test_names_without_a_step(name: str) -> None:
    assert step_from_name(Path(name)) is None
