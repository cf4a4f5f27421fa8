"""--watch: new checkpoints are taken only when complete, and the output is always whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ema_average.errors import ConfigurationError, OutputError
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings
from ema_average.offline.run import average_checkpoints
from ema_average.offline.watch import watch
from helpers import make_state, signalled_child

STEPS = [100, 200, 300, 400]
EXE = str(Path(sys.executable).parent / "ema-average")


def last_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["last_step"])
    except Exception:
        return None


def training_actions(folder: Path, slow_step: int, pauses: int) -> list[Callable[[], None]]:
    """What a trainer does, one action per poll: write each checkpoint, ``slow_step``'s in two halves with
    ``pauses`` polls between them."""
    actions: list[Callable[[], None]] = []
    for step in STEPS:
        data = save(dict(make_state(step)), metadata={"step": str(step)})
        path = folder / f"model_step_{step}.safetensors"
        if step != slow_step:
            actions.append(lambda path=path, data=data: path.write_bytes(data))
            continue

        def first_half(path: Path = path, data: bytes = data) -> None:
            path.write_bytes(data[: len(data) // 2])

        def second_half(path: Path = path, data: bytes = data) -> None:
            with open(path, "ab") as f:
                f.write(data[len(data) // 2 :])

        actions += [first_half, *[lambda: None] * pauses, second_half]
    return actions


def test_watch_takes_each_checkpoint_when_complete(tmp_path: Path) -> None:
    # The trainer advances one action per poll through the injected sleep: no wall-clock timing.
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    settings = AverageSettings(decay=0.999, schedule="step")
    actions = training_actions(run, slow_step=300, pauses=2)
    done = threading.Event()
    torn: list[str] = []

    def read_output_while_it_changes() -> None:
        while not done.is_set():
            if out.exists():
                try:
                    load_file(str(out))
                except Exception as exc:  # a reader must never see a half-written output
                    torn.append(repr(exc))

    def next_poll(seconds: float) -> None:
        assert seconds == 0.5
        if actions:
            actions.pop(0)()

    reader = threading.Thread(target=read_output_while_it_changes, daemon=True)
    reader.start()
    notices: list[str] = []
    refreshed: list[int] = []
    polls = iter(range(100))
    watch(
        RunOptions(run, out, settings=settings),
        poll=0.5,
        on_refresh=lambda prepared, summary: refreshed.append(prepared.plan.steps[-1]),
        on_notice=notices.append,
        stop=lambda: last_step(out) == STEPS[-1] or next(polls) == 99,
        sleep=next_poll,
    )
    done.set()
    reader.join()
    assert last_step(out) == STEPS[-1]
    assert torn == []
    assert any("model_step_300.safetensors" in n and n.startswith("waiting for") for n in notices)
    assert refreshed == sorted(refreshed) and len(refreshed) >= 2
    # the live average equals one run over all checkpoints, bit for bit (float32 checkpoints)
    average_checkpoints(RunOptions(run, tmp_path / "one.safetensors", settings=settings))
    one, live = load_file(str(tmp_path / "one.safetensors")), load_file(str(out))
    assert all(torch.equal(one[n], live[n]) for n in one)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == STEPS


def test_watch_names_a_checkpoint_older_than_the_output_once(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    late = dict(make_state(150))
    actions: list[Callable[[], None]] = [
        lambda: (run / "model_step_100.safetensors").write_bytes(
            save(dict(make_state(100)), {"step": "100"})
        ),
        lambda: (run / "model_step_200.safetensors").write_bytes(
            save(dict(make_state(200)), {"step": "200"})
        ),
        lambda: None,
        lambda: (run / "model_step_150.safetensors").write_bytes(save(late, {"step": "150"})),
        lambda: None,
        lambda: None,
        lambda: None,
    ]
    notices: list[str] = []
    watch(
        RunOptions(run, out),
        poll=1.0,
        on_refresh=lambda prepared, summary: None,
        on_notice=notices.append,
        stop=lambda: not actions,
        sleep=lambda _seconds: actions.pop(0)(),
    )
    assert last_step(out) == 200
    assert notices == [
        "model_step_150.safetensors (step 150) is not applied: ema.safetensors already holds steps up to 200"
    ]


@pytest.mark.parametrize("poll", [0.0, -1.0, float("nan"), float("inf")])
def test_watch_refuses_a_poll_that_is_not_a_positive_number(tmp_path: Path, poll: float) -> None:
    with pytest.raises(ConfigurationError, match="--poll must be a positive number of seconds"):
        watch(RunOptions(tmp_path, tmp_path / "o.safetensors"), poll=poll, on_refresh=print, on_notice=print)


def test_watch_keeps_one_average(tmp_path: Path) -> None:
    sweep = [AverageSettings(decay=0.9), AverageSettings(decay=0.99)]
    with pytest.raises(ConfigurationError, match="--watch keeps one average fresh"):
        watch(RunOptions(tmp_path, settings=sweep), poll=1.0, on_refresh=print, on_notice=print)


@pytest.mark.subprocess
def test_watch_command_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    # Synchronised on what the command prints (a refresh per line), never on the clock; the child starts
    # with Ctrl-C at its default, whatever the launcher of the test run ignored.
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    write_checkpoints(run, STEPS[:2])
    command = [EXE, str(run), "-o", str(out), "--watch", "--poll", "0.2", "--decay", "0.9"]
    with signalled_child(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"watching {run} ")
        read_until_refresh(proc.stdout, STEPS[1])
        write_checkpoints(run, STEPS[2:])
        read_until_refresh(proc.stdout, STEPS[-1])
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout, stderr) == (0, "stopped watching\n", "")
    assert last_step(out) == STEPS[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "run", "staging"]


def write_checkpoints(folder: Path, steps: list[int]) -> None:
    """Each checkpoint appears whole (written aside, then renamed in), as a careful trainer saves."""
    staging = folder.parent / "staging"
    staging.mkdir(exist_ok=True)
    for step in steps:
        aside = staging / f"model_step_{step}.safetensors"
        aside.write_bytes(save(dict(make_state(step)), metadata={"step": str(step)}))
        os.replace(aside, folder / aside.name)


def read_until_refresh(stdout: IO[str], step: int) -> None:
    """Reads the command's lines until it says it refreshed the output up to ``step``."""
    for line in stdout:
        if line.startswith(f"step {step}: wrote "):
            return
        assert line.startswith(("step ", "note: ")), line
    raise AssertionError(f"the command stopped before it refreshed the output to step {step}")


def test_watch_keeps_a_file_another_program_puts_at_the_output_before_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output did not exist when the watch planned its first write; a file that appears there before the
    # rename is someone else's: kept byte for byte, and the watch stops with the one-shot run's error.
    import ema_average.offline.watch as watch_module

    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    for step in (100, 200):
        (run / f"model_step_{step}.safetensors").write_bytes(
            save(dict(make_state(step)), {"step": str(step)})
        )
    real_prepare = watch_module.prepare

    def prepare_then_another_program_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        prepared = real_prepare(*args, **kwargs)
        out.write_bytes(b"someone else's file")
        return prepared

    monkeypatch.setattr(watch_module, "prepare", prepare_then_another_program_writes)
    polls = iter(range(3))
    with pytest.raises(OutputError, match="already exists"):
        watch(
            RunOptions(run, out),
            poll=1.0,
            on_refresh=lambda prepared, summary: None,
            on_notice=print,
            stop=lambda: next(polls) == 2,
            sleep=lambda _seconds: None,
        )
    assert out.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "run"]


def test_watch_averages_again_when_an_averaged_checkpoint_is_rewritten(tmp_path: Path) -> None:
    # A restarted run saves step 200 again with other weights after the watch averaged the first step 200.
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    settings = AverageSettings(decay=0.9)  # num_updates = each step (TF rule)

    def write(step: int, seed: int) -> Callable[[], None]:
        def action() -> None:
            path = run / f"model_step_{step}.safetensors"
            path.write_bytes(save(dict(make_state(seed)), {"step": str(step)}))
            # a later write: mtime moves on even where the file system's clock is coarse
            os.utime(path, ns=(seed * 10**9, seed * 10**9))

        return action

    actions: list[Callable[[], None]] = [
        write(100, 100),
        write(200, 200),
        lambda: None,
        write(200, 999),  # the rewrite, same step and size, other weights
        lambda: None,
        write(300, 300),
        lambda: None,
        lambda: None,
    ]
    notices: list[str] = []
    refreshed: list[list[int]] = []
    watch(
        RunOptions(run, out, settings=settings),
        poll=1.0,
        on_refresh=lambda prepared, summary: refreshed.append(list(prepared.plan.steps)),
        on_notice=notices.append,
        stop=lambda: not actions,
        sleep=lambda _seconds: actions.pop(0)(),
    )
    assert notices == [
        "model_step_200.safetensors changed after it was averaged: averaging again from the first checkpoint"
    ]
    assert [100, 200] in refreshed  # the second pass starts over from step 100
    # the live output is the one-shot average of the files as they are now (float32: bit for bit)
    average_checkpoints(RunOptions(run, tmp_path / "one.safetensors", settings=settings))
    one, live = load_file(str(tmp_path / "one.safetensors")), load_file(str(out))
    assert all(torch.equal(one[n], live[n]) for n in one)
    reference = {n: t.double() for n, t in make_state(100).items() if t.is_floating_point()}
    for step, seed in ((200, 999), (300, 300)):
        d = min(0.9, (1 + step) / (10 + step))
        for n, t in make_state(seed).items():
            if t.is_floating_point():
                reference[n] = d * reference[n] + (1 - d) * t.double()
    assert all(torch.allclose(live[n].double(), reference[n], rtol=1e-6, atol=1e-7) for n in reference)


@pytest.mark.slow
def test_a_folder_checkpoint_with_a_deep_tree_inside_is_watched(tmp_path: Path) -> None:
    # Path.rglob recurses before Python 3.12: 1,200 levels inside a checkpoint folder was a RecursionError.
    from ema_average.offline.watch import snapshot
    from test_discover import deep_folder, remove_deep

    unit = tmp_path / "run" / "checkpoint-10"
    unit.mkdir(parents=True)
    (unit / "config.json").write_text("{}")
    save_file = unit / "model.safetensors"
    save_file.write_bytes(save(dict(make_state(10)), {"step": "10"}))
    try:
        deepest = deep_folder(unit, 1200, "d")
        found = snapshot(tmp_path / "run")
        assert list(found) == [unit]
        names = [entry[0] for entry in found[unit]]
        assert names == sorted([str(unit / "config.json"), str(save_file), str(deepest / "notes.txt")])
    finally:
        remove_deep(unit)
