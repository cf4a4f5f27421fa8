"""Installs a test plugin (a real package with an entry point) into a folder, as pip installs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
MODULE = "ema_average_fixed_share"  # what the plugin's entry point imports


def install_plugin(target: Path, package: Path = HERE) -> Path:
    """``pip install --target``: the folder then holds the module and its ``.dist-info`` with the entry
    point; put it on ``sys.path`` (or ``PYTHONPATH``) and ``importlib.metadata`` finds the declaration.
    ``package``: another test package's folder (``tests/layout_plugin_pkg``)."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--target", str(target), str(package)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return target
