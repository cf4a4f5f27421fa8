"""What the model holds when Lightning training ends, with the real trainer: the training weights by
default; with ``at_end="ema"`` the EMA, in the model after ``fit`` (``predict``) and as each ``.ckpt``'s
``state_dict`` (``load_from_checkpoint``, a plain ``Trainer().test(ckpt_path=...)``), while a resume with the
callback goes on from the training weights, bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from ema_average.errors import ConfigurationError  # noqa: E402
from ema_average.online.lightning import EMA_KEY, TRAINING_WEIGHTS_KEY, EMACallback  # noqa: E402
from test_integrations_lightning import (  # noqa: E402
    DECAY,
    Tiny,
    ckpt_trainer,
    fit,
    loaders,
    model,
    trainer,
    val_loss_of,
)

CKPT = "epoch=0-step=8.ckpt"


class Predicting(Tiny):
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0])


def test_by_default_the_model_ends_with_the_training_weights(tmp_path: Path) -> None:
    ema, net, plain = EMACallback(decay=DECAY), model(), model()
    fit(trainer([ema], max_epochs=1), net)
    fit(trainer([], max_epochs=1), plain)
    for (name, a), b in zip(net.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_at_end_ema_the_model_holds_the_ema_after_fit_and_predict_uses_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ema, net = EMACallback(decay=DECAY, at_end="ema"), Predicting()
    t = trainer([ema], max_epochs=1)
    fit(t, net)
    assert ema.moving_average is not None
    averages = ema.moving_average.averages()
    for name, p in net.named_parameters():
        assert torch.equal(p, averages[name]), name
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted = torch.cat(t.predict(net, val))  # type: ignore[arg-type]
    net.eval()
    with torch.no_grad():
        expected = torch.cat([net.net(x) for x, _ in val])
    torch.testing.assert_close(predicted, expected, rtol=0, atol=0)


def test_at_end_ema_ckpt_state_dict_is_the_ema_for_load_from_checkpoint_and_a_plain_test(
    tmp_path: Path,
) -> None:
    fit(ckpt_trainer(tmp_path, [EMACallback(decay=DECAY, at_end="ema")], max_epochs=1), model())
    saved = torch.load(tmp_path / CKPT, weights_only=True)
    assert set(saved[TRAINING_WEIGHTS_KEY]) == set(saved["state_dict"])
    loaded = Tiny.load_from_checkpoint(tmp_path / CKPT)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, saved[EMA_KEY][name]), name
        assert not torch.equal(p, saved[TRAINING_WEIGHTS_KEY][name]), name
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer([], limit_test_batches=1.0).test(
            model(seed=4), val, ckpt_path=str(tmp_path / CKPT)
        )[0]
    averaged = {name: saved[EMA_KEY][name] for name, _ in loaded.named_parameters()}
    assert metrics["test_loss"] == pytest.approx(val_loss_of(averaged, loaded), rel=1e-5)


def test_at_end_ema_resume_goes_on_from_the_training_weights_bit_for_bit(tmp_path: Path) -> None:
    whole, net_whole = EMACallback(decay=DECAY, at_end="ema"), model()
    fit(ckpt_trainer(tmp_path / "whole", [whole], max_epochs=2), net_whole)
    resumed, net_resumed = EMACallback(decay=DECAY, at_end="ema"), model(seed=5)
    fit(trainer([resumed], max_epochs=2), net_resumed, ckpt_path=str(tmp_path / "whole" / CKPT))
    assert whole.moving_average is not None and resumed.moving_average is not None
    for name, tensor in whole.moving_average.averages().items():
        assert torch.equal(resumed.moving_average.averages()[name], tensor), name
    for (name, a), b in zip(net_whole.named_parameters(), net_resumed.parameters(), strict=True):
        assert torch.equal(a, b), name  # both hold the EMA at the end: the same one


def test_at_end_must_be_raw_or_ema() -> None:
    with pytest.raises(ConfigurationError, match="at_end"):
        EMACallback(at_end="best")
