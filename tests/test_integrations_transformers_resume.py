"""Resuming the Hugging Face Trainer EMA callback from what a checkpoint holds, with the real Trainer: a
record that is not the one the callback writes (empty, ``null``, a list, a last update after the restored
step, a NaN average) is refused with one line naming the file, never taken as "no average" or continued."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ema_average.errors import AverageStateError, CheckpointError
from ema_average.integrations.transformers import STATE_METADATA_KEY, EMACallback
from test_integrations_transformers import DECAY, train

EMA_FILE = Path("checkpoint-4") / "ema" / "model.safetensors"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run saved at step 4 with the callback: the checkpoint every case below edits a copy of."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(run, [EMACallback(decay=DECAY)], max_steps=4, save_strategy="steps", save_steps=4)
    return run


def edited_copy(saved_run: Path, folder: Path, record: object, nan: bool = False) -> Path:
    """A copy of the saved run whose ema/ file holds ``record`` (JSON) and, with ``nan``, a NaN average."""
    run = folder / "run"
    shutil.copytree(saved_run, run)
    path = run / EMA_FILE
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata[STATE_METADATA_KEY] = json.dumps(record)
    if nan:
        name = "transformer.h.0.mlp.c_fc.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = math.nan
    save_file(tensors, str(path), metadata=metadata)
    return run


def saved_record(saved_run: Path) -> dict:
    with safe_open(str(saved_run / EMA_FILE), framework="pt") as f:
        return json.loads(f.metadata()[STATE_METADATA_KEY])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"last_step": 100}, "last update is at step 100, after the trainer's step 4"),
        ({"num_applied": 9}, "counts 9 updates by step 4"),
        (
            {"settings": {"decay": 0.5, "numerator": 1.0, "denominator": 10.0}},
            r"build EMACallback\(decay=0\.5",
        ),
        ("empty", "saved state is empty"),
        ("null", "must be the mapping it writes, got NoneType"),
        ("list", "must be the mapping it writes, got list"),
        ("nan", "'transformer.h.0.mlp.c_fc.weight' holds NaN"),
    ],
)
def test_a_hostile_or_inconsistent_record_is_refused_naming_the_file(
    saved_run: Path, tmp_path: Path, change: object, words: str
) -> None:
    record: object = saved_record(saved_run)
    if isinstance(change, dict):
        record = {**record, **change}  # type: ignore[dict-item]
    else:
        record = {"empty": {}, "null": None, "list": [1, 2], "nan": record}[change]  # type: ignore[index]
    run = edited_copy(saved_run, tmp_path, record, nan=change == "nan")
    with pytest.raises(AverageStateError, match=words) as caught:
        train(run, [EMACallback(decay=DECAY)], resume=str(run / "checkpoint-4"), max_steps=8)
    assert str(run / EMA_FILE) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_unedited_record_resumes(saved_run: Path, tmp_path: Path) -> None:
    run = edited_copy(saved_run, tmp_path, saved_record(saved_run))
    ema = EMACallback(decay=DECAY)
    train(run, [ema], resume=str(run / "checkpoint-4"), max_steps=6)
    assert ema.moving_average is not None and ema.moving_average.num_applied == 6


def test_a_checkpoint_without_the_callbacks_record_is_one_clear_error(
    saved_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    save_file(load_file(str(run / EMA_FILE)), str(run / EMA_FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="record: not saved by the EMA callback"):
        train(run, [EMACallback(decay=DECAY)], resume=str(run / "checkpoint-4"), max_steps=8)
