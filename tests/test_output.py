"""The output package against the safetensors library itself: file and folder writers, lock, commit."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ema_average._platform.fs as fs_module
import ema_average._platform.open_files as pool_module
import ema_average._platform.output_lock as lock_module
from ema_average.checkpoints import SafetensorsCheckpoint
from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.errors import OutputError
from ema_average.output import (
    OutputLock,
    SafetensorsWriter,
    ShardedWriter,
    TensorEntry,
    commit_together,
    name_problem,
    remove_stale_temporaries,
)
from helpers import interrupts_raise, kill_hard, start_child

META = {"ema_average_version": "test", "k": "v"}  # the marker that makes a folder ours to replace


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(7, 3, generator=g),
        "a.weight": torch.randn(5, generator=g).bfloat16(),
        "steps": torch.tensor([3], dtype=torch.int64),
        "m.bias": torch.randn(2, generator=g).double(),
        "empty": torch.zeros(0),
        "h": torch.randn(4, generator=g).half(),
        "flag": torch.tensor(True),
    }


def layers(value: float, count: int = 5) -> dict[str, torch.Tensor]:
    return {f"layer.{i}.weight": torch.full((256,), value + i) for i in range(count)}  # 1 KiB each


def entries(ts: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(n, TensorSpec(tuple(t.shape), t.dtype)) for n, t in ts.items()]


def write_all(writer: SafetensorsWriter | ShardedWriter, ts: dict[str, torch.Tensor]) -> None:
    for name, t in ts.items():
        writer.write(name, t)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sharded(
    path: Path, ts: dict[str, torch.Tensor], *, overwrite: bool = False, shard: int = 2048, **kw: object
) -> ShardedWriter:
    writer = ShardedWriter(path, entries(ts), META, overwrite=overwrite, max_shard_size=shard, **kw)  # type: ignore[arg-type]
    write_all(writer, ts)
    return writer


@pytest.fixture(params=["anonymous", "named"])
def temp_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both temporary files: Linux's unnamed O_TMPFILE, and the hidden named file used elsewhere."""
    if request.param == "named":
        monkeypatch.setattr(fs_module, "open_anonymous", lambda _folder: None)
    return request.param


OWN_LOCK = ".{}.ema-average-u" + str(os.geteuid()) + ".lock"  # this user's lock file of output {}


def locked_by(pid: int) -> str:
    """The refusal of an output whose lock process ``pid`` holds."""
    return rf"locked by process {pid} \(it holds .*\.ema-average-u\d+\.lock\)"


# --- One file ---------------------------------------------------------------------------------------


def test_bytes_equal_save_file_in_any_write_order(tmp_path: Path, temp_kind: str) -> None:
    ts = tensors()
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"step": "3"})
    writer = SafetensorsWriter(tmp_path / "mine.safetensors", entries(ts), {"step": "3"}, overwrite=False)
    for name in reversed(list(ts)):
        writer.write(name, ts[name])
    writer.commit()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "ref.safetensors"]


def test_nothing_is_visible_until_commit_and_abort_leaves_nothing(tmp_path: Path, temp_kind: str) -> None:
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=False)
    writer.write("z.weight", ts["z.weight"])
    assert not (tmp_path / "out.safetensors").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_a_missing_tensor(tmp_path: Path) -> None:
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=False)
    with pytest.raises(OutputError, match="7 tensors were never written"):
        writer.commit()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path, temp_kind: str) -> None:
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    with pytest.raises(OutputError, match=r"out\.safetensors: already exists; pass --overwrite"):
        SafetensorsWriter(tmp_path / "out.safetensors", entries(tensors()), None, overwrite=False)
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"
    ts = tensors()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", entries(ts), None, overwrite=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"  # untouched until commit
    write_all(writer, ts)
    writer.commit()
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in ts.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_wrong_size_is_refused(tmp_path: Path) -> None:
    writer = SafetensorsWriter(
        tmp_path / "o.safetensors", [TensorEntry("w", TensorSpec((3,), torch.float32))], None, overwrite=False
    )
    with pytest.raises(OutputError, match="'w' has 16 bytes, header says 12"):
        writer.write("w", torch.zeros(4))
    writer.abort()


def test_a_file_that_appears_during_the_run_is_never_replaced(tmp_path: Path, temp_kind: str) -> None:
    out = tmp_path / "out.safetensors"
    ts = tensors()
    writer = SafetensorsWriter(out, entries(ts), None, overwrite=False)
    write_all(writer, ts)
    out.write_bytes(b"another run's result")
    with pytest.raises(OutputError, match=r"out\.safetensors: appeared while this run was writing; nothing"):
        writer.commit()
    assert out.read_bytes() == b"another run's result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary left


def test_without_hard_links_the_commit_is_a_checked_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs_module, "open_anonymous", lambda _folder: None)

    def no_links(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out, ts = tmp_path / "out.safetensors", tensors()
    writer = SafetensorsWriter(out, entries(ts), None, overwrite=False)
    write_all(writer, ts)
    writer.commit()
    assert torch.equal(load_file(str(out))["z.weight"], ts["z.weight"])
    writer = SafetensorsWriter(tmp_path / "again.safetensors", entries(ts), None, overwrite=False)
    write_all(writer, ts)
    (tmp_path / "again.safetensors").write_bytes(b"theirs")
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        writer.commit()
    assert (tmp_path / "again.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "out.safetensors"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("layer.weight", None),
        ("ünïcode.権重", None),
        ("__metadata__", "reserved"),
        ("", "empty"),
        ("bad\udc80", "lone surrogate"),
        (3, "not a string"),
    ],
)
def test_name_problem(name: object, problem: str | None) -> None:
    found = name_problem(name)
    assert found is None if problem is None else problem in (found or "")


@pytest.mark.parametrize("bad", ["__metadata__", "bad\udc80", "", "twice"])
def test_names_the_format_cannot_store_are_refused_before_any_file(tmp_path: Path, bad: str) -> None:
    listed = [
        TensorEntry("ok", TensorSpec((2,), torch.float32)),
        TensorEntry(bad, TensorSpec((2,), torch.float32)),
    ]
    if bad == "twice":
        listed.append(TensorEntry("twice", TensorSpec((2,), torch.float32)))
    for make in (
        lambda: SafetensorsWriter(tmp_path / "o.safetensors", listed, None, overwrite=False),
        lambda: ShardedWriter(tmp_path / "o", listed, None, overwrite=False, max_shard_size=4),
    ):
        with pytest.raises(OutputError, match=re.escape(f"tensor {bad!r} cannot be written to safetensors")):
            make()
        assert list(tmp_path.iterdir()) == []


def test_metadata_utf8_cannot_encode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="metadata 'sources'"):
        SafetensorsWriter(tmp_path / "o.safetensors", [], {"sources": "ckpt\udcff"}, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_header_that_does_not_read_back_is_not_committed(tmp_path: Path, temp_kind: str) -> None:
    out = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(
        out, [TensorEntry("w", TensorSpec((3,), torch.float32))], None, overwrite=False
    )
    writer.write("w", torch.ones(3))
    damaged = writer._header.replace(b'"F32"', b'"I32"')  # a writer bug: the header says another dtype
    os.pwrite(writer._fd, damaged, 0)  # type: ignore[arg-type]
    with pytest.raises(
        OutputError, match=r"does not match the tensors \(tensor 'w'\); nothing was committed"
    ):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


# --- Several outputs of one run ------------------------------------------------------------------------


def two_outputs(tmp_path: Path) -> tuple[list[SafetensorsWriter], dict[str, torch.Tensor]]:
    ts = tensors()
    writers = [
        SafetensorsWriter(tmp_path / f"{n}.safetensors", entries(ts), META, overwrite=False) for n in "ab"
    ]
    for writer in writers:
        write_all(writer, ts)
    return writers, ts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_outputs_are_named_waits_until_all_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    writers, ts = two_outputs(tmp_path)
    publish = SafetensorsWriter.publish
    sent: list[Path] = []

    def publish_then_signal(self: SafetensorsWriter) -> None:
        publish(self)
        if not sent:  # between the first output's name and the second's
            sent.append(self.path)
            signal.raise_signal(sig)

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # as the command's SIGTERM handler does

    monkeypatch.setattr(SafetensorsWriter, "publish", publish_then_signal)
    with interrupts_raise():  # whatever the launcher of the test run ignored
        signal.signal(signal.SIGTERM, terminate)
        with pytest.raises(KeyboardInterrupt):
            commit_together(writers)
        assert signal.getsignal(signal.SIGTERM) is terminate  # handlers as they were
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sent == [tmp_path / "a.safetensors"]
    for writer in writers:  # the interrupt came only once both were named
        assert load_file(str(writer.path)).keys() == ts.keys()


def test_naming_held_signals_ignored_by_then_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers, _ = two_outputs(tmp_path)
    publish = SafetensorsWriter.publish

    def publish_then_signal(self: SafetensorsWriter) -> None:
        publish(self)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(SafetensorsWriter, "publish", publish_then_signal)
    with interrupts_raise():  # before_naming as the command's: Ctrl-C ignored from there on
        commit_together(writers, before_naming=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert all(writer.path.exists() for writer in writers)


def test_an_output_that_cannot_be_named_says_which_are_new(tmp_path: Path) -> None:
    writers, ts = two_outputs(tmp_path)
    third = SafetensorsWriter(tmp_path / "c.safetensors", entries(ts), META, overwrite=False)
    write_all(third, ts)
    (tmp_path / "b.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputError) as info:
        commit_together([*writers, third])
    assert str(info.value) == (
        f"{tmp_path / 'b.safetensors'}: appeared while this run was writing; nothing was replaced; "
        f"new: {tmp_path / 'a.safetensors'}; not written: {tmp_path / 'c.safetensors'}"
    )
    third.abort()
    assert (tmp_path / "b.safetensors").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# --- One writer per output --------------------------------------------------------------------------


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    first = OutputLock(out)
    lock_file = os.stat(tmp_path / OWN_LOCK.format("out.safetensors"))
    assert stat.S_IMODE(lock_file.st_mode) == 0o600 and lock_file.st_uid == os.geteuid()  # only ours
    with pytest.raises(OutputError, match=r"out\.safetensors: " + locked_by(os.getpid())):
        OutputLock(out)
    first.release()
    assert list(tmp_path.iterdir()) == []  # no lock file stays behind
    with OutputLock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_locks_on_different_outputs_do_not_conflict(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with (
        OutputLock(tmp_path / "a.safetensors"),
        OutputLock(tmp_path / "b" / "a.safetensors"),
        OutputLock(tmp_path / "b.safetensors"),
    ):
        pass


def test_two_spellings_of_one_output_share_its_lock(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with OutputLock(tmp_path / "real" / "out"), pytest.raises(OutputError, match=locked_by(os.getpid())):
        OutputLock(tmp_path / "alias" / ".." / "alias" / "out")


@pytest.mark.subprocess
def test_the_lock_of_a_killed_run_is_free_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    child = start_child(
        "import sys; from pathlib import Path; from ema_average.output import OutputLock\n"
        "lock = OutputLock(Path(sys.argv[1])); print('ready', flush=True); sys.stdin.read()",
        str(out),
    )
    try:
        with pytest.raises(OutputError, match=locked_by(child.pid)):
            OutputLock(out)
        with pytest.raises(OutputError, match=locked_by(child.pid)):
            SafetensorsWriter(out, [], None, overwrite=False)
    finally:
        kill_hard(child)
    with OutputLock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_writers_take_the_lock_unless_the_caller_holds_it(tmp_path: Path) -> None:
    out, listed = tmp_path / "o.safetensors", [TensorEntry("w", TensorSpec((1,), torch.float32))]
    first = SafetensorsWriter(out, listed, None, overwrite=False)
    with pytest.raises(OutputError, match=locked_by(os.getpid())):
        SafetensorsWriter(out, listed, None, overwrite=False)
    with pytest.raises(OutputError, match=locked_by(os.getpid())):
        OutputLock(out)
    first.abort()
    with OutputLock(out):  # the pipeline's pattern: the run holds the lock, its writer runs under it
        writer = SafetensorsWriter(out, listed, None, overwrite=False)
        writer.write("w", torch.ones(1))
        writer.commit()
        with pytest.raises(OutputError, match=locked_by(os.getpid())):
            OutputLock(out)  # still the caller's after the writer is done
    folder = tmp_path / "sharded"
    held = ShardedWriter(folder, listed, META, overwrite=False, max_shard_size=4)
    with pytest.raises(OutputError, match=locked_by(os.getpid())):
        OutputLock(folder)
    held.abort()
    OutputLock(folder).release()


def test_a_squatter_on_the_old_socket_name_blocks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what any local user could bind
    squatter.bind(b"\0ema-average/" + lock_module._lock_key(out).encode())
    try:
        with OutputLock(out):
            pass
    finally:
        squatter.close()


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["symlink", "fifo", "other user", "held file"])
def test_whatever_squats_the_lock_file_is_named_not_guessed(tmp_path: Path, kind: str) -> None:
    out, lock_file = tmp_path / "out.safetensors", tmp_path / OWN_LOCK.format("out.safetensors")
    victim = tmp_path / "victim"
    victim.write_bytes(b"data")
    if kind == "symlink":
        lock_file.symlink_to(victim)
        problem = "is a symbolic link, not a lock file; remove it"
    elif kind == "fifo":
        os.mkfifo(lock_file)
        problem = "is not a regular file; remove it"
    elif kind == "other user":
        if os.geteuid() != 0:
            pytest.skip("making a file another user owns needs root")
        lock_file.write_bytes(b"")
        os.chown(lock_file, 65534, 65534)
        problem = (
            f"belongs to user 65534, not to this one ({os.geteuid()}), though named for this user's runs; "
            "remove it (its owner or root can)"
        )
    else:  # a process of this user that flocks the file: named by its PID
        child = start_child(
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('ready', flush=True); sys.stdin.read()",
            str(lock_file),
        )
        try:
            with pytest.raises(
                OutputError, match=re.escape(f"{out}: locked by process {child.pid} (it holds")
            ):
                OutputLock(out)
        finally:
            kill_hard(child)
        with OutputLock(out):  # free once that process is gone
            pass
        assert not lock_file.exists()
        return
    with pytest.raises(OutputError) as info:
        OutputLock(out)
    assert str(info.value) == f"{out}: cannot take the output lock: {lock_file} {problem}"
    assert victim.read_bytes() == b"data" and os.path.lexists(lock_file)  # nothing touched


def test_an_earlier_lock_file_of_ours_is_taken_and_made_private(tmp_path: Path) -> None:
    lock_file = tmp_path / OWN_LOCK.format("out.safetensors")
    lock_file.write_bytes(b"")
    lock_file.chmod(0o644)  # as an earlier version made it: anyone could open it to flock it
    with OutputLock(tmp_path / "out.safetensors"):
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    assert not lock_file.exists()


# --- A folder of shards -----------------------------------------------------------------------------


def test_shards_and_index(tmp_path: Path) -> None:
    ts = layers(0.0)
    folder = tmp_path / "out"
    writer = sharded(folder, ts)
    assert not folder.exists()  # nothing at the target before commit
    writer.commit()
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in folder.iterdir()) == [*names, "model.safetensors.index.json"]
    assert writer.paths == [folder / n for n in [*names, "model.safetensors.index.json"]]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == names
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(str(folder / shard))[name], ts[name])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_one_shard_is_a_plain_file(tmp_path: Path) -> None:
    ts = {"w": torch.ones(4)}
    sharded(tmp_path / "out", ts, shard=10**9).commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], ts["w"])


def test_weights_name_and_side_files(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    writer = sharded(folder, layers(0.0), weights_name="adapter_model.safetensors")
    writer.add_file("adapter_config.json", b'{"r": 8}\n')
    for bad in ("../escape.json", ".hidden", "adapter_config.json", "extra.safetensors"):
        with pytest.raises(OutputError, match="cannot be a side file"):
            writer.add_file(bad, b"")
    writer.commit()
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        *[f"adapter_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)],
        "adapter_model.safetensors.index.json",
    ]
    assert folder / "adapter_config.json" in writer.paths
    # A later run replaces an output holding its declared side file, and only then.
    with pytest.raises(OutputError, match=r"is not an ema-average output \(it holds adapter_config\.json\)"):
        ShardedWriter(folder, entries(layers(1.0)), META, overwrite=True, max_shard_size=2048)
    again = sharded(folder, layers(1.0), overwrite=True, shard=10**9, side_files=["adapter_config.json"])
    again.add_file("adapter_config.json", b'{"r": 16}\n')
    again.commit()
    assert snapshot(folder).keys() == {"adapter_config.json", "model.safetensors"}
    assert (folder / "adapter_config.json").read_bytes() == b'{"r": 16}\n'


def test_replacing_an_existing_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    sharded(folder, layers(0.0)).commit()  # three shards and an index
    with pytest.raises(OutputError, match=r"out: already exists; pass --overwrite"):
        ShardedWriter(folder, entries(layers(1.0)), META, overwrite=False, max_shard_size=2048)
    writer = sharded(folder, layers(1.0), overwrite=True, shard=10**9)
    assert len(snapshot(folder)) == 4  # untouched until commit
    writer.commit()
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]  # no stale shard of the old
    assert torch.equal(
        load_file(str(folder / "model.safetensors"))["layer.4.weight"], torch.full((256,), 5.0)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _fail_the_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_src: Path, _dst: Path, _flags: int) -> bool:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fs_module, "_renameat2", broken)


def _fail_the_staging_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_the_second_fallback_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs_module, "_libc_renameat2", lambda: None)
    real, calls = os.rename, []

    def rename(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 2:  # old is aside, new not yet in
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize(
    "inject", [_fail_the_exchange, _fail_the_staging_fsync, _fail_the_second_fallback_rename]
)
def test_a_failed_commit_leaves_the_old_folder_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject: object
) -> None:
    folder = tmp_path / "out"
    sharded(folder, layers(0.0)).commit()
    before = snapshot(folder)
    writer = sharded(folder, layers(1.0), overwrite=True)
    inject(monkeypatch)  # type: ignore[operator]
    with pytest.raises(OutputError, match=r"out: cannot commit \(Input/output error\)"):
        writer.commit()
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder, nothing set aside


def test_without_renameat2_the_switch_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs_module, "_libc_renameat2", lambda: None)
    folder = tmp_path / "out"
    sharded(folder, layers(0.0)).commit()
    sharded(folder, layers(1.0), overwrite=True, shard=10**9).commit()
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _user_file(folder: Path) -> None:
    (folder / "notes.txt").write_text("mine")


def _unmarked_weights(folder: Path) -> None:
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))


def _subfolder(folder: Path) -> None:
    (folder / "runs").mkdir()


@pytest.mark.parametrize("content", [_user_file, _unmarked_weights, _subfolder])
def test_a_folder_that_is_not_an_output_is_refused_even_with_overwrite(
    tmp_path: Path, content: object
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    content(folder)  # type: ignore[operator]
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(OutputError, match=r"is not an ema-average output .*; remove it yourself"):
        sharded(folder, layers(0.0), overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_at_the_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"mine")
    with pytest.raises(OutputError, match=r"is not an ema-average output \(not a folder\)"):
        sharded(tmp_path / "out", layers(0.0), overwrite=True)
    assert (tmp_path / "out").read_bytes() == b"mine"


def test_a_file_added_to_the_old_output_during_the_run_stops_the_replacement(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    sharded(folder, layers(0.0)).commit()
    writer = sharded(folder, layers(1.0), overwrite=True)
    _user_file(folder)
    before = snapshot(folder)
    with pytest.raises(OutputError, match=r"is not an ema-average output \(it holds notes\.txt\)"):
        writer.commit()
    assert snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_folder_that_appears_during_the_run_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool
) -> None:
    if not renameat2:
        monkeypatch.setattr(fs_module, "_libc_renameat2", lambda: None)
    folder = tmp_path / "out"
    writer = sharded(folder, layers(0.0))
    folder.mkdir()
    _user_file(folder)
    with pytest.raises(OutputError, match=r"out: appeared while this run was writing; nothing was replaced"):
        writer.commit()
    assert snapshot(folder) == {"notes.txt": b"mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_shard_files_are_open_only_while_written(tmp_path: Path) -> None:
    ts = layers(0.0, count=40)  # 40 shards of one tensor
    before = len(os.listdir("/proc/self/fd"))
    writer = ShardedWriter(tmp_path / "out", entries(ts), META, overwrite=False, max_shard_size=1024)
    most = 0
    for name, t in ts.items():
        writer.write(name, t)
        most = max(most, len(os.listdir("/proc/self/fd")) - before)
    writer.commit()
    assert most <= 2  # the staging folder and the lock: each shard closed once its tensors are in
    assert_folder_holds(tmp_path / "out", ts, shards=40)


def test_writing_shards_in_pieces_reopens_them_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "pooled_limit", lambda: 4)  # the one pool's bound, read and write
    ts = layers(1.0, count=20)
    writer = ShardedWriter(tmp_path / "out", entries(ts), META, overwrite=False, max_shard_size=1024)
    before = len(os.listdir("/proc/self/fd"))
    most = 0
    for half in (0, 128):  # the first half of every tensor, then the second: every shard reopened
        for name, t in ts.items():
            writer.write_range(name, half, t[half : half + 128])
            most = max(most, len(os.listdir("/proc/self/fd")) - before)
    writer.commit()
    assert most <= 4
    assert_folder_holds(tmp_path / "out", ts, shards=20)


def test_reads_and_writes_share_one_pool_of_open_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints read with pread and shards written in pieces take descriptors from one pool with one
    bound: six inputs read and twenty shards reopened keep at most 4 open together."""
    monkeypatch.setattr(pool_module, "pooled_limit", lambda: 4)
    inputs = []
    for i in range(6):
        save_file({"w": torch.full((64,), float(i))}, str(tmp_path / f"in{i}.safetensors"))
        inputs.append(SafetensorsCheckpoint(tmp_path / f"in{i}.safetensors"))
    ts = layers(2.0, count=20)
    writer = ShardedWriter(tmp_path / "out", entries(ts), META, overwrite=False, max_shard_size=1024)
    before = len(os.listdir("/proc/self/fd"))
    most = 0
    for half in (0, 128):
        for i, (name, t) in enumerate(ts.items()):
            ckpt = inputs[i % len(inputs)]
            assert torch.equal(ckpt.read("w"), torch.full((64,), float(i % len(inputs))))
            writer.write_range(name, half, t[half : half + 128])
            most = max(most, len(os.listdir("/proc/self/fd")) - before)
    writer.commit()
    for ckpt in inputs:
        ckpt.close()
    assert most <= 4
    assert_folder_holds(tmp_path / "out", ts, shards=20)


def assert_folder_holds(folder: Path, ts: dict[str, torch.Tensor], *, shards: int) -> None:
    """Every tensor, read back with the safetensors library through the folder's index."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == shards
    for name, t in ts.items():
        assert torch.equal(load_file(str(folder / weight_map[name]))[name], t)


@pytest.mark.subprocess
def test_too_low_a_ulimit_n_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    code = (
        "import os, resource, sys, torch; from pathlib import Path\n"
        "from ema_average.output import ShardedWriter, TensorEntry, TensorSpec\n"
        "from ema_average.errors import OutputError\n"
        "limit = len(os.listdir('/proc/self/fd')) + 8\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
        "listed = [TensorEntry(f't{i}', TensorSpec((256,), torch.float32)) for i in range(4)]\n"
        "try:\n"
        "    ShardedWriter(Path(sys.argv[1]), listed, None, overwrite=False, max_shard_size=1024)\n"
        "except OutputError as exc:\n"
        "    print(limit, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    limit, message = result.stdout.strip().split(" ", 1)
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path / 'out'))}: too few open files allowed \(ulimit -n {limit}, \d+ in use\): "
        r"writing a folder output needs \d+; raise ulimit -n",
        message,
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
def test_a_killed_fresh_run_leaves_no_output_folder(tmp_path: Path) -> None:
    child = start_child(
        "import sys, torch; from pathlib import Path\n"
        "from ema_average.output import ShardedWriter, TensorEntry, TensorSpec\n"
        "listed = [TensorEntry(f't{i}', TensorSpec((256,), torch.float32)) for i in range(4)]\n"
        "w = ShardedWriter(Path(sys.argv[1]), listed, None, overwrite=False, max_shard_size=2048)\n"
        "w.write('t0', torch.zeros(256)); w.add_file('config.json', b'{}')\n"
        "print('ready', flush=True); sys.stdin.read()",
        str(tmp_path / "out"),
    )
    staging = tmp_path / f".out.ema-average-{child.pid}.tmp"
    lock_file = tmp_path / OWN_LOCK.format("out")
    assert remove_stale_temporaries(tmp_path) == []  # a live run's staging folder and lock are kept
    kill_hard(child)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, lock_file.name]
    assert remove_stale_temporaries(tmp_path) == [staging, lock_file]
    assert list(tmp_path.iterdir()) == []


def test_stale_named_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".out.safetensors.ema-average-999999999.tmp"
    alive = tmp_path / f".out.safetensors.ema-average-{os.getpid()}.tmp"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists()


def test_stale_staging_folders_are_removed_only_when_ours_and_unused(tmp_path: Path) -> None:
    dead = tmp_path / ".out.ema-average-999999999.tmp"
    in_use = tmp_path / ".busy.ema-average-999999998.tmp"  # a live run in another PID namespace
    other = tmp_path / ".out.ema-average-999999999.old"
    for folder in (dead, in_use, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    with _flocked(in_use):
        assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([in_use.name, other.name])


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _no_leaked_locks() -> Iterator[None]:
    yield
    assert lock_module._held == {}, "a test left an output lock held"
