"""The dtype of the Hugging Face callback's ``ema/`` copy, with the real Trainer and a bf16 GPT-2: the model's
own by default (the float32 averages rounded once, the float32 averages kept beside for an exact resume),
float32 on request; ``config.json`` says what the weights file holds, so ``from_pretrained`` loads it as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from ema_average.errors import ConfigurationError
from ema_average.online.transformers import EMACallback
from helpers import tiny_gpt2
from test_integrations_transformers import DECAY, train


def bf16_gpt2(seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(seed).to(torch.bfloat16)


@pytest.mark.parametrize(("save_dtype", "expected"), [("model", torch.bfloat16), ("float32", torch.float32)])
def test_the_copy_is_in_the_chosen_dtype_and_its_config_says_so(
    tmp_path: Path, save_dtype: str, expected: torch.dtype
) -> None:
    ema = EMACallback(decay=DECAY, save_dtype=save_dtype)
    train(tmp_path, [ema], model=bf16_gpt2(), max_steps=4, save_strategy="steps", save_steps=4)
    folder = tmp_path / "checkpoint-4" / "ema"
    saved = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {expected}
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    assert ema.moving_average is not None
    averages = ema.moving_average.averages()
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    for name, p in loaded.named_parameters():
        assert p.dtype == expected, name
        assert torch.equal(p, averages[name].to(expected)), name  # rounded once, from the float32 average
    assert (folder / "ema_average_state.safetensors").is_file() == (expected != torch.float32)


def test_a_bf16_copy_still_resumes_the_float32_averages_bit_for_bit(tmp_path: Path) -> None:
    whole = EMACallback(decay=DECAY)
    train(tmp_path / "whole", [whole], model=bf16_gpt2(), max_steps=6, save_strategy="steps", save_steps=3)
    resumed = EMACallback(decay=DECAY)
    train(
        tmp_path / "b",
        [resumed],
        model=bf16_gpt2(5),
        resume=str(tmp_path / "whole" / "checkpoint-3"),
        max_steps=6,
    )
    assert whole.moving_average is not None and resumed.moving_average is not None
    for name, tensor in whole.moving_average.averages().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(resumed.moving_average.averages()[name], tensor), name


def test_save_dtype_must_be_model_or_float32() -> None:
    with pytest.raises(ConfigurationError, match="save_dtype"):
        EMACallback(save_dtype="float16")
