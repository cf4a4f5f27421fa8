"""Several EMAs in one Hugging Face Trainer run, with the real Trainer: one callback with several decays, or
several callbacks that compose. The training weights stay those of a run without any callback, bit for bit
(evaluations included), each EMA equals its float64 reference, each is saved in its own folder and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2LMHeadModel

from ema_average.errors import ConfigurationError
from ema_average.online.transformers import EMACallback
from test_integrations_transformers import Recorder, Tokens, assert_close_to, train

SCHEDULE = {"eval_strategy": "steps", "eval_steps": 2, "eval_dataset": Tokens(8, offset=1000)}


def reference(recorder: Recorder, decay: float, until: int | None = None) -> dict[str, torch.Tensor]:
    """The TF rule written out plainly in float64 over the recorded per-step weights."""
    shadow = dict(recorder.weights[0])
    for step, weights in zip(recorder.steps[1:], recorder.weights[1:], strict=True):
        if until is not None and step > until:
            break
        d = min(decay, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
    return shadow


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    """The weights of a run with the same evaluations and no EMA callback."""
    recorder = Recorder()
    train(tmp_path_factory.mktemp("plain"), [recorder], max_steps=6, **SCHEDULE)  # type: ignore[arg-type]
    return recorder


def assert_training_untouched(recorder: Recorder, plain: Recorder) -> None:
    assert recorder.steps == plain.steps
    for swapped, undisturbed in zip(recorder.weights, plain.weights, strict=True):
        for name in undisturbed:
            assert torch.equal(swapped[name], undisturbed[name]), name


def test_one_callback_with_two_decays_keeps_saves_and_evaluates_both(plain: Recorder, tmp_path: Path) -> None:
    ema, recorder = EMACallback(decay=[0.8, 0.95]), Recorder()
    train(tmp_path, [recorder, ema], max_steps=6, save_strategy="steps", save_steps=3, **SCHEDULE)  # type: ignore[arg-type]
    assert_training_untouched(recorder, plain)
    assert set(ema.moving_averages) == {"ema", "ema_0.95"}
    for name, decay in (("ema", 0.8), ("ema_0.95", 0.95)):
        assert_close_to(ema.moving_averages[name].averages(), reference(plain, decay))
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "checkpoint-3" / name)
        assert_close_to(
            {n: p.detach() for n, p in loaded.named_parameters()}, reference(plain, decay, until=3)
        )
    with ema.average_parameters("ema_0.95"):  # any of them swapped in for an evaluation of one's own
        model = ema._tracker.model
        assert model is not None
        assert_close_to({n: p.detach() for n, p in model.named_parameters()}, reference(plain, 0.95))
    assert_close_to({n: p.detach() for n, p in model.named_parameters()}, plain.weights[-1])


@pytest.mark.slow
def test_two_callbacks_compose_without_touching_the_training_weights(plain: Recorder, tmp_path: Path) -> None:
    fast, slow, recorder = EMACallback(decay=0.8), EMACallback(decay=0.95, names=["ema_slow"]), Recorder()
    train(tmp_path, [recorder, fast, slow], max_steps=6, save_strategy="steps", save_steps=6, **SCHEDULE)  # type: ignore[arg-type]
    assert_training_untouched(recorder, plain)
    assert fast.moving_average is not None and slow.moving_average is not None
    assert_close_to(fast.moving_average.averages(), reference(plain, 0.8))
    assert_close_to(slow.moving_average.averages(), reference(plain, 0.95))
    assert (tmp_path / "checkpoint-6" / "ema" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint-6" / "ema_slow" / "model.safetensors").is_file()


def test_two_callbacks_saving_under_one_name_are_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"would save under 'ema': give one of them its own names="):
        train(tmp_path, [EMACallback(decay=0.8), EMACallback(decay=0.95)], max_steps=2)


def test_two_decays_resume_bit_for_bit(tmp_path: Path) -> None:
    whole = EMACallback(decay=[0.8, 0.95])
    train(tmp_path / "whole", [whole], max_steps=6, save_strategy="steps", save_steps=3)
    resumed = EMACallback(decay=[0.8, 0.95])
    train(tmp_path / "b", [resumed], resume=str(tmp_path / "whole" / "checkpoint-3"), max_steps=6)
    for name, average in whole.moving_averages.items():
        got = resumed.moving_averages[name].averages()
        for key, tensor in average.averages().items():
            assert torch.equal(got[key], tensor), (name, key)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"decay": []}, "non-empty list"),
        ({"decay": [0.8, 0.9], "names": ["a", "a"]}, "its own name"),
        ({"decay": [0.9], "names": ["../x"]}, "folder name"),
    ],
)
def test_bad_lists_of_decays_or_names_fail_at_construction(options: dict, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        EMACallback(**options)
