"""The examples run as they are, and do what they say."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXE = str(Path(sys.executable).parent / "ema-average")


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when the examples run as scripts


def script(name: str, *args: str | Path) -> str:
    """The example run as a script; a failure shows what it printed to stderr (its traceback)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.mark.subprocess
def test_train_with_ema_runs_as_a_script() -> None:
    assert "test loss of its EMA" in script("train_with_ema.py", "--steps", "300")


@pytest.mark.slow
def test_train_with_ema_average_beats_the_noisy_last_iterate() -> None:
    # On a noisy target with a large constant learning rate, the average of late iterates generalises
    # better than the last one: the reason people keep an EMA at all.
    losses = runpy.run_path(str(EXAMPLES / "train_with_ema.py"))["main"](steps=1500)
    assert losses["raw"] < losses["initial"]
    assert losses["ema"] < losses["raw"]


@pytest.mark.subprocess
def test_readme_main_job_flow(tmp_path: Path) -> None:
    run_dir = tmp_path / "example-run"
    assert "saved 20 checkpoints" in script("make_example_run.py", run_dir)
    out = tmp_path / "example-run-ema.safetensors"
    done = subprocess.run(
        [EXE, str(run_dir), "--schedule", "step", "--decay", "0.998", "-q"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    printed = script("evaluate_average.py", run_dir, out)
    losses = runpy.run_path(str(EXAMPLES / "evaluate_average.py"))["main"](run_dir, out)
    assert "test loss of the average" in printed
    assert losses["average"] < losses["last"]


@pytest.mark.subprocess
def test_make_example_run_writes_pt_files_too(tmp_path: Path) -> None:
    script("make_example_run.py", tmp_path / "r", "--steps", "200", "--every", "100", "--format", "pt")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["step_000100.pt", "step_000200.pt"]


@pytest.mark.slow
def test_offline_vs_online_step_schedule_is_far_closer() -> None:
    results = runpy.run_path(str(EXAMPLES / "offline_vs_online.py"))["main"](
        steps=600, decay=0.99, everies=(10, 100)
    )
    for every, row in results.items():
        assert row["step schedule"] < row["checkpoint schedule"] / 5, (every, row)
        assert row["step schedule"] < row["uniform"], (every, row)


@pytest.mark.subprocess
def test_offline_vs_online_runs_as_a_script() -> None:
    out = script("offline_vs_online.py", "--steps", "200", "--decay", "0.99", "--every", "50")
    assert "step schedule" in out and "relative distance to the online EMA" in out


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_ema_trains_sharded_and_exports_one_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from tiny_regression import make_model, test_loss

    out = tmp_path / "ema.safetensors"
    printed = script("fsdp2_ema.py", "--steps", "200", "--out", out)  # starts its 2 processes itself
    losses = dict(line.rsplit(maxsplit=1) for line in printed.splitlines() if line.startswith("test loss"))
    model = make_model()
    model.load_state_dict(load_file(out))  # the whole EMA, by the model's own names
    assert f"{test_loss(model):.4f}" == losses["test loss of its EMA"]
    assert float(losses["test loss of its EMA"]) < float(losses["test loss of the trained model"])


@pytest.mark.slow
def test_train_lightning_ema_validates_the_ema_and_it_beats_the_raw_weights(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    import torch
    from tiny_regression import make_data, make_model

    losses = runpy.run_path(str(EXAMPLES / "train_lightning_ema.py"))["main"](steps=300, out=tmp_path)
    assert losses["ema"] < losses["raw"]
    saved = sorted(tmp_path.glob("*.ckpt"), key=lambda p: int(p.stem.rsplit("=", 1)[1]))
    assert len(saved) == 4
    model = make_model()  # the averaged model in the last .ckpt is the one validated as val_loss
    model.load_state_dict({k.removeprefix("model."): v for k, v in torch.load(saved[-1])["ema"].items()})
    x, y = make_data(2000, seed=1)
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(x), y).item() == pytest.approx(losses["ema"], rel=1e-5)


def test_train_hf_trainer_ema_saves_the_ema_it_evaluated(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    losses = runpy.run_path(str(EXAMPLES / "train_hf_trainer_ema.py"))["main"](steps=20, out=tmp_path)
    ema = losses["of the EMA while training"]
    assert losses["of the EMA saved and reloaded"] == pytest.approx(ema, rel=1e-5)
    assert abs(losses["of the raw weights"] - ema) > 1e-3
    assert (tmp_path / "checkpoint-10" / "ema" / "config.json").is_file()
