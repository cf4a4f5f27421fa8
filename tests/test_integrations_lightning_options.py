"""The Lightning EMA callback's options beyond the decay, with the real trainer: batch-norm statistics
averaged by default (``buffers="average"``, as timm and Lightning's EMAWeightAveraging) or the model's own
copied (``buffers="copy"``), integer buffers (``num_batches_tracked``) never averaged; a start step, a
``should_update`` hook, and ``ema_model()`` for inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from ema_average.errors import ConfigurationError
from ema_average.online.lightning import EMA_KEY, EMACallback
from test_integrations_lightning import (
    DECAY,
    Recorder,
    assert_close_to,
    ckpt_trainer,
    fit,
    model,
    reference,
    trainer,
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


def test_start_step_lets_the_ema_follow_the_weights_until_then(tmp_path: Path) -> None:
    """timm's update_after_step: until step 4 the EMA is the weights; from step 5 it averages them."""
    ema, recorder = EMACallback(decay=DECAY, start_step=4), Recorder()
    fit(trainer([recorder, ema], max_steps=8), model())
    shadow = dict(recorder.weights[4])
    for step in range(5, 9):
        d = min(DECAY, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * recorder.weights[step][n] for n, s in shadow.items()}
    assert ema.moving_average is not None and ema.moving_average.num_applied == 4
    assert_close_to(ema.moving_average.averages(), shadow)


def test_should_update_skipping_steps_takes_their_decays_as_every_does() -> None:
    by_hook, by_every = (
        EMACallback(decay=DECAY, should_update=lambda step: step % 3 == 0),
        EMACallback(decay=DECAY, every=3),
    )
    fit(trainer([by_hook], max_steps=8), model())
    fit(trainer([by_every], max_steps=8), model())
    assert by_hook.moving_average is not None and by_every.moving_average is not None
    for name, tensor in by_every.moving_average.averages().items():
        assert torch.equal(by_hook.moving_average.averages()[name], tensor), name


def test_ema_model_is_a_copy_holding_the_ema_for_inference() -> None:
    ema, net = EMACallback(decay=DECAY), model()
    fit(trainer([ema], max_steps=6), net)
    raw = {n: t.clone() for n, t in net.state_dict().items()}
    copy = ema.ema_model()
    assert copy is not None and copy is not net and ema.moving_average is not None
    for name, tensor in ema.moving_average.averages().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, raw[name]), name  # the training model untouched


def test_the_fsdp2_save_seam_is_the_lightning_it_copies() -> None:
    """The sharded save of the averages copies Lightning's own (a private path): a Lightning release that
    changes it must be reviewed, so this fails loudly, naming what changed."""
    import hashlib
    import inspect

    from lightning.fabric.strategies import model_parallel
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ema_average.online import lightning as integration

    source = inspect.getsource(ModelParallelStrategy.save_checkpoint)
    assert hashlib.sha256(source.encode()).hexdigest() == integration.LIGHTNING_SAVE_SEAM_SHA256, (
        f"{integration.LIGHTNING_SAVE_SEAM} changed in this Lightning: review _save_averages_with_the_shards"
    )
    assert model_parallel._METADATA_FILENAME == integration._SHARDED_SAVE_META
    assert "_save_distributed_checkpoint" in vars(ModelParallelStrategy(save_distributed_checkpoint=True))
