"""Several EMAs in one Lightning run, with the real trainer: one callback with several decays, or several
callbacks that compose. The training weights stay those of a run without any callback, bit for bit
(validations included), each EMA equals its float64 reference, is saved under its own key and resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from ema_average.online.lightning import EMACallback
from test_integrations_lightning import (
    Recorder,
    assert_close_to,
    ckpt_trainer,
    fit,
    model,
    reference,
    trainer,
)

VALIDATING: dict[str, Any] = {"limit_val_batches": 2, "val_check_interval": 4}


@pytest.fixture(scope="module")
def plain() -> Recorder:
    """The weights of a run with the same validations and no EMA callback."""
    recorder = Recorder()
    fit(trainer([recorder], max_steps=12, **VALIDATING), model())
    return recorder


def assert_training_untouched(recorder: Recorder, plain: Recorder) -> None:
    assert recorder.steps == plain.steps
    for swapped, undisturbed in zip(recorder.weights, plain.weights, strict=True):
        for name in undisturbed:
            assert torch.equal(swapped[name], undisturbed[name]), name


def test_one_callback_with_two_decays_keeps_both(plain: Recorder) -> None:
    ema, recorder = EMACallback(decay=[0.8, 0.95]), Recorder()
    fit(trainer([recorder, ema], max_steps=12, **VALIDATING), model())
    assert_training_untouched(recorder, plain)
    for name, decay in (("ema", 0.8), ("ema_0.95", 0.95)):
        assert_close_to(ema.moving_averages[name].averages(), reference(plain, decay))


def test_two_callbacks_compose_without_touching_the_training_weights(plain: Recorder) -> None:
    fast, slow, recorder = EMACallback(decay=0.8), EMACallback(decay=0.95, names=["ema_slow"]), Recorder()
    fit(trainer([recorder, fast, slow], max_steps=12, **VALIDATING), model())
    assert_training_untouched(recorder, plain)
    assert fast.moving_average is not None and slow.moving_average is not None
    assert_close_to(fast.moving_average.averages(), reference(plain, 0.8))
    assert_close_to(slow.moving_average.averages(), reference(plain, 0.95))


def test_two_callbacks_saving_under_one_name_are_refused() -> None:
    """Lightning refuses them itself, at Trainer(...), before any hook of ours runs: one state_key."""
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        fit(trainer([EMACallback(decay=0.8), EMACallback(decay=0.95)], max_steps=2), model())


@pytest.mark.parametrize("how", ["one-callback", "two-callbacks"])
def test_several_emas_are_saved_each_under_its_key_and_resume_bit_for_bit(tmp_path: Path, how: str) -> None:
    def callbacks() -> list[EMACallback]:
        if how == "one-callback":
            return [EMACallback(decay=[0.8, 0.95])]
        return [EMACallback(decay=0.8), EMACallback(decay=0.95, names=["ema_0.95"])]

    whole = callbacks()
    fit(ckpt_trainer(tmp_path / "whole", whole, max_epochs=2), model())
    stopped = tmp_path / "whole" / "epoch=0-step=8.ckpt"
    saved = torch.load(stopped, weights_only=True)
    assert {"ema", "ema_0.95"} <= set(saved)
    resumed = callbacks()
    fit(trainer(resumed, max_epochs=2), model(seed=5), ckpt_path=str(stopped))
    expected = {n: a for c in whole for n, a in c.moving_averages.items()}
    got = {n: a for c in resumed for n, a in c.moving_averages.items()}
    assert set(got) == set(expected) == {"ema", "ema_0.95"}
    for name, average in expected.items():
        assert got[name].num_applied == average.num_applied == 16
        for key, tensor in average.averages().items():
            assert torch.equal(got[name].averages()[key], tensor), (name, key)
