"""--watch: new checkpoints are taken only when complete, and the output is always whole."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from conftest import make_state
from ema_average.pipeline import AverageOptions, average_checkpoints
from ema_average.plan import AverageSettings
from ema_average.watch import watch

STEPS = [100, 200, 300, 400]
EXE = str(Path(sys.executable).parent / "ema-average")


def last_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["last_step"])
    except Exception:
        return None


def slow_training_run(folder: Path, slow_step: int, pause: float = 1.0, gap: float = 0.3) -> threading.Thread:
    """Writes STEPS' checkpoints one after another; ``slow_step``'s in two halves with a pause between."""

    def write() -> None:
        for step in STEPS:
            data = save(dict(make_state(step)), metadata={"step": str(step)})
            path = folder / f"model_step_{step}.safetensors"
            with open(path, "wb") as f:
                if step == slow_step:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(pause)
                f.write(data[len(data) // 2 :] if step == slow_step else data)
            time.sleep(gap)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_watch_takes_each_checkpoint_when_complete(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    settings = AverageSettings(decay=0.999, schedule="step")
    writer = slow_training_run(run, slow_step=300)
    done = threading.Event()
    torn: list[str] = []

    def read_output_while_it_changes() -> None:
        while not done.is_set():
            if out.exists():
                try:
                    load_file(str(out))
                except Exception as exc:  # a reader must never see a half-written output
                    torn.append(repr(exc))
            time.sleep(0.005)

    reader = threading.Thread(target=read_output_while_it_changes, daemon=True)
    reader.start()
    notices: list[str] = []
    refreshed: list[int] = []
    deadline = time.monotonic() + 60
    watch(
        AverageOptions(run, out, settings=settings),
        poll=0.1,
        on_refresh=lambda prepared, summary: refreshed.append(prepared.plan.steps[-1]),
        on_notice=notices.append,
        stop=lambda: last_step(out) == STEPS[-1] or time.monotonic() > deadline,
    )
    done.set()
    writer.join()
    reader.join()
    assert last_step(out) == STEPS[-1]
    assert torn == []
    assert any("model_step_300.safetensors" in n and n.startswith("waiting for") for n in notices)
    assert refreshed == sorted(refreshed) and len(refreshed) >= 2
    # the live average equals one run over all checkpoints, bit for bit (float32 checkpoints)
    average_checkpoints(AverageOptions(run, tmp_path / "one.safetensors", settings=settings))
    one, live = load_file(str(tmp_path / "one.safetensors")), load_file(str(out))
    assert all(torch.equal(one[n], live[n]) for n in one)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == STEPS


def test_watch_command_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    proc = subprocess.Popen(
        [EXE, str(run), "-o", str(out), "--watch", "--poll", "0.2", "--decay", "0.9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = slow_training_run(run, slow_step=200, pause=0.5, gap=0.2)
    deadline = time.monotonic() + 90
    while last_step(out) != STEPS[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.join()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "watching" in stdout and "stopped watching" in stdout
    assert last_step(out) == STEPS[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "run"]
