"""What the model holds when Hugging Face training ends, with the real Trainer: the training weights by
default; with ``at_end="ema"`` the EMA, which the final ``save_model`` writes (also with
``save_strategy="no"``), and with ``load_best_model_at_end`` the EMA saved beside the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from ema_average.errors import ConfigurationError
from ema_average.online.transformers import EMACallback
from test_integrations_transformers import DECAY, Recorder, Tokens, assert_close_to, train


def test_by_default_the_model_ends_with_the_training_weights(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = train(tmp_path, [recorder, EMACallback(decay=DECAY)], max_steps=4)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.double(), recorder.weights[-1][name]), name


def test_at_end_ema_with_save_strategy_no_the_final_save_model_writes_the_ema(tmp_path: Path) -> None:
    ema = EMACallback(decay=DECAY, at_end="ema")
    trainer = train(tmp_path, [ema], max_steps=4, save_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    assert ema.moving_average is not None
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema.moving_average.averages()[name]), name


def test_at_end_ema_with_load_best_model_at_end_the_model_holds_the_best_checkpoints_ema(
    tmp_path: Path,
) -> None:
    ema = EMACallback(decay=DECAY, at_end="ema")
    trainer = train(
        tmp_path,
        [ema],
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        eval_dataset=Tokens(8, offset=1000),
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None
    losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert (
        Path(best).name == f"checkpoint-{min(losses, key=losses.__getitem__)}" != "checkpoint-6"
    )  # not the last
    saved = load_file(str(Path(best) / "ema" / "model.safetensors"))
    for name, p in trainer.model.named_parameters():
        expected = saved.get(name, saved.get("transformer.wte.weight") if name == "lm_head.weight" else None)
        assert expected is not None and torch.equal(p, expected), name


def test_at_end_must_be_raw_or_ema() -> None:
    with pytest.raises(ConfigurationError, match="at_end"):
        EMACallback(at_end="best")


def test_start_step_and_ema_model_in_the_trainer(tmp_path: Path) -> None:
    """Until step 3 the EMA is the weights; from step 4 it averages them; ema_model() is a copy holding it."""
    ema, recorder = EMACallback(decay=DECAY, start_step=3), Recorder()
    trainer = train(tmp_path, [recorder, ema], max_steps=6)
    shadow = dict(recorder.weights[3])
    for step in range(4, 7):
        d = min(DECAY, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * recorder.weights[step][n] for n, s in shadow.items()}
    assert ema.moving_average is not None and ema.moving_average.num_applied == 3
    assert_close_to(ema.moving_average.averages(), shadow)
    copy = ema.ema_model()
    assert copy is not None and copy is not trainer.model
    for name, p in copy.named_parameters():
        assert torch.equal(p, ema.moving_average.averages()[name]), name
