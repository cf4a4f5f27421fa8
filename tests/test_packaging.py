"""What a user installs: the wheel's contents, the entry points, what starting the command imports, and
Ctrl-C while it starts."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import interrupts_raise, signalled_child

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "ema-average")
IMPORT_TIMES = {"PYTHONPROFILEIMPORTTIME": "1"}  # Python lists each import on stderr as it completes


@pytest.mark.subprocess
def test_wheel_ships_the_license_and_py_typed(tmp_path: Path) -> None:
    built = subprocess.run(
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
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("ema_average-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "ema_average/py.typed" in names
    assert "ema_average/__main__.py" in names


def imported_modules(stderr: str) -> set[str]:
    """The modules a process imported, from the list Python writes with ``-X importtime``."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.subprocess
@pytest.mark.parametrize(("flag", "answer"), [("--version", "ema-average "), ("--help", "Usage: ")])
def test_version_and_help_answer_without_importing_torch(flag: str, answer: str) -> None:
    # Importing torch takes seconds: the guard is that it is never imported, which Python's own list of
    # imports shows (-X importtime, through the installed script); how long it took is not asserted.
    result = subprocess.run(
        [EXE, flag], capture_output=True, text=True, timeout=120, env={**os.environ, **IMPORT_TIMES}
    )
    assert result.returncode == 0, result.stderr
    assert answer in result.stdout
    modules = imported_modules(result.stderr)
    assert {"ema_average.__main__", "ema_average.cli.app"} <= modules  # the list is real and complete
    assert sorted(m for m in modules if m.split(".")[0] == "torch") == []


def imports_of(source: Path) -> set[str]:
    """The modules a source file imports (absolute, or relative to the ``ema_average`` package), anywhere in it."""
    import ast

    package = ".".join(source.relative_to(ROOT / "src").parent.parts)
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base])
            names.update([base.rstrip("."), *(f"{base.rstrip('.')}.{alias.name}" for alias in node.names)])
    return names


def test_only_the_entry_point_imports_the_command_line() -> None:
    # Imports flow one way: cli/ -> offline/...; a module below the command that imported it would
    # pull typer and rich into the library and tie the engine to the command's options.
    package = ROOT / "src" / "ema_average"
    command = {f"ema_average.cli.{p.stem}" for p in (package / "cli").glob("*.py") if p.stem != "__init__"}
    assert {"ema_average.cli.app", "ema_average.cli.options", "ema_average.cli.report"} <= command
    importers = {
        str(source.relative_to(package))
        for source in package.rglob("*.py")
        if source.parent.name != "cli" and imports_of(source) & (command | {"ema_average.cli"})
    }
    assert importers == {"__main__.py"}


@pytest.mark.subprocess
def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ema_average", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("ema-average "), result.stderr


@pytest.mark.subprocess
def test_import_is_lazy_and_the_public_api_resolves() -> None:
    code = (
        "import sys, ema_average\n"
        "assert 'torch' not in sys.modules\n"
        "assert all(getattr(ema_average, n) is not None for n in ema_average.__all__)\n"
        "print(ema_average.ExponentialMovingAverage.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ema_average.engine.averages"


# Modules torch imports early and midway, each with over 40 KB of import list still to come before torch is
# imported (and the run can start): an interrupt sent on seeing one lands inside torch's import.
TORCH_LANDMARKS = ["torch._C", "torch.nn"]
SMALL_PIPE = 4096  # the least a pipe holds: the child stops this many bytes past what was read


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux's pipe size control")
@pytest.mark.parametrize("landmark", TORCH_LANDMARKS)
def test_ctrl_c_while_torch_imports_is_one_line_not_a_traceback(tmp_path: Path, landmark: str) -> None:
    # A real Ctrl-C through the installed script, landing where torch's import is running (module code,
    # C extensions, class bodies that wrap it), at a point set by the child's own import list, not by a
    # sleep: it writes that list into a one-page pipe, so it cannot get more than two pages past the
    # landmark before the signal is sent.
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        save_file({"w": torch_zeros()}, str(run / f"step_{step}.safetensors"))
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    env = {**os.environ, **IMPORT_TIMES}
    try:
        with signalled_child(
            [EXE, str(run), "-q"], stdout=subprocess.PIPE, stderr=write_end, env=env
        ) as proc:
            os.close(write_end)
            before = read_until_imported(read_end, landmark)
            proc.send_signal(signal.SIGINT)
            stderr = (before + read_to_end(read_end)).decode()
            stdout = proc.communicate(timeout=120)[0]
    finally:
        os.close(read_end)
    ours = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert (proc.returncode, ours, stdout) == (130, ["ema-average: interrupted; no output written"], b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def read_until_imported(fd: int, module: str) -> bytes:
    """What the child wrote to ``fd`` up to the line saying it imported ``module``, read a page at a time."""
    landmark = re.compile(rb"\| +" + re.escape(module.encode()) + rb"\n")
    seen = b""
    while not landmark.search(seen, max(0, len(seen) - SMALL_PIPE - 200)):
        page = os.read(fd, SMALL_PIPE)
        assert page, f"the command ended before importing {module}: {seen.decode()[-2000:]}"
        seen += page
    return seen


def read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


PARSING = "typer parses the arguments"
INTERRUPT_AT = {
    # typer builds the command (evaluating the options' annotations) before click's own interrupt
    # handling is in place
    "typer builds the command": "import typer.main\ntyper.main.get_command = lambda *_: raise_it()\n",
    # an import the entry point makes, and torch's import inside the command
    "importing rich": "sys.meta_path.insert(0, Landing('rich.console'))\n",
    "importing torch": "sys.meta_path.insert(0, Landing('torch'))\n",
    # typer parses the arguments (click's make_context): typer answers an interrupt there with a bare
    # exit 130, which the entry point gives its line
    PARSING: "import typer.core\ntyper.core.TyperCommand.make_context = lambda *_, **__: raise_it()\n",
}
WRAPPERS = {
    "bare": "KeyboardInterrupt()",
    # Python re-raises an interrupt that lands in a class body's __set_name__ as this RuntimeError
    "wrapped": "RuntimeError('Error calling __set_name__')",
}


@pytest.mark.subprocess
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("where", sorted(INTERRUPT_AT))
def test_ctrl_c_in_each_start_up_window_is_one_line(tmp_path: Path, where: str, wrapper: str) -> None:
    # Each window of the start-up, before torch's import (which the real-signal test above covers): land
    # the interrupt there every time, bare or wrapped the way Python wraps it.
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


@pytest.mark.subprocess
def test_ctrl_c_after_the_summary_is_ignored(tmp_path: Path) -> None:
    # The output is committed and the summary printed: an interrupt now lands in the interpreter's
    # shutdown, where it used to print "Exception ignored ... Traceback" from an atexit finalizer.
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        save_file({"w": torch_zeros()}, str(run / f"step_{step}.safetensors"))
    command = [EXE, str(run)]
    with signalled_child(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("wrote "):
                break
        else:
            raise AssertionError("the command ended without its summary")
        while proc.poll() is None:  # a Ctrl-C held down: signals through the whole shutdown
            proc.send_signal(signal.SIGINT)
            time.sleep(0.001)  # the key's repeat, not a wait for anything
        _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert proc.returncode == 0, (proc.returncode, stderr)
    assert (tmp_path / "run-ema.safetensors").is_file()


@pytest.mark.subprocess
def test_a_signalled_child_starts_with_default_dispositions() -> None:
    # A shell without job control (nohup, `sh -c '... &'`, some CI runners) starts the test run with Ctrl-C
    # ignored, and an ignored disposition survives exec: every child a test signals starts through
    # signalled_child, which puts them back. Shown here with this process ignoring them for a moment.
    report = (
        "import signal as s; n = {s.SIG_IGN: 'ignored', s.SIG_DFL: 'default', s.default_int_handler: 'raises'}\n"
        "print(*(n[s.getsignal(sig)] for sig in (s.SIGINT, s.SIGTERM)))"
    )
    command = [sys.executable, "-c", report]
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        inherited = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
        with signalled_child(command, stdout=subprocess.PIPE, text=True) as proc:
            given = proc.communicate(timeout=120)[0]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert inherited == "ignored ignored\n"  # what a plain child of such a launcher gets
    assert given == "raises default\n"  # Ctrl-C raises KeyboardInterrupt, SIGTERM ends it


def test_a_test_that_signals_itself_gets_ctrl_c_raising() -> None:
    # The same launcher leaves the test run itself with Ctrl-C ignored (Python keeps an inherited SIG_IGN):
    # a test that signals its own process does so inside interrupts_raise, which gives the launcher's back.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_raise():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            signal.raise_signal(signal.SIGINT)
        restored = [signal.getsignal(sig) for sig in saved]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert restored == [signal.SIG_IGN, signal.SIG_IGN]
