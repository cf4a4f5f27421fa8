"""Resuming the Hugging Face Trainer EMA callback from what a checkpoint holds, with the real Trainer: a
record that is not the one the callback writes (empty, ``null``, a list, a last update after the restored
step, a NaN average) is refused with one line naming the file, never taken as "no average" or continued."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from ema_average.errors import AverageStateError, CheckpointError
from ema_average.online.transformers import STATE_METADATA_KEY, EMACallback
from helpers import tiny_gpt2
from test_integrations_transformers import DECAY, Tokens, arguments, train

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


# --- resuming from another folder: the EMA of exactly the weights the Trainer restored ---------------------


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted 8-step run saved at steps 4 and 8, and its final EMA."""
    run = tmp_path_factory.mktemp("whole") / "run"
    ema = EMACallback(decay=DECAY)
    train(run, [ema], max_steps=8, save_strategy="steps", save_steps=4)
    assert ema.moving_average is not None
    return run, {n: t.clone() for n, t in ema.moving_average.averages().items()}


def resume_and_compare(folder: Path, out: Path, expected: dict[str, torch.Tensor]) -> None:
    ema = EMACallback(decay=DECAY)
    train(out, [ema], model=tiny_gpt2(seed=5), resume=str(folder), max_steps=8)
    assert ema.moving_average is not None and ema.moving_average.num_applied == 8
    got = ema.moving_average.averages()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_resuming_another_folders_checkpoint_into_a_new_output_dir_continues_its_ema(
    whole_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    run, expected = whole_run
    resume_and_compare(run / "checkpoint-4", tmp_path / "new", expected)


def test_resuming_a_renamed_checkpoint_folder_continues_its_ema(
    whole_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    run, expected = whole_run
    renamed = tmp_path / "kept" / "best-so-far"
    shutil.copytree(run / "checkpoint-4", renamed)
    resume_and_compare(renamed, tmp_path / "kept", expected)


def other_runs_checkpoint(out: Path) -> None:
    """``out/checkpoint-4`` of another run (other initial weights), EMA and all."""
    train(
        out,
        [EMACallback(decay=DECAY)],
        model=tiny_gpt2(seed=9),
        max_steps=4,
        save_strategy="steps",
        save_steps=4,
    )


@pytest.mark.slow
def test_an_output_dir_holding_another_runs_checkpoint_does_not_lend_its_ema(
    whole_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    run, expected = whole_run
    other_runs_checkpoint(tmp_path / "new")
    resume_and_compare(run / "checkpoint-4", tmp_path / "new", expected)


def test_without_the_resume_seam_another_runs_ema_is_refused_by_the_weights_digest(
    whole_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should transformers stop exposing the folder, the digest still tells another run's EMA apart."""
    from ema_average.online import transformers as integration

    run, _ = whole_run
    other_runs_checkpoint(tmp_path / "new")
    monkeypatch.setattr(integration, "trainer_resume_folder", lambda: None)
    with pytest.raises(
        CheckpointError, match="the EMA of other training weights than those the Trainer resumed"
    ):
        train(tmp_path / "new", [EMACallback(decay=DECAY)], resume=str(run / "checkpoint-4"), max_steps=8)


class SeamProbe(TrainerCallback):
    """What the compatibility seam finds while the Trainer starts a resumed run."""

    found: Path | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ema_average.online.transformers import trainer_resume_folder

        self.found = trainer_resume_folder()


@pytest.mark.parametrize("how", ["path", "true"])
def test_the_resume_seam_finds_the_folder_the_trainer_resumed(
    whole_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, how: str
) -> None:
    """Pins transformers' internals the callback relies on: fails loudly if a new version moves them."""
    run, _ = whole_run
    out = tmp_path / "out"
    shutil.copytree(run / "checkpoint-4", out / "checkpoint-4")
    probe = SeamProbe()
    resume: Any = str(out / "checkpoint-4") if how == "path" else True
    trainer = Trainer(
        model=tiny_gpt2(), args=arguments(out, max_steps=5), train_dataset=Tokens(), callbacks=[probe]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    assert probe.found is not None and probe.found.resolve() == (out / "checkpoint-4").resolve()
