"""Resuming the Lightning EMA callback from what a ``.ckpt`` holds, with the real Lightning trainer: a record
that is not the one the callback writes (empty beside ``ema``, a list, a last update after the restored step,
a NaN average) or a checkpoint saved without the callback is refused with one line naming the file, never
taken as "no average" (a new EMA silently started) or continued."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from ema_average.errors import AverageStateError, CheckpointError
from ema_average.online.lightning import EMA_KEY, EMACallback
from test_integrations_lightning import DECAY, ckpt_trainer, fit, model, trainer

SAVED = "epoch=0-step=8.ckpt"


@pytest.fixture(scope="module")
def saved_ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run saved at step 8 with the callback: the checkpoint every case below edits a copy of."""
    folder = tmp_path_factory.mktemp("saved")
    fit(ckpt_trainer(folder, [EMACallback(decay=DECAY)], max_epochs=1), model())
    return torch.load(folder / SAVED, weights_only=True)


def callback_state(saved: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    [(key, state)] = [(k, v) for k, v in saved["callbacks"].items() if k.startswith("EMACallback")]
    return key, state


def edited(saved: dict[str, Any], change: str) -> dict[str, Any]:
    ckpt = {**saved, "callbacks": dict(saved["callbacks"]), EMA_KEY: dict(saved[EMA_KEY])}
    key, state = callback_state(saved)
    if change == "ahead":
        ckpt["callbacks"][key] = {**state, "last_step": 100}
    elif change == "empty":
        ckpt["callbacks"][key] = {}
    elif change == "list":
        ckpt["callbacks"][key] = [state]
    elif change == "ema-list":
        ckpt[EMA_KEY] = list(ckpt[EMA_KEY].values())
    elif change == "nan":
        bad = ckpt[EMA_KEY]["net.2.weight"].clone()
        bad[0, 0] = math.nan
        ckpt[EMA_KEY]["net.2.weight"] = bad
    elif change == "decay":
        ckpt["callbacks"][key] = {**state, "settings": {**state["settings"], "decay": 0.5}}
    return ckpt


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("ahead", "last update is at step 100, after the trainer's step 8"),
        ("empty", "the EMA callback's saved state is empty or absent"),
        ("list", "must be the mapping it writes, got list"),
        ("ema-list", "saved averages must be a mapping of tensors, got list"),
        ("nan", "'net.2.weight' holds NaN"),
        ("decay", r"build EMACallback\(decay=0\.5, numerator=1\.0, denominator=10\.0\) to continue it"),
    ],
)
def test_a_hostile_or_inconsistent_record_is_refused_naming_the_file(
    saved_ckpt: dict[str, Any], tmp_path: Path, change: str, words: str
) -> None:
    path = tmp_path / "edited.ckpt"
    torch.save(edited(saved_ckpt, change), path)
    refusal = CheckpointError if change == "empty" else AverageStateError  # Lightning skips an empty state
    with pytest.raises(refusal, match=words) as caught:
        fit(trainer([EMACallback(decay=DECAY)], max_epochs=2), model(), ckpt_path=str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_the_unedited_record_resumes(saved_ckpt: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "same.ckpt"
    torch.save(edited(saved_ckpt, "none"), path)
    ema = EMACallback(decay=DECAY)
    fit(trainer([ema], max_epochs=2), model(), ckpt_path=str(path))
    assert ema.moving_average is not None and ema.moving_average.num_applied == 16


def test_resuming_a_run_saved_without_the_callback_is_refused_as_in_the_hf_trainer(tmp_path: Path) -> None:
    fit(ckpt_trainer(tmp_path, [], max_epochs=1), model())
    path = tmp_path / SAVED
    with pytest.raises(CheckpointError, match="holds no state of the EMA callback") as caught:
        fit(trainer([EMACallback(decay=DECAY)], max_epochs=2), model(), ckpt_path=str(path))
    assert str(path) in str(caught.value)
