"""torch files: where the state dict sits, where the step comes from, tied weights, laziness."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import TorchCheckpoint, find_run
from ema_average.checkpoints.base import StepInfo
from ema_average.checkpoints.contents import torch_objects as torch_contents
from ema_average.checkpoints.reading.safe_unpickle import zip_members
from ema_average.errors import CheckpointError
from helpers import (
    assert_matches_reference,
    bounded_python_work,
    float64_reference,
    make_state,
    rss_growth,
    write_fairseq_run,
    write_torch_run,
)


def assert_same_tensors(ckpt: TorchCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    assert ckpt.tensor_names() == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_bare_state_dict(tmp_path: Path) -> None:
    torch.save(make_state(1), tmp_path / "a.pth")
    ckpt = TorchCheckpoint(tmp_path / "a.pth")
    assert_same_tensors(ckpt, make_state(1))
    assert ckpt.state_dict_key is None
    assert ckpt.metadata_step() is None
    assert ckpt.lazy


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict", "ema"])
def test_state_dict_under_a_known_key(tmp_path: Path, key: str) -> None:
    torch.save({key: make_state(2), "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "a.pt")
    ckpt = TorchCheckpoint(tmp_path / "a.pt")
    assert ckpt.state_dict_key == key
    assert_same_tensors(ckpt, make_state(2))


def test_state_dict_key_chooses(tmp_path: Path) -> None:
    torch.save({"model": make_state(1), "ema": make_state(2)}, tmp_path / "a.pt")
    assert_same_tensors(TorchCheckpoint(tmp_path / "a.pt"), make_state(1))
    assert_same_tensors(TorchCheckpoint(tmp_path / "a.pt", state_dict_key="ema"), make_state(2))
    with pytest.raises(CheckpointError, match=r"a\.pt: has no state dict under --state-dict-key 'nope'"):
        TorchCheckpoint(tmp_path / "a.pt", state_dict_key="nope")


def test_no_state_dict_found(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: no state dict found.*--state-dict-key"):
        TorchCheckpoint(tmp_path / "a.pt")


@pytest.mark.parametrize("key", ["global_step", "step", "num_updates", "iteration"])
def test_step_keys(tmp_path: Path, key: str) -> None:
    torch.save({"model": make_state(1), key: 1234}, tmp_path / "a.pt")
    info = TorchCheckpoint(tmp_path / "a.pt").metadata_step()
    assert info is not None and (info.step, info.origin) == (1234, f"metadata:{key}")


def test_step_as_a_tensor(tmp_path: Path) -> None:
    torch.save({"model": make_state(1), "step": torch.tensor(77)}, tmp_path / "a.pt")
    info = TorchCheckpoint(tmp_path / "a.pt").metadata_step()
    assert info is not None and info.step == 77


def test_tied_weights_are_reported(tmp_path: Path) -> None:
    embed = torch.randn(10, 4)
    torch.save({"embed.weight": embed, "lm_head.weight": embed, "other": torch.zeros(3)}, tmp_path / "t.pt")
    ckpt = TorchCheckpoint(tmp_path / "t.pt")
    assert ckpt.aliases() == {"lm_head.weight": "embed.weight"}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_one_storage_named_thousands_of_times_is_refused(tmp_path: Path, zipped: bool) -> None:
    # 64 KiB of storage named 600 times (aliases and overlapping slices): 38 MB of tensors to average and
    # write from a file of 70 KB. Refused at opening, the figures named; nothing is read.
    base = torch.randn(1 << 14)
    state = {**{f"w{i}": base for i in range(300)}, **{f"v{i}": base[i:] for i in range(300)}}
    torch.save(state, tmp_path / "many.pt", _use_new_zipfile_serialization=zipped)
    named = 300 * base.nbytes + sum(base[i:].nbytes for i in range(300))
    with pytest.raises(CheckpointError) as refused:
        TorchCheckpoint(tmp_path / "many.pt")
    assert str(refused.value) == (
        f"{tmp_path / 'many.pt'}: names {named} bytes of tensors over only {base.nbytes} bytes of storage "
        "(one storage viewed under many names); more than 64 times over is refused: the output would be as large"
    )


def test_a_block_shared_by_every_layer_is_read(tmp_path: Path) -> None:
    # nn.ModuleList([block] * 24): the state dict names the block's tensors 24 times, all tied.
    block = torch.nn.Linear(8, 8)
    model = torch.nn.ModuleList([block] * 24)
    torch.save(model.state_dict(), tmp_path / "shared.pt")
    ckpt = TorchCheckpoint(tmp_path / "shared.pt")
    assert len(ckpt.specs()) == 48
    assert ckpt.aliases() == {f"{i}.{p}": f"0.{p}" for i in range(1, 24) for p in ("weight", "bias")}
    assert torch.equal(ckpt.read("23.weight"), block.weight.detach())


def test_legacy_format_is_read_but_not_lazily(tmp_path: Path) -> None:
    torch.save({"model": make_state(4), "step": 4}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ckpt = TorchCheckpoint(tmp_path / "old.pt")
    assert not ckpt.lazy
    assert any("not lazily" in note for note in ckpt.notes)
    assert_same_tensors(ckpt, make_state(4))


def test_not_a_torch_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: is damaged or not a torch file"):
        TorchCheckpoint(tmp_path / "junk.pt")


def test_opening_reads_no_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"model": {"big": torch.ones(64 * 2**20), "small": torch.arange(4.0)}, "step": 1}, path)
    opened: list[TorchCheckpoint] = []
    grown = rss_growth(lambda: opened.append(TorchCheckpoint(path)) or opened[0].read("small"))
    assert opened[0].read("small").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB opening a 256 MiB file"


def test_lightning_checkpoints(lightning_run: Path) -> None:
    run = find_run(lightning_run)
    assert [c.step for c in run.checkpoints] == [4, 8, 12]
    assert {c.layout for c in run.checkpoints} == {"lightning"}
    assert {c.step_origin for c in run.checkpoints} == {"metadata:global_step"}
    for ckpt in run.checkpoints:
        saved = torch.load(ckpt.path, weights_only=True)
        assert saved["global_step"] == ckpt.step
        assert_same_tensors(ckpt, saved["state_dict"])  # type: ignore[arg-type]
        assert "net.1.num_batches_tracked" in ckpt.tensor_names()


def test_fairseq_run_counts_last_and_best_once(tmp_path: Path) -> None:
    states = write_fairseq_run(tmp_path, [100, 200, 300])
    run = find_run(tmp_path)
    assert [c.path.name for c in run.checkpoints] == [
        "checkpoint_1_100.pt",
        "checkpoint_1_200.pt",
        "checkpoint_1_300.pt",
    ]
    assert {c.step_origin for c in run.checkpoints} == {"metadata:optimizer_history[-1].num_updates"}
    assert len(run.notices) == 2
    assert all("same step (300) and weights as" in n for n in run.notices)
    assert_same_tensors(run.checkpoints[-1], states[300])  # type: ignore[arg-type]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Opened in a thread: were the FIFO opened for reading, the test opens its other end to release it
    # and fails, instead of hanging (no SIGALRM: signals are the test runner's).
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            TorchCheckpoint(fifo)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail("opening the FIFO blocked")
    assert isinstance(outcome[0], CheckpointError) and "ckpt.pt: is not a regular file" in str(outcome[0])


def claim_longer_member(path: Path, member_suffix: str, extra: int) -> None:
    """Make the central directory claim ``extra`` more bytes for a member than the file holds."""
    with zipfile.ZipFile(path) as archive:
        target = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    raw = bytearray(path.read_bytes())
    name = target.filename.encode()
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46 : entry + 46 + len(name)] != name:  # the member's central directory header
        entry = raw.find(b"PK\x01\x02", entry + 4)
        assert entry >= 0
    size = target.compress_size + extra
    raw[entry + 20 : entry + 28] = struct.pack("<II", size, size)  # compressed, uncompressed size
    path.write_bytes(bytes(raw))


def test_a_zip_member_past_the_end_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.arange(256.0)}, path)
    claim_longer_member(path, "data/0", 1 << 20)
    with pytest.raises(CheckpointError, match=r"cut\.pt: is truncated: zip member '.*data/0' extends past"):
        TorchCheckpoint(path)


def test_a_cut_zip_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save({"w": torch.arange(4096.0)}, path)
    path.write_bytes(path.read_bytes()[:9000])
    with pytest.raises(CheckpointError, match=r"half\.pt: is damaged or not a torch file"):
        TorchCheckpoint(path)


def test_a_self_referencing_state_dict_is_refused(tmp_path: Path) -> None:
    state: dict = {"w": torch.zeros(2)}
    state["self"] = state
    torch.save({"model": state}, tmp_path / "loop.pt")
    with pytest.raises(
        CheckpointError, match=r"loop\.pt: holds the same dict at 'model' and at 'model\.self'"
    ):
        TorchCheckpoint(tmp_path / "loop.pt")


def test_a_dag_of_shared_dicts_is_refused_quickly(tmp_path: Path) -> None:
    level: dict = {"w": torch.zeros(1)}
    for _ in range(40):  # 2**40 paths through 40 dicts
        level = {"a": level, "b": level}
    path = tmp_path / "dag.pt"
    torch.save({"model": {"w": torch.zeros(1), "tree": level}}, path)
    assert path.stat().st_size < 8000
    with (
        bounded_python_work(200_000),  # a walk of the 2**40 paths would fail this at once
        pytest.raises(
            CheckpointError,
            match=r"dag\.pt: holds the same dict at 'model\.tree(\.a)+' and at 'model\.tree(\.a)*\.b'",
        ),
    ):
        TorchCheckpoint(path)


def test_nesting_is_bounded(tmp_path: Path) -> None:
    level: dict = {"w": torch.zeros(1)}
    for _ in range(torch_contents.MAX_DEPTH + 1):
        level = {"x": level}
    torch.save({"model": {"w": torch.zeros(1), "tree": level}}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match=r"deep\.pt: nests dicts more than 100 deep"):
        TorchCheckpoint(tmp_path / "deep.pt")


def test_names_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_contents, "MAX_NAMES", 4)
    torch.save(make_state(1), tmp_path / "many.pt")  # five tensors
    with pytest.raises(CheckpointError, match=r"many\.pt: has more than 4 tensors"):
        TorchCheckpoint(tmp_path / "many.pt")


def test_two_tensors_under_one_name_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}}, tmp_path / "dup.pt")
    with pytest.raises(CheckpointError, match=r"dup\.pt: has two tensors named 'model\.a\.b'"):
        TorchCheckpoint(tmp_path / "dup.pt")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: torch.ones(2, dtype=torch.complex64), "is complex64 (complex)"),
        (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), "is quantized"),
        (lambda: torch.empty(3, device="meta"), "is a meta tensor"),
        (lambda: torch.eye(3).to_sparse(), "is not a dense tensor"),
        (
            lambda: torch.ones(2).to(torch.float8_e4m3fnuz),
            "is float8_e4m3fnuz, which safetensors cannot store",
        ),
    ],
    ids=["complex", "quantized", "meta", "sparse", "float8-fnuz"],
)
def test_tensors_the_tool_cannot_handle_are_refused_at_open(tmp_path: Path, make, problem: str) -> None:  # type: ignore[no-untyped-def]
    torch.save({"model": {"fine": torch.zeros(2), "bad": make()}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=rf"odd\.pt: tensor 'bad' {re.escape(problem)}"):
        TorchCheckpoint(tmp_path / "odd.pt")


@pytest.mark.parametrize(
    ("state", "shown"),
    [({"w": torch.zeros(1), 0: torch.ones(1)}, "0"), ({"\ud800": torch.zeros(1)}, "'\\\\ud800'")],
    ids=["int-key", "lone-surrogate"],
)
def test_tensor_names_must_be_utf8_strings(tmp_path: Path, state: dict, shown: str) -> None:
    torch.save(state, tmp_path / "names.pt")
    with pytest.raises(CheckpointError, match=rf"names\.pt: has a tensor name {shown} that is not"):
        TorchCheckpoint(tmp_path / "names.pt")


@pytest.mark.parametrize("n", [1000, 10**12])
def test_an_expanded_view_is_refused(tmp_path: Path, n: int) -> None:
    torch.save({"w": torch.zeros(1).expand(n), "b": torch.zeros(2)}, tmp_path / "wide.pt")
    assert (tmp_path / "wide.pt").stat().st_size < 4000
    with pytest.raises(CheckpointError, match=r"wide\.pt: tensor 'w' has .* materialised at full size"):
        TorchCheckpoint(tmp_path / "wide.pt")


def test_views_within_their_storage_load(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "every_other": base.reshape(-1)[::2]}
    torch.save(state, tmp_path / "views.pt")
    assert_same_tensors(TorchCheckpoint(tmp_path / "views.pt"), state)


@pytest.mark.parametrize(
    "value",
    [torch.tensor(1 + 2j), torch.tensor(True), torch.tensor(-5), -5, 10**400, "final", "²"],
    ids=["complex", "bool-tensor", "negative-tensor", "negative", "huge", "word", "superscript"],
)
def test_a_bad_step_is_one_clear_error(tmp_path: Path, value: object) -> None:
    torch.save({"model": make_state(1), "global_step": value}, tmp_path / "a.pt")
    with pytest.raises(
        CheckpointError, match=r"a\.pt: has step .*\(metadata:global_step\), not a whole number"
    ):
        TorchCheckpoint(tmp_path / "a.pt")


def test_a_bad_fairseq_step_is_one_clear_error(tmp_path: Path) -> None:
    history = [{"num_updates": torch.tensor(-3)}]
    torch.save({"model": make_state(1), "optimizer_history": history}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=r"has step .*optimizer_history\[-1\]\.num_updates"):
        TorchCheckpoint(tmp_path / "f.pt")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1200", 1200),
        (torch.tensor([7], dtype=torch.int32), 7),
        (None, None),
        (True, None),
        (2.5, None),
        ([3], None),
    ],
    ids=["string", "int32-tensor", "none", "flag", "float", "list"],
)
def test_step_values_that_are_or_are_not_steps(tmp_path: Path, value: object, expected: int | None) -> None:
    torch.save({"model": make_state(1), "step": value}, tmp_path / "a.pt")
    info = TorchCheckpoint(tmp_path / "a.pt").metadata_step()
    assert (info.step if info else None) == expected


def run_child(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter with default signal dispositions: a SIGBUS there (a read of a
    mapping past the end of its file) fails the test instead of killing pytest."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


CUT_WHILE_READ = """
import os, sys
from pathlib import Path
import torch
from ema_average.checkpoints import TorchCheckpoint
from ema_average.errors import CheckpointError
path = Path(sys.argv[1])
torch.save({"model": {"small": torch.arange(4.0), "big": torch.ones(1 << 20)}, "step": 1}, path)
ckpt = TorchCheckpoint(path)
assert ckpt.read("small").tolist() == [0.0, 1.0, 2.0, 3.0]  # the file is open, its pages mapped or not
os.truncate(path, path.stat().st_size // 2)  # a trainer rewriting the file under us
try:
    ckpt.read_into("big", torch.empty(1 << 20))
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.subprocess
def test_a_file_cut_short_while_it_is_read_is_an_error_not_a_sigbus(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    child = run_child(CUT_WHILE_READ, path)
    assert child.returncode == 0, f"exit {child.returncode} (-7 is SIGBUS): {child.stderr[-2000:]}"
    assert re.fullmatch(
        rf"{re.escape(str(path))}: file ends inside tensor 'big' \(truncated\? .*\)\n", child.stdout
    )


CUT_BETWEEN_PLAN_AND_PASS = """
import os, sys
from pathlib import Path
from ema_average.errors import CheckpointError
from ema_average.offline.run import execute, prepare
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings
run, out = Path(sys.argv[1]), Path(sys.argv[2])
prepared = prepare(RunOptions(run, out, settings=AverageSettings(decay=0.9), threads=1))
cut = run / "ckpt_30.pt"
os.truncate(cut, cut.stat().st_size - 600)  # inside the last tensor's data
try:
    execute(prepared)
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.subprocess
def test_a_run_whose_checkpoint_is_cut_after_planning_fails_cleanly(tmp_path: Path) -> None:
    write_torch_run(tmp_path / "run", [10, 20, 30])
    out = tmp_path / "ema.safetensors"
    child = run_child(CUT_BETWEEN_PLAN_AND_PASS, tmp_path / "run", out)
    assert child.returncode == 0, f"exit {child.returncode} (-7 is SIGBUS): {child.stderr[-2000:]}"
    cut = re.escape(str(tmp_path / "run" / "ckpt_30.pt"))
    assert re.fullmatch(
        rf"{cut}: (file ends inside tensor '.*'|was modified since it was planned) .*\n", child.stdout
    )
    assert not out.exists()


def test_reads_match_torch_load_and_the_float64_average(tmp_path: Path) -> None:
    states = write_torch_run(tmp_path / "run", [10, 20, 30])
    run = find_run(tmp_path / "run")
    for ckpt in run.checkpoints:
        assert ckpt.lazy and not ckpt.notes
        assert_same_tensors(ckpt, torch.load(ckpt.path, weights_only=True)["model"])  # type: ignore[arg-type]
    expected = float64_reference([states[s] for s in (10, 20, 30)], [10, 20, 30], 0.9)
    shadow = {n: run.checkpoints[0].read(n).double() for n in expected}
    for ckpt in run.checkpoints[1:]:
        d = min(0.9, (1 + ckpt.step) / (10 + ckpt.step))  # type: ignore[operator]
        buffers = {n: torch.empty(s.shape, dtype=s.dtype) for n, s in ckpt.specs().items() if n in expected}
        shadow = {n: d * v + (1 - d) * ckpt.read_into(n, buffers[n]).double() for n, v in shadow.items()}
    for name, tensor in expected.items():
        torch.testing.assert_close(shadow[name], tensor, rtol=0, atol=0)


def test_range_reads_of_views_that_are_not_contiguous(tmp_path: Path) -> None:
    base = torch.arange(60.0).reshape(6, 10)
    state = {
        "t": base.t(),
        "cols": base[:, 2:7],
        "every_other": base.reshape(-1)[3::2],
        "cube": torch.arange(120.0).reshape(4, 5, 6).permute(2, 0, 1)[1:],
        "broadcast": torch.arange(6.0)[:3].expand(2, 3),  # stride 0, within its storage
    }
    torch.save(state, tmp_path / "views.pt")
    ckpt = TorchCheckpoint(tmp_path / "views.pt")
    for name, tensor in state.items():
        flat = tensor.reshape(-1)
        assert torch.equal(ckpt.read_into(name, torch.empty(tensor.shape)), tensor), name
        for start in range(flat.numel()):
            for count in (1, 3, 7, flat.numel() - start):
                count = min(count, flat.numel() - start)
                got = ckpt.read_range_into(name, start, torch.empty(count))
                assert torch.equal(got, flat[start : start + count]), (name, start, count)


def test_big_endian_files_are_swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a big-endian machine (s390x) saves: the archive says "big" and every value's bytes are swapped."""
    state = {
        "w": torch.randn(5, 3),
        "h": torch.randn(7).half(),
        "d": torch.randn(2).double(),
        "i": torch.arange(4),
    }
    path = tmp_path / "big.pt"
    with monkeypatch.context() as patch:
        patch.setattr(sys, "byteorder", "big")
        torch.save(state, path)
    raw = bytearray(path.read_bytes())
    members = {m.name.rsplit("/", 1)[-1]: m for m in zip_members(path, len(raw)) if "/data/" in m.name}
    for key, tensor in enumerate(state.values()):  # storages are keyed in order of first appearance
        m = members[str(key)]
        width = tensor.element_size()
        values = raw[m.data_offset : m.data_offset + m.size]
        for at in range(0, m.size, width):
            values[at : at + width] = values[at : at + width][::-1]
        raw[m.data_offset : m.data_offset + m.size] = values
    path.write_bytes(bytes(raw))
    loaded = torch.load(path, weights_only=True)  # torch's own reading: the file is what we meant
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert_same_tensors(TorchCheckpoint(path), state)


def test_a_zip_repacked_by_another_tool_is_still_read(tmp_path: Path) -> None:
    """torch computes where storages start as its own writer lays them out; a zip rewritten by another
    tool (no padding) breaks that: such a file is read through a mapping, as torch reads it, and said so."""
    state = dict(make_state(5))
    saved, repacked = tmp_path / "saved.pt", tmp_path / "repacked.pt"
    torch.save(state, saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    ckpt = TorchCheckpoint(repacked)
    assert any("read through a mapping" in note for note in ckpt.notes), ckpt.notes
    assert_same_tensors(ckpt, state)


def adam_state(names: list[str]) -> dict:
    """torch.optim.AdamW.state_dict() of a model with these parameters: keyed by parameter index."""
    model = {n: torch.nn.Parameter(t) for n, t in make_state(1).items() if n in names}
    optimizer = torch.optim.AdamW(model.values(), lr=0.1)
    for p in model.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


def test_a_trainer_save_reads_the_model_and_names_the_rest(tmp_path: Path) -> None:
    # The shape mmengine's Runner, ignite's Checkpoint and litgpt save: the model beside optimizer state
    # (keyed by parameter index), a scheduler's state and trainer counters; no key names the model.
    state = make_state(7)
    floats = [n for n, t in state.items() if t.is_floating_point()]
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), 1)
    torch.save(
        {
            "net_g": state,
            "opt": adam_state(floats),
            "sched": scheduler.state_dict(),
            "meta": {"iter": 40, "epoch": 2},
            "train_state": {"rng": torch.zeros(3)},
        },
        tmp_path / "iter_40.pth",
    )
    ckpt = TorchCheckpoint(tmp_path / "iter_40.pth")
    assert ckpt.state_dict_key == "net_g" and sorted(ckpt.specs()) == sorted(state)
    assert all(torch.equal(ckpt.read(n), state[n]) for n in state)
    # parts that hold tensors are named (the scheduler and counters hold none)
    assert (
        ckpt.choices[0].describe()
        == "read net_g; not averaged: optimizer state (opt), trainer state (train_state)"
    )


def test_mmengine_ema_hook_save_reads_the_raw_weights(tmp_path: Path) -> None:
    # mmengine's EMAHook.before_save_checkpoint swaps: state_dict holds the EMA, ema_state_dict the raw
    # weights as module.* beside its AveragedModel's steps counter (mmengine/hooks/ema_hook.py,
    # mmengine/model/averaged_model.py; reproduced here, mmengine is not installed).
    raw, ema = make_state(1), make_state(2)
    torch.save(
        {
            "meta": {"epoch": 1, "iter": 12},
            "state_dict": ema,
            "ema_state_dict": {"steps": torch.tensor(12), **{f"module.{n}": t for n, t in raw.items()}},
            "message_hub": {"log_scalars": {}, "runtime_info": {"iter": 12}},
            "optimizer": adam_state(["encoder.weight"]),
        },
        tmp_path / "iter_12.pth",
    )
    ckpt = TorchCheckpoint(tmp_path / "iter_12.pth")
    assert ckpt.state_dict_key == "ema_state_dict" and sorted(ckpt.specs()) == sorted(raw)
    assert all(torch.equal(ckpt.read(n), raw[n]) for n in raw)
    assert ckpt.other_models == {
        "state_dict": "the average; --state-dict-key state_dict"
    }  # says it is the EMA
    averaged = TorchCheckpoint(tmp_path / "iter_12.pth", state_dict_key="state_dict")
    assert all(torch.equal(averaged.read(n), ema[n]) for n in ema)


def test_optimizer_moments_saved_beside_the_weights_are_left_out(tmp_path: Path) -> None:
    state = make_state(3)
    moments = {f"{n}.exp_avg": torch.ones_like(t) for n, t in state.items() if t.is_floating_point()}
    torch.save({"model": {**state, **moments}, "epoch": 1}, tmp_path / "m.pt")
    ckpt = TorchCheckpoint(tmp_path / "m.pt")
    assert sorted(ckpt.specs()) == sorted(state)
    assert ckpt.choices[0].describe() == "read model; not averaged: optimizer state (model)"


def test_submodel_picks_a_torch_files_state_dict_by_key(tmp_path: Path) -> None:
    raw, ema = make_state(4), make_state(5)
    for step in (10, 20):
        torch.save({"state_dict": raw, "ema": ema, "global_step": step}, tmp_path / f"s{step}.ckpt")
    run = find_run(tmp_path, submodel="ema")
    assert [c.state_dict_key for c in run.checkpoints] == ["ema", "ema"]
    assert all(torch.equal(run.checkpoints[0].read(n), ema[n]) for n in ema)


def test_an_average_asked_for_by_name_is_not_said_to_stand_alone(tmp_path: Path) -> None:
    torch.save({"state_dict": make_state(1), "ema": make_state(2)}, tmp_path / "a.ckpt")
    assert TorchCheckpoint(tmp_path / "a.ckpt", state_dict_key="ema").choices[0].describe() == (
        "read ema (an average); also here: state_dict (--state-dict-key state_dict)"
    )
    torch.save({"ema": make_state(2), "epoch": 1}, tmp_path / "b.pt")
    assert TorchCheckpoint(tmp_path / "b.pt").choices[0].describe() == (
        "read ema (an average: no raw weights found beside it)"
    )


def test_litgpt_step_count_is_the_step(tmp_path: Path) -> None:
    """Reproduced from litgpt's ``finetune/full.py`` (docs/trainer-layouts.md, section 9): every
    ``save_interval`` optimizer steps, ``fabric.save(out_dir/step-{step_count:06d}/lit_model.pth, {model,
    optimizer, scheduler, iter_num, step_count})`` beside ``model_config.yaml``; with 4 micro-batches a step
    ``iter_num`` is 4 x ``step_count``. The step is ``step_count`` from inside the file, not the micro-batches."""
    states = []
    for step in (4, 8, 12):
        folder = tmp_path / "out" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        state = dict(make_state(step))
        states.append(state)
        saved = {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1, 2, 3, 4]}]},
            "scheduler": {"_schedulers": [{"last_epoch": step}], "_milestones": [2], "last_epoch": step},
            "iter_num": 4 * step,
            "step_count": step,
        }
        torch.save(saved, folder / "lit_model.pth")
        (folder / "model_config.yaml").write_text("n_layer: 1\nn_embd: 16\n")
    run = find_run(tmp_path / "out")
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        (f"step-{s:06d}", s, "metadata:step_count") for s in (4, 8, 12)
    ]
    assert_matches_reference(run.checkpoints, states)  # float64, at the hand-computed steps 4, 8, 12


@pytest.mark.parametrize(
    ("saved", "shown"),
    [
        ({"trainer": {"iteration": -5, "epoch_length": 5}}, "-5 (metadata:trainer.iteration)"),
        ({"meta": {"iter": 2**70, "epoch": 1}}, "1180591620717411303424 (metadata:meta.iter)"),
        ({"meta": {"iter": torch.tensor(1.5 + 2j)}}, "(metadata:meta.iter)"),
    ],
    ids=["negative ignite iteration", "huge mmengine iter", "complex tensor"],
)
def test_a_bad_nested_step_counter_is_one_clear_error(
    tmp_path: Path, saved: dict[str, object], shown: str
) -> None:
    """A step counter in a trainer-state container is checked like a top-level one: one line naming the
    file and where the step was, never used (it was ignored, and the name's number taken)."""
    torch.save({**saved, "state_dict": make_state(1)}, tmp_path / "epoch_3.pth")
    with pytest.raises(CheckpointError, match=re.escape("epoch_3.pth: has step ")) as info:
        TorchCheckpoint(tmp_path / "epoch_3.pth")
    assert shown in str(info.value)
    nested_list = {"meta": [1, 2], "trainer": None, "state_dict": make_state(1), "epoch": 2}
    torch.save(nested_list, tmp_path / "odd.pth")
    assert TorchCheckpoint(tmp_path / "odd.pth").metadata_step() == StepInfo(
        2, "metadata:epoch", counter=True
    )
