"""Outputs in a folder several users share (issue 24), and output names as long as a file name may be.

A shared folder is ``/tmp``'s kind: mode 1777, sticky, so no user can remove or open another's 0600 files.
The tests run as root and play the other user with a child that drops to uid 65534 once its imports are
done (the interpreter lives where that user cannot read).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ema_average._platform.output_lock as lock_module
from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.errors import OutputError
from ema_average.output import (
    OutputLock,
    SafetensorsWriter,
    ShardedWriter,
    TensorEntry,
    remove_stale_temporaries,
    temp_name,
)
from helpers import kill_hard, start_child

OTHER = 65534  # nobody
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="playing another user needs root")
PROC_LOCKS = pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks")
LISTED = [TensorEntry("w", TensorSpec((4,), torch.float32))]
IMPORTS = (
    "import encodings.ascii, os, sys, torch; from pathlib import Path\n"  # loaded before the drop to 65534
    "from ema_average.output import OutputLock, ShardedWriter, TensorEntry, remove_stale_temporaries\n"
    "from ema_average.checkpoints.safetensors_format import TensorSpec\n"
    "listed = [TensorEntry('w', TensorSpec((4,), torch.float32))]\n"
)


def as_user(uid: int) -> str:
    """Child code that becomes user ``uid`` (after its imports) and says so."""
    return f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n" if uid else ""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder of mode 1777 that uid 65534 can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="ema-average-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@contextlib.contextmanager
def holding(uid: int, output: Path) -> Iterator[int]:
    """A live run of user ``uid`` holding ``output``'s lock; yields its PID."""
    child = start_child(
        IMPORTS + as_user(uid) + "lock = OutputLock(Path(sys.argv[1])); print('ready', flush=True)\n"
        "sys.stdin.read()",
        str(output),
    )
    try:
        yield child.pid
    finally:
        kill_hard(child)


def run_as(uid: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORTS + as_user(uid) + code, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.subprocess
@AS_ROOT
def test_a_killed_run_of_another_user_blocks_nothing(shared: Path) -> None:
    """A SIGKILLed run of root left its 0600 lock file and its staging folder in a 1777 folder; another
    user's run on that output was refused for good ("belongs to user 0, not to this one")."""
    output = shared / "out"
    killed = start_child(
        IMPORTS + "w = ShardedWriter(Path(sys.argv[1]), listed, None, overwrite=False, max_shard_size=64)\n"
        "w.write('w', torch.zeros(4)); print('ready', flush=True); sys.stdin.read()",
        str(output),
    )
    staging = temp_name(output, killed.pid)
    kill_hard(killed)
    left = sorted(p.name for p in shared.iterdir())
    assert left == sorted([staging.name, ".out.ema-average-u0.lock"])

    result = run_as(
        OTHER,
        "remove_stale_temporaries(Path(sys.argv[1]).parent)\n"
        "w = ShardedWriter(Path(sys.argv[1]), listed, None, overwrite=False, max_shard_size=64)\n"
        "w.write('w', torch.arange(4.0)); w.commit()",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert output.stat().st_uid == OTHER
    assert load_file(output / "model.safetensors")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    # root's leftovers stay (that user cannot remove them, as docs/command.md says): root's next run removes them
    assert sorted(p.name for p in shared.iterdir()) == sorted([*left, "out"])
    assert sorted(remove_stale_temporaries(shared)) == sorted([staging, shared / ".out.ema-average-u0.lock"])
    assert [p.name for p in shared.iterdir()] == ["out"]


@pytest.mark.subprocess
@AS_ROOT
@PROC_LOCKS
@pytest.mark.parametrize(("holder", "taker"), [(0, OTHER), (OTHER, 0)])
def test_runs_of_two_users_exclude_each_other(shared: Path, holder: int, taker: int) -> None:
    output = shared / "out.safetensors"
    with holding(holder, output) as pid:
        lock_file = shared / f".out.safetensors.ema-average-u{holder}.lock"
        expected = f"{output}: locked by process {pid} of user {holder} (it holds {lock_file})"
        if taker == 0:
            with pytest.raises(OutputError) as info:
                OutputLock(output)
            assert str(info.value) == expected
        else:
            result = run_as(taker, "OutputLock(Path(sys.argv[1]))", str(output))
            assert result.returncode == 1, result.stderr
            assert result.stderr.strip().splitlines()[-1].endswith(expected), result.stderr
        assert sorted(p.name for p in shared.iterdir()) == [f".out.safetensors.ema-average-u{holder}.lock"]
    with OutputLock(output):  # free once that run is gone
        pass


@pytest.mark.subprocess
@PROC_LOCKS
def test_a_lock_an_earlier_version_holds_is_respected(tmp_path: Path) -> None:
    """An earlier version's run locks ``.NAME.ema-average.lock``, for every user: still one run at a time."""
    output, legacy = tmp_path / "out.safetensors", tmp_path / ".out.safetensors.ema-average.lock"
    child = start_child(
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('ready', flush=True); sys.stdin.read()",
        str(legacy),
    )
    try:
        with pytest.raises(OutputError) as info:
            OutputLock(output)
        assert str(info.value) == (
            f"{output}: locked by process {child.pid} of user {os.geteuid()} (it holds {legacy})"
        )
        assert [p.name for p in tmp_path.iterdir()] == [legacy.name]  # ours was given up again
    finally:
        kill_hard(child)
    with OutputLock(output):
        pass
    assert remove_stale_temporaries(tmp_path) == [legacy]  # a free one of this user's is removed


def test_without_proc_locks_another_users_lock_is_named_as_what_to_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, other = tmp_path / "out.safetensors", tmp_path / ".out.safetensors.ema-average-u4242.lock"
    other.write_bytes(b"")
    monkeypatch.setattr(lock_module, "_listed_holder", lambda _info: None)  # as where /proc/locks is not
    with pytest.raises(OutputError) as info:
        OutputLock(output)
    assert str(info.value) == (
        f"{output}: {other}, a lock file of user {os.geteuid()}, may be held by a run of that user (no "
        "/proc/locks to tell); if none is writing this output, remove it (its owner or root can)"
    )
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


# --- Output names of up to 255 bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a" * 251 + ".bin", "\u00e9" * 120 + ".safetensors", "x" * 238])
def test_any_legal_output_name_has_its_lock_and_staging_names(tmp_path: Path, name: str) -> None:
    """Names of 238-255 bytes were refused: the lock and staging names passed a file name's 255 bytes."""
    assert len(os.fsencode(name)) >= 238
    file_output = tmp_path / name
    with OutputLock(file_output):
        writer = SafetensorsWriter(file_output, LISTED, None, overwrite=False)
        writer.write("w", torch.arange(4.0))
        writer.commit()
    assert load_file(file_output)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]

    (tmp_path / "f").mkdir()
    folder_output = tmp_path / "f" / name
    writer = ShardedWriter(folder_output, LISTED, None, overwrite=False, max_shard_size=64)
    staging = temp_name(folder_output, os.getpid())
    assert staging.is_dir() and len(os.fsencode(staging.name)) <= 255
    writer.write("w", torch.ones(4))
    writer.commit()
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [name]
    assert load_file(folder_output / "model.safetensors")["w"].tolist() == [1.0] * 4


def test_two_long_names_with_one_start_have_their_own_locks(tmp_path: Path) -> None:
    first, second = tmp_path / ("n" * 250 + "1"), tmp_path / ("n" * 250 + "2")
    with OutputLock(first), OutputLock(second):
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 2 and all(len(os.fsencode(n)) <= 255 for n in names)


@pytest.fixture(autouse=True)
def _no_leaked_locks() -> Iterator[None]:
    yield
    assert lock_module._held == {}, "a test left an output lock held"
