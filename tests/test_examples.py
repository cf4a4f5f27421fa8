"""The examples run as they are, and do what they say."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_with_ema_runs_as_a_script() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_with_ema.py"), "--steps", "300"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "test loss of its EMA" in out.stdout


def test_train_with_ema_average_beats_the_noisy_last_iterate() -> None:
    # On a noisy target with a large constant learning rate, the average of late iterates generalises
    # better than the last one: the reason people keep an EMA at all.
    losses = runpy.run_path(str(EXAMPLES / "train_with_ema.py"))["main"](steps=1500)
    assert losses["raw"] < losses["initial"]
    assert losses["ema"] < losses["raw"]
