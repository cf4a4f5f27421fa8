"""What a user installs: the wheel's contents, the entry points, and how fast the command starts."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "ema-average")


def test_wheel_ships_the_license_and_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ema_average-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "ema_average/py.typed" in names
    assert "ema_average/__main__.py" in names


def best_of(command: list[str], runs: int = 5) -> tuple[float, subprocess.CompletedProcess[str]]:
    """The fastest of a few runs: start-up time without the machine's noise."""
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_answer_without_importing_torch(flag: str) -> None:
    # Importing torch takes 1.5-3 s; the guard is that it is never imported, the time is the symptom.
    seconds, result = best_of([EXE, flag])
    assert result.returncode == 0
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.argv = ['ema-average', '{flag}']\n"
         "from ema_average.__main__ import main\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip().splitlines()[-1] == "False"
    assert seconds < 1.0, f"{flag} took {seconds:.2f} s"


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ema_average", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("ema-average ")


def test_import_is_lazy_and_the_public_api_resolves() -> None:
    code = (
        "import sys, ema_average\n"
        "assert 'torch' not in sys.modules\n"
        "assert all(getattr(ema_average, n) is not None for n in ema_average.__all__)\n"
        "print(ema_average.ExponentialMovingAverage.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ema_average.moving_average"


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6, 1.0])
def test_ctrl_c_while_starting_is_one_line_not_a_traceback(tmp_path: Path, delay: float) -> None:
    # Wherever the interrupt lands (our imports, torch's import, or the run), the user sees at most one
    # line, and never a traceback. The first ~20 ms are the interpreter's start-up and pip's script
    # wrapper, before any code of ours runs: an interrupt there gets Python's own traceback.
    import signal

    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        save_file({"w": torch_zeros()}, str(run / f"step_{step}.safetensors"))
    proc = subprocess.Popen([EXE, str(run), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr
    # finished first; interrupted (typer answers an interrupt during its parsing with a silent 130); or
    # killed before Python's own handler was installed
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, stderr)


INTERRUPT_AT = {
    # typer builds the command (evaluating the options' annotations) before click's own interrupt
    # handling is in place
    "typer builds the command": "import typer.main\ntyper.main.get_command = lambda *_: raise_it()\n",
    # an import the entry point makes, and torch's import inside the command
    "importing rich": "sys.meta_path.insert(0, Landing('rich.console'))\n",
    "importing torch": "sys.meta_path.insert(0, Landing('torch'))\n",
}
WRAPPERS = {
    "bare": "KeyboardInterrupt()",
    # Python re-raises an interrupt that lands in a class body's __set_name__ as this RuntimeError
    "wrapped": "RuntimeError('Error calling __set_name__')",
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("where", sorted(INTERRUPT_AT))
def test_ctrl_c_in_each_start_up_window_is_one_line(tmp_path: Path, where: str, wrapper: str) -> None:
    # The timing test above hits each of these windows only now and then: land the interrupt there
    # every time, bare or wrapped the way Python wraps it.
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_1.safetensors").write_bytes(b"")  # never read: the interrupt comes first
    script = (
        "import sys\n"
        "def raise_it():\n"
        "    try:\n"
        "        raise KeyboardInterrupt\n"
        "    except KeyboardInterrupt as exc:\n"
        f"        raise {WRAPPERS[wrapper]} from exc\n"
        "class Landing:\n"
        "    def __init__(self, name): self.name = name\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == self.name: raise_it()\n"
        f"{INTERRUPT_AT[where]}"
        f"sys.argv = ['ema-average', {str(run)!r}]\n"
        "from ema_average.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "ema-average: interrupted; no output written\n"
    assert sorted(p.name for p in run.iterdir()) == ["step_1.safetensors"]


def torch_zeros() -> object:  # torch imported lazily: the start-up tests here must not import it
    import torch

    return torch.zeros(4)


def test_ctrl_c_after_the_summary_is_ignored(tmp_path: Path) -> None:
    # The output is committed and the summary printed: an interrupt now lands in the interpreter's
    # shutdown, where it used to print "Exception ignored ... Traceback" from an atexit finalizer.
    import signal

    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        save_file({"w": torch_zeros()}, str(run / f"step_{step}.safetensors"))
    proc = subprocess.Popen([EXE, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("wrote "):
            break
    while proc.poll() is None:  # a Ctrl-C held down: signals through the whole shutdown
        proc.send_signal(signal.SIGINT)
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert proc.returncode == 0, (proc.returncode, stderr)
    assert (tmp_path / "run-ema.safetensors").is_file()
