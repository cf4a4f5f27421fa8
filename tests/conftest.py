"""Shared fixtures: real producer runs made once per session (the producers themselves are in helpers.py),
and a guard that no test leaves the test process's signal handlers changed."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    DEEPSPEED_RUNS,
    write_accelerate_run,
    write_diffusers_training_run,
    write_hf_trainer_run,
    write_lightning_run,
    write_peft_lora_run,
)


@pytest.fixture(autouse=True)
def signal_handlers_unchanged() -> Iterator[None]:
    """The command run in process must leave process-wide state alone: an ignored SIGINT here would be
    inherited by every command a later test starts (a --watch child then never stops on Ctrl-C)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    assert after == before, f"signal handlers changed by the test: {before} -> {after}"


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lightning_run(tmp_path_factory.mktemp("lightning") / "checkpoints")


@pytest.fixture(scope="session")
def hf_trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_trainer_run(tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="session")
def peft_lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    return write_peft_lora_run(tmp_path_factory.mktemp("peft") / "out")


@pytest.fixture(scope="session")
def diffusers_training_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    return write_diffusers_training_run(tmp_path_factory.mktemp("diffusers") / "out")


@pytest.fixture(scope="session")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_accelerate_run(tmp_path_factory.mktemp("accelerate") / "project")


@pytest.fixture(scope="session")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real DeepSpeed saves on CPU, one process per rank (see tests/deepspeed_producer.py)."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    script = Path(__file__).with_name("deepspeed_producer.py")
    for world, variants in DEEPSPEED_RUNS.items():
        # gloo sometimes aborts a rank while the process group is torn down ("terminate called without an
        # active exception"), after its files are written: such a run is made again, on another port.
        for attempt in range(3):
            port = str(29500 + os.getpid() % 1000 + 10 * attempt + world)
            procs = [
                subprocess.Popen(
                    [sys.executable, str(script), str(out), str(world), str(rank), port, *variants],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                for rank in range(world)
            ]
            results = [(proc.communicate(timeout=300)[0], proc.returncode) for proc in procs]
            if all(code == 0 for _, code in results) or attempt == 2:
                break
        for output, code in results:
            assert code == 0, output.decode()[-3000:]
    return out
