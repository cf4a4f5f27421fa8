"""Shared fixtures: real producer runs, made once per set of package versions and kept in the pytest cache
(producer_cache.py; the producers themselves are in helpers.py), their tests marked ``producers``; and a guard
that no test leaves the test process's signal handlers changed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
from producer_cache import produced


@pytest.fixture(autouse=True)
def signal_handlers_unchanged() -> Iterator[None]:
    """The command run in process must leave process-wide state alone: an ignored SIGINT here would be
    inherited by every command a later test starts (a --watch child then never stops on Ctrl-C)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    assert after == before, f"signal handlers changed by the test: {before} -> {after}"


# Fixtures whose run folders a real third-party trainer writes: a test using one is in the producers tier.
PRODUCER_FIXTURES = frozenset(
    {
        "lightning_run",
        "hf_trainer_run",
        "peft_lora_run",
        "diffusers_training_run",
        "accelerate_run",
        "deepspeed_runs",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test that uses a producer fixture ``producers`` (besides the files marked as a whole), so
    ``-m "not producers"`` never starts a real trainer, whoever adds the next such test."""
    for item in items:
        if PRODUCER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.producers)


@pytest.fixture(scope="session")
def lightning_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = produced(
        request.config, tmp_path_factory, "lightning", lambda f: write_lightning_run(f / "checkpoints")
    )
    return tree / "checkpoints"


@pytest.fixture(scope="session")
def hf_trainer_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return (
        produced(request.config, tmp_path_factory, "hf-trainer", lambda f: write_hf_trainer_run(f / "out"))
        / "out"
    )


@pytest.fixture(scope="session")
def peft_lora_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    return (
        produced(request.config, tmp_path_factory, "peft-lora", lambda f: write_peft_lora_run(f / "out"))
        / "out"
    )


@pytest.fixture(scope="session")
def diffusers_training_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    tree = produced(
        request.config, tmp_path_factory, "diffusers", lambda f: write_diffusers_training_run(f / "out")
    )
    return tree / "out"


@pytest.fixture(scope="session")
def accelerate_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = produced(
        request.config, tmp_path_factory, "accelerate", lambda f: write_accelerate_run(f / "project")
    )
    return tree / "project"


@pytest.fixture(scope="session")
def deepspeed_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real DeepSpeed saves on CPU, one process per rank (see tests/deepspeed_producer.py)."""
    pytest.importorskip("deepspeed")
    return produced(request.config, tmp_path_factory, "deepspeed", write_deepspeed_runs)


def write_deepspeed_runs(out: Path) -> None:
    """Every run of DEEPSPEED_RUNS into ``out``, its ranks started as separate processes."""
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
