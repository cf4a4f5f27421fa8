"""Post-hoc EMA snapshots kept by the Hugging Face EMA callback (``posthoc_every``), with the real Trainer: each
snapshot is the float64 power EMA of the weights after every step, the command reconstructs from the run
folder, a resumed run writes the uninterrupted run's snapshots bit for bit, and the training weights are
those of a run without the option, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ema_average.errors import CheckpointError, ConfigurationError
from ema_average.online.transformers import EMACallback
from posthoc_helpers import assert_reconstructs, assert_snapshots_are_power_emas, read_snapshots
from test_integrations_transformers import Recorder, train

WIDTHS = (0.05, 0.1)


@pytest.mark.slow
def test_snapshots_are_power_emas_reconstructed_and_leave_training_untouched(tmp_path: Path) -> None:
    run, recorder = tmp_path / "run", Recorder()
    train(run, [recorder, EMACallback(decay=0.9, posthoc_every=2)], max_steps=6)
    plain = Recorder()
    train(tmp_path / "plain", [plain, EMACallback(decay=0.9)], max_steps=6)
    assert plain.steps == recorder.steps == list(range(7))
    for with_option, without in zip(recorder.weights, plain.weights, strict=True):
        for name, value in without.items():
            assert torch.equal(with_option[name], value), name
    folder = run / "posthoc-ema"
    assert_snapshots_are_power_emas(folder, recorder.weights[1:], [2, 4, 6], WIDTHS)
    assert_reconstructs(run, folder, 0.07, tmp_path / "sigma0.07.safetensors")


@pytest.mark.slow
def test_resume_writes_the_uninterrupted_runs_snapshots_bit_for_bit(tmp_path: Path) -> None:
    options = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}
    train(tmp_path / "whole", [EMACallback(decay=0.9, posthoc_every=2)], **options)  # type: ignore[arg-type]
    parts = tmp_path / "parts"
    train(parts, [EMACallback(decay=0.9, posthoc_every=2)], **{**options, "max_steps": 4})  # type: ignore[arg-type]
    assert (parts / "checkpoint-4" / "posthoc_ema_state.pt").is_file()
    # a resume writes only the later steps: a snapshot removed before it stays absent
    (parts / "posthoc-ema" / "ema-sigma_rel0.05-step0000000004.safetensors").unlink()
    resumed = EMACallback(decay=0.9, posthoc_every=2)
    train(parts, [resumed], resume=str(parts / "checkpoint-4"), **options)  # type: ignore[arg-type]
    whole, got = read_snapshots(tmp_path / "whole" / "posthoc-ema"), read_snapshots(parts / "posthoc-ema")
    assert sorted(got) == sorted(k for k in whole if k != (4, 0.05))
    for key in [(6, 0.05), (6, 0.1), (8, 0.05), (8, 0.1)]:
        for name, value in whole[key].items():
            assert torch.equal(got[key][name], value), (key, name)


def test_resuming_a_checkpoint_saved_without_snapshots_is_one_clear_error(tmp_path: Path) -> None:
    train(tmp_path, [EMACallback(decay=0.9)], max_steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(CheckpointError, match="holds no post-hoc snapshots' state"):
        train(
            tmp_path,
            [EMACallback(decay=0.9, posthoc_every=2)],
            resume=str(tmp_path / "checkpoint-2"),
            max_steps=4,
        )


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"posthoc_every": 0}, "posthoc_every must be a whole number"),
        ({"posthoc_every": 2, "posthoc_dtype": torch.float64}, "posthoc_dtype must be"),
        ({"posthoc_every": 2, "posthoc_sigma_rels": (0.05, 0.05)}, "one or more different widths"),
    ],
)
def test_bad_snapshot_settings_fail_at_construction(options: dict, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        EMACallback(decay=0.9, **options)
