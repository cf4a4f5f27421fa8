"""Running the command from a test: in process by default, as the installed console script where the
process boundary is what the test is about.

In process (:func:`run_cli`) the command is the same click command the console script runs, so every
option, every one-line error and every exit code comes from the same code: ``ema_average.__main__`` adds
only what belongs to a process of its own (Ctrl-C during its imports, signal dispositions, malloc tuning,
``BrokenPipeError``), and those are tested through :func:`run_exe` (``@pytest.mark.subprocess``). It saves a
fresh interpreter and a torch import per call, about two seconds each on a busy machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from typer.testing import CliRunner

from ema_average.cli.app import app

EXE = str(Path(sys.executable).parent / "ema-average")


@dataclass(frozen=True)
class Ran:
    """What one run of the command gave: the shape of ``subprocess.CompletedProcess`` whichever way it ran.
    Its repr leads with stderr, so a failed assertion on any field shows why the command failed."""

    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"Ran(returncode={self.returncode}, stderr={self.stderr!r}, stdout={self.stdout!r})"


def run_cli(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Ran:
    """``ema-average ARGS`` in this process, through typer's ``CliRunner`` on the app.

    An exception the command lets out (a bug, or any error under ``--debug``) is raised here, with its
    traceback, instead of becoming exit 1: the console script would print a traceback, never one line.
    What the command could change for the whole process must come back as it was, since the next test
    runs in the same one: the signal handlers (conftest's guard), and here its warnings filters and
    ``showwarning``, torch's thread count, the working directory, the environment, and no thread left.
    """
    before, threads = _process_state(), set(threading.enumerate())
    result = CliRunner().invoke(
        app, [str(a) for a in args], prog_name="ema-average", env=env, catch_exceptions=False
    )
    after = _process_state()
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"the command changed this process's {changed}"
    assert set(threading.enumerate()) <= threads, "the command left a thread running"
    return Ran(result.exit_code, result.stdout, result.stderr)


def _process_state() -> dict[str, object]:
    return {
        "warnings filters": list(warnings.filters),
        "warnings.showwarning": warnings.showwarning,
        "torch threads": torch.get_num_threads(),
        "working directory": os.getcwd(),
        "environment": dict(os.environ),
    }


def run_exe(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 300) -> Ran:
    """``ema-average ARGS`` as a process of its own: the installed console script, its entry point
    (``ema_average.__main__:main``) included."""
    done = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    return Ran(done.returncode, done.stdout, done.stderr)
