"""The torch floor: an older torch gets one clear line when ema_average is imported, before torch is.

A stand-in ``torch`` package (a ``version.py`` and an ``__init__`` that fails if anything imports it) sits first
on PYTHONPATH, so the check is exercised for versions that cannot be installed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ema_average._platform.torch_floor import OLDEST_TORCH

PROBE = "import sys, ema_average; assert 'torch' not in sys.modules; print('imported')"


def _stand_in_torch(root: Path, version_line: str) -> Path:
    package = root / "torch"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('the stand-in torch was imported')\n")
    (package / "version.py").write_text(f"from typing import Optional\n\n{version_line}\ndebug = False\n")
    return root


def _import_with(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]))
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "version_line",
    ["__version__ = '2.5.1+cpu'", "__version__ = '2.12.1'", "__version__: str = '1.13.1+cu117'"],
)
@pytest.mark.subprocess
def test_an_older_torch_is_refused_at_import_with_one_line(tmp_path: Path, version_line: str) -> None:
    found = version_line.split("'")[1]
    done = _import_with(_stand_in_torch(tmp_path, version_line))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    oldest = ".".join(map(str, OLDEST_TORCH))
    assert last == (
        f"ImportError: ema-average needs torch {oldest} or newer (the oldest it is tested on); this "
        f"environment has torch {found}: pip install 'torch>={oldest}'"
    )
    assert "stand-in torch was imported" not in done.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("version", ["2.13.0a0+git1234abc", "2.13.0", "2.14.1+cpu", "3.0.0"])
def test_the_floor_and_newer_import_without_importing_torch(tmp_path: Path, version: str) -> None:
    done = _import_with(_stand_in_torch(tmp_path, f"__version__ = '{version}'"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_the_declared_requirement_is_the_floor_checked_at_import() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    oldest = ".".join(map(str, OLDEST_TORCH))
    assert f'"torch>={oldest}"' in pyproject
