"""The Lightning EMA callback's options beyond the decay, with the real trainer: batch-norm statistics
averaged by default (``buffers="average"``, as timm and Lightning's EMAWeightAveraging) or the model's own
copied (``buffers="copy"``); integer buffers (``num_batches_tracked``) never averaged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from ema_average.errors import ConfigurationError
from ema_average.integrations.lightning import EMA_KEY, EMACallback
from test_integrations_lightning import (
    DECAY,
    Recorder,
    assert_close_to,
    ckpt_trainer,
    fit,
    model,
    reference,
)

STATS = ("net.1.running_mean", "net.1.running_var")


def test_batch_norm_statistics_are_averaged_by_default(tmp_path: Path) -> None:
    ema, recorder, net = EMACallback(decay=DECAY), Recorder(), model()
    fit(ckpt_trainer(tmp_path, [recorder, ema], max_epochs=1), net)
    assert ema.moving_average is not None
    averages, expected = ema.moving_average.averages(), reference(recorder)
    assert_close_to({n: averages[n] for n in STATS}, {n: expected[n] for n in STATS})
    saved = torch.load(tmp_path / "epoch=0-step=8.ckpt", weights_only=True)
    for name in STATS:
        assert torch.equal(saved[EMA_KEY][name], averages[name]), name
        assert not torch.allclose(saved[EMA_KEY][name], saved["state_dict"][name]), name  # told apart
    assert torch.equal(saved[EMA_KEY]["net.1.num_batches_tracked"], net.net[1].num_batches_tracked)


def test_buffers_copy_keeps_the_models_own_statistics_in_the_ema(tmp_path: Path) -> None:
    ema, net = EMACallback(decay=DECAY, buffers="copy"), model()
    fit(ckpt_trainer(tmp_path, [ema], max_epochs=1), net)
    assert ema.moving_average is not None
    assert not set(STATS) & set(ema.moving_average.averages())
    saved = torch.load(tmp_path / "epoch=0-step=8.ckpt", weights_only=True)
    for name in STATS:
        assert torch.equal(saved[EMA_KEY][name], saved["state_dict"][name]), name


def test_buffers_must_be_average_or_copy() -> None:
    with pytest.raises(ConfigurationError, match="buffers"):
        EMACallback(buffers="skip")
