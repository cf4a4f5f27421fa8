"""Finding a run: order, step sources, what is skipped, and every bad input named clearly."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli
from ema_average.checkpoints import discover, find_run
from ema_average.errors import CheckpointError, CheckpointMismatchError, NoCheckpointsError
from helpers import (
    assert_matches_reference,
    float64_reference,
    make_state,
    write_safetensors_run,
    write_torch_run,
)


def test_ordered_by_step_not_by_name(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path, [1000, 200, 30])
    assert [c.step for c in discover(tmp_path)] == [30, 200, 1000]


def test_metadata_step_wins_over_name_unless_asked(tmp_path: Path) -> None:
    save_file(dict(make_state(1)), str(tmp_path / "step_5.safetensors"), metadata={"step": "50"})
    save_file(dict(make_state(2)), str(tmp_path / "step_6.safetensors"), metadata={"step": "60"})
    assert [(c.step, c.step_origin) for c in discover(tmp_path)] == [
        (50, "metadata:step"),
        (60, "metadata:step"),
    ]
    by_name = discover(tmp_path, steps_from="filename")
    assert [(c.step, c.step_origin) for c in by_name] == [(5, "filename:step=N"), (6, "filename:step=N")]


def test_name_is_the_fallback(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path, [7, 3], metadata_key=None)
    assert [(c.step, c.step_origin) for c in discover(tmp_path)] == [
        (3, "filename:step=N"),
        (7, "filename:step=N"),
    ]


def test_steps_from_metadata_requires_it(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path, [7], metadata_key=None)
    with pytest.raises(
        CheckpointError, match=r"model_step_7\.safetensors: no training step found in its contents"
    ):
        discover(tmp_path, steps_from="metadata")


def test_no_step_anywhere(tmp_path: Path) -> None:
    torch.save(make_state(1), tmp_path / "final.pt")
    with pytest.raises(
        CheckpointError, match=r"final\.pt: no training step found in its contents or its name"
    ):
        discover(tmp_path)


def test_torch_run_with_trainer_files_beside(tmp_path: Path) -> None:
    write_torch_run(tmp_path, [10, 20])
    torch.save({"state": {}}, tmp_path / "optimizer.pt")
    torch.save({"x": 1}, tmp_path / "rng_state_0.pth")
    assert [c.path.name for c in discover(tmp_path)] == ["ckpt_10.pt", "ckpt_20.pt"]


def test_own_outputs_are_never_inputs(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path, [1, 2])
    save_file(
        dict(make_state(9)), str(tmp_path / "ema_step_9.safetensors"), metadata={"ema_average_version": "0"}
    )
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [1, 2]
    assert run.notices == [f"skipped {tmp_path / 'ema_step_9.safetensors'}: written by ema-average itself"]


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        NoCheckpointsError, match=r"no checkpoints found; looked for files ending \.safetensors"
    ):
        discover(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NoCheckpointsError, match=r"nope: does not exist"):
        discover(tmp_path / "nope")


def test_checkpoints_in_several_folders(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "version_0", [1])
    write_safetensors_run(tmp_path / "version_1", [1])
    with pytest.raises(CheckpointError, match="holds checkpoints in 2 folders"):
        discover(tmp_path)


def test_run_in_a_subfolder_is_found(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "lightning_logs" / "version_0" / "checkpoints", [1, 2])
    assert [c.step for c in discover(tmp_path)] == [1, 2]


# A second checkpoint unlike the first: how its state differs from make_state(2), and the message naming it.
MISMATCHES = {
    "missing tensor": (
        lambda state: state.pop("head.weight"),
        r"model_step_2\.safetensors: has no tensor 'head\.weight'",
    ),
    "extra tensor": (
        lambda state: state.update(extra=torch.zeros(1)),
        r"model_step_2\.safetensors: has tensor 'extra', absent",
    ),
    "shape": (
        lambda state: state.update({"encoder.bias": torch.zeros(17)}),
        r"'encoder\.bias' is float32\[17\], but float32\[16\]",
    ),
    "dtype": (
        lambda state: state.update({"head.weight": state["head.weight"].half()}),
        r"'head\.weight' is float16\[4, 16\], but float32",
    ),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_tensor_mismatch_is_named(tmp_path: Path, mismatch: str) -> None:
    change, message = MISMATCHES[mismatch]
    write_safetensors_run(tmp_path, [1])
    state = make_state(2)
    change(state)
    save_file(dict(state), str(tmp_path / "model_step_2.safetensors"), metadata={"step": "2"})
    with pytest.raises(CheckpointMismatchError, match=message):
        discover(tmp_path)


def test_same_step_different_weights_names_both(tmp_path: Path) -> None:
    save_file(dict(make_state(1)), str(tmp_path / "a.safetensors"), metadata={"step": "5"})
    save_file(dict(make_state(2)), str(tmp_path / "b.safetensors"), metadata={"step": "5"})
    with pytest.raises(
        CheckpointMismatchError, match=r"b\.safetensors: has step 5, as does .*a\.safetensors"
    ):
        discover(tmp_path)


def test_inputs_are_not_modified(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path, [1, 2])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    for ckpt in discover(tmp_path):
        for name in ckpt.tensor_names():
            ckpt.read(name)
        ckpt.close()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_hidden_folders_are_never_searched_or_opened(tmp_path: Path) -> None:
    # A DCP-looking folder under .cache/ is neither a unit nor searched: its .metadata is never unpickled.
    write_safetensors_run(tmp_path / "run", [1, 2])
    hidden = tmp_path / "run" / ".cache" / "save"
    hidden.mkdir(parents=True)
    (hidden / ".metadata").write_bytes(b"not even a pickle")
    (hidden / "__0_0.distcp").write_bytes(b"")
    assert [c.step for c in find_run(tmp_path / "run").checkpoints] == [1, 2]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    write_safetensors_run(tmp_path / "run", [1, 2])
    odd = tmp_path / "run" / "model_step_3.safetensors"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"model_step_3\.safetensors: is not a regular file"):
        find_run(tmp_path / "run")


def test_a_layout_is_one_registered_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery knows layouts only through the registry: one registration adds a kind of file, its open
    and its line in the "looked for" message."""
    from ema_average.checkpoints import registry
    from ema_average.checkpoints.base import Layout
    from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint

    npz = Layout(
        "npz",
        "file",
        "files ending .npz",
        lambda p: p.suffix == ".npz",
        lambda p, o: SafetensorsCheckpoint(p),
    )
    monkeypatch.setattr(registry, "_registered", [])  # the registration ends with the test
    monkeypatch.setattr(registry, "_cache", None)
    registry.register(npz)
    with pytest.raises(NoCheckpointsError, match=r"looked for .*; files ending \.npz; DCP folders"):
        discover(tmp_path)
    write_safetensors_run(tmp_path, [1, 2])
    for p in tmp_path.glob("*.safetensors"):
        p.rename(p.with_suffix(".npz"))
    assert [c.step for c in discover(tmp_path)] == [1, 2]


# Deep folders, empty tensors, impossible shapes, the tool's own folder outputs ------------------------


def deep_folder(top: Path, levels: int, name: str) -> Path:
    """``top/name/name/...`` ``levels`` deep, made level by level relative to the last (so that a path
    longer than the system allows can be made at all); returns the deepest folder."""
    here = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=here)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
            os.close(here)
            here = inner
        os.close(os.open("notes.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here))
    finally:
        os.close(here)
    return top.joinpath(*[name] * levels)


def remove_deep(top: Path) -> None:
    """Remove what ``top`` holds, however deep, with a loop: pytest's cleanup (shutil.rmtree) recurses
    and would fail on these trees, in this session or a later one."""
    stack = [(os.open(top, os.O_RDONLY | os.O_DIRECTORY), "")]
    while stack:
        fd = stack[-1][0]
        folder = next((e.name for e in os.scandir(fd) if e.is_dir(follow_symlinks=False)), None)
        if folder is not None:
            stack.append((os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), folder))
            continue
        for entry in os.scandir(fd):
            os.unlink(entry.name, dir_fd=fd)
        _, name = stack.pop()
        os.close(fd)
        if stack:
            os.rmdir(name, dir_fd=stack[-1][0])


DeepFolder = Callable[[Path, int, str], Path]


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[DeepFolder]:
    """:func:`deep_folder`, every tree it made removed afterwards (see :func:`remove_deep`)."""
    yield deep_folder
    remove_deep(tmp_path)


def test_a_deep_unrelated_folder_does_not_stop_the_run(tmp_path: Path, deep: DeepFolder) -> None:
    """os.walk recursed (RecursionError at ~1,000 levels before Python 3.12); the walk is a loop."""
    write_safetensors_run(tmp_path, [1, 2])
    deep(tmp_path, 1200, "d")
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [1, 2]
    assert run.notices == []


@pytest.mark.slow
def test_a_weight_file_deep_down_is_still_found(tmp_path: Path, deep: DeepFolder) -> None:
    deepest = deep(tmp_path, 1100, "d")
    write_safetensors_run(deepest, [3, 4])
    assert [(c.path.parent, c.step) for c in find_run(tmp_path).checkpoints] == [(deepest, 3), (deepest, 4)]


def test_a_folder_too_deep_to_list_is_skipped_with_a_notice(tmp_path: Path, deep: DeepFolder) -> None:
    write_safetensors_run(tmp_path, [1, 2])
    deep(tmp_path, 300, "d" * 20)  # 6,300 characters of path: beyond PATH_MAX, cannot be listed
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [1, 2]
    assert len(run.notices) == 1
    assert re.fullmatch(
        rf"skipped {re.escape(str(tmp_path))}/d{{20}}/.*\.\.\..*/d{{20}}: cannot be listed \(File name too long\)",
        run.notices[0],
    )
    assert len(run.notices[0]) < 300


def test_files_under_lists_what_rglob_lists_at_any_depth(tmp_path: Path, deep: DeepFolder) -> None:
    """--watch snapshots a folder unit's files; Path.rglob recursed (RecursionError at ~1,000 levels)."""
    from ema_average.checkpoints.discovery.discover import files_under

    write_safetensors_run(tmp_path / "checkpoint-1", [1])
    (tmp_path / "checkpoint-1" / ".hidden").write_text("x")
    (tmp_path / "checkpoint-1" / "linked").symlink_to(tmp_path / "checkpoint-1")  # never followed
    shallow = sorted(p for p in (tmp_path / "checkpoint-1").rglob("*") if p.is_file())
    assert files_under(tmp_path / "checkpoint-1") == shallow
    deepest = deep(tmp_path / "checkpoint-1", 1200, "d")
    assert files_under(tmp_path / "checkpoint-1") == sorted([*shallow, deepest / "notes.txt"])


def test_a_lone_empty_tensor_is_averaged_and_written(tmp_path: Path) -> None:
    """A model may hold an empty buffer (its weights are all there): it is copied with its shape and dtype,
    the rest averaged as without it."""
    steps = [10, 20, 40]
    states = []
    for step in steps:
        state = dict(make_state(step))
        state["lora.unused"] = torch.empty(0, 8)
        state["index.empty"] = torch.empty(0, dtype=torch.int64)
        save_file(state, str(tmp_path / f"step_{step}.safetensors"))
        states.append(state)
    sharded = tmp_path.parent / f"{tmp_path.name}-sharded"
    for output, extra in ((tmp_path.parent / "ema.safetensors", []), (sharded, ["--max-shard-size", "600B"])):
        result = run_cli(tmp_path, "-o", output, "--decay", "0.9", *extra)
        assert result.returncode == 0, result.stderr
        files = [output] if output.is_file() else sorted(output.glob("*.safetensors"))
        out = {name: t for f in files for name, t in load_file(str(f)).items()}
        assert out["lora.unused"].shape == (0, 8) and out["lora.unused"].dtype == torch.float32
        assert out["index.empty"].shape == (0,) and out["index.empty"].dtype == torch.int64
        expected = float64_reference(states, steps, 0.9)
        assert set(out) == set(states[0])
        for name, tensor in expected.items():
            torch.testing.assert_close(out[name].double(), tensor, rtol=2e-6, atol=2e-7)


def test_placeholders_where_weights_live_elsewhere_are_refused(tmp_path: Path) -> None:
    """ZeRO-3 and FSDP save shape-(0,) placeholders for the parameters (buffers may stay whole)."""
    for step in (1, 2):
        state = {
            name: torch.empty(0) if name.endswith("weight") or name.endswith("bias") else t
            for name, t in make_state(step).items()
        }  # norm.* are buffers, which ZeRO-3 keeps whole
        save_file(state, str(tmp_path / f"step_{step}.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"step_1\.safetensors: tensor 'encoder\.bias' has no elements: a placeholder .* 3 of its 4 "
        r"floating tensors are empty; refused",
    ):
        find_run(tmp_path)


def file_digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("name", "shards"),
    [("ema_step250", []), ("ema_step300", ["--max-shard-size", "600B"])],
    ids=["one file, a step of the run", "sharded, a new step"],
)
@pytest.mark.subprocess
def test_a_folder_output_inside_the_run_is_never_an_input(
    tmp_path: Path, shards: list[str], name: str
) -> None:
    """A folder output in the run folder is the tool's own (its weights and index carry the marker): the
    next run skips it as it skips a marked file. Named for a step of the run (250) it was blamed on that
    checkpoint; named for a new step (300) it was averaged in silently."""
    write_safetensors_run(tmp_path, [100, 200, 250])
    output = tmp_path / name
    first = run_cli(tmp_path, "-o", f"{output}/", *shards)
    assert first.returncode == 0, first.stderr
    written = file_digests(output)
    assert len(written) == (3 if shards else 1)  # two shards and an index, or model.safetensors
    again = run_cli(tmp_path, "-o", f"{output}/", "--overwrite", *shards)
    assert again.returncode == 0, again.stderr
    assert f"note: skipped {output}: written by ema-average itself" in again.stdout
    rows = [line for line in again.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[2].strip() for row in rows] == [
        "model_step_100.safetensors",
        "model_step_200.safetensors",
        "model_step_250.safetensors",
    ]
    assert file_digests(output) == written


# Counts taken for steps (issue 17, item 4) ----------------------------------------------------------------


def write_ignite_run(folder: Path, epochs: int = 3, epoch_length: int = 5) -> list[dict[str, torch.Tensor]]:
    """Reproduced from ignite's source (docs/trainer-layouts.md, section 6): ``Checkpoint(to_save,
    DiskSaver(folder), global_step_transform=global_step_from_engine(trainer))`` on EPOCH_COMPLETED names
    the file ``checkpoint_{epoch}.pt`` (epochs completed, from 1) and saves ``{k: obj.state_dict()}``:
    ``trainer`` is ``Engine.state_dict()`` = OrderedDict(epoch_length, iteration, max_epochs), no epoch."""
    folder.mkdir(parents=True)
    states = []
    for epoch in range(1, epochs + 1):
        state = dict(make_state(epoch))
        states.append(state)
        trainer = OrderedDict(epoch_length=epoch_length, iteration=epoch * epoch_length, max_epochs=epochs)
        saved = {
            "trainer": trainer,
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3, 4]}]},
            "lr_scheduler": {"last_epoch": epoch * epoch_length, "base_lrs": [0.1], "_step_count": 1},
        }
        torch.save(saved, folder / f"checkpoint_{epoch}.pt")
    return states


@pytest.mark.subprocess
def test_ignite_epoch_named_files_are_read_at_their_iteration(tmp_path: Path) -> None:
    """ignite's ``checkpoint_3.pt`` holds ``trainer.iteration`` 15: the counter inside wins over the
    epoch in the name (steps 1, 2, 3 were used, unflagged), and the command averages at steps 5, 10, 15."""
    states = write_ignite_run(tmp_path / "run")
    run = find_run(tmp_path / "run")
    assert [(c.path.name, c.step, c.step_origin, c.step_is_counter) for c in run.checkpoints] == [
        (f"checkpoint_{e}.pt", 5 * e, "metadata:trainer.iteration", False) for e in (1, 2, 3)
    ]
    output = tmp_path / "ema.safetensors"
    result = run_cli(tmp_path / "run", "-o", output, "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    expected = float64_reference(states, [5, 10, 15], 0.9)  # hand-computed steps: iteration = 5 x epoch
    out = load_file(str(output))
    for name, tensor in expected.items():
        torch.testing.assert_close(out[name].double(), tensor, rtol=1e-6, atol=1e-7)


def write_mmengine_run(
    folder: Path, epochs: int = 3, iters_per_epoch: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Reproduced from mmengine's source (docs/trainer-layouts.md, section 4): CheckpointHook by epoch writes
    ``epoch_{E}.pth`` (E = epochs completed, from 1) via ``Runner.save_checkpoint``: ``meta`` {epoch: E,
    iter: iterations completed, cfg, seed, ...}, ``state_dict``, ``message_hub``, ``optimizer``,
    ``param_schedulers``. (``message_hub`` is kept to plain dicts here: its HistoryBuffer objects are
    item 2's matter, not the step's.)"""
    folder.mkdir(parents=True)
    states = []
    for epoch in range(1, epochs + 1):
        state = dict(make_state(10 + epoch))
        states.append(state)
        iters = epoch * iters_per_epoch
        saved = {
            "meta": {
                "epoch": epoch,
                "iter": iters,
                "cfg": "model = dict(type='Toy')\n",
                "seed": 0,
                "experiment_name": "toy_20260101_000000",
                "time": "20260101_000000",
                "mmengine_version": "0.10.7",
            },
            "state_dict": OrderedDict(state),
            "message_hub": {
                "log_scalars": OrderedDict(),
                "runtime_info": OrderedDict(epoch=epoch, iter=iters, max_epochs=epochs),
                "resumed_keys": {"epoch": True, "iter": True},
            },
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1, 2, 3, 4]}]},
            "param_schedulers": [{"param_name": "lr", "base_values": [0.01], "last_step": iters}],
        }
        torch.save(saved, folder / f"epoch_{epoch}.pth")
    return states


def test_mmengine_epoch_files_are_read_at_their_iteration(tmp_path: Path) -> None:
    """mmengine's ``epoch_3.pth`` holds ``meta.iter`` 12: the step is the iteration, not a flagged epoch
    count (the name's 1, 2, 3 were used before)."""
    states = write_mmengine_run(tmp_path / "work_dir")
    run = find_run(tmp_path / "work_dir")
    assert [(c.path.name, c.step, c.step_origin, c.step_is_counter) for c in run.checkpoints] == [
        (f"epoch_{e}.pth", 4 * e, "metadata:meta.iter", False) for e in (1, 2, 3)
    ]
    assert not any("count saves or epochs" in n for n in run.notices)
    assert_matches_reference(run.checkpoints, states)


def write_open_clip_run(folder: Path, epochs: int = 3) -> list[dict[str, torch.Tensor]]:
    """Reproduced from open_clip v3.3.0's ``open_clip_train/main.py`` (docs/trainer-layouts.md, section 7):
    after each epoch ``completed_epoch = epoch + 1``; ``torch.save({"epoch": completed_epoch, "name":
    args.name, "state_dict": original_model.state_dict(), "optimizer": optimizer.state_dict()},
    checkpoints/epoch_{completed_epoch}.pt)`` (single process: no ``module.`` prefix)."""
    folder.mkdir(parents=True)
    states = []
    for completed_epoch in range(1, epochs + 1):
        state = dict(make_state(20 + completed_epoch))
        states.append(state)
        saved = {
            "epoch": completed_epoch,
            "name": "2026_01_01-00_00_00-model_RN50-lr_0.0005-b_8-j_1-p_amp",
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1, 2, 3, 4]}]},
        }
        torch.save(saved, folder / f"epoch_{completed_epoch}.pt")
    return states


@pytest.mark.subprocess
def test_open_clip_epochs_count_from_1(tmp_path: Path) -> None:
    """open_clip's ``epoch_E.pt`` holds ``epoch`` = epochs completed (first file epoch_1): a count, flagged,
    that ``--step-every N`` makes E x N (it made (E + 1) x N, one epoch late), and the plan says so."""
    states = write_open_clip_run(tmp_path / "checkpoints")
    run = find_run(tmp_path / "checkpoints")
    origin = "metadata:epoch (epochs completed, from 1)"
    assert [(c.step, c.step_origin, c.step_is_counter) for c in run.checkpoints] == [
        (e, origin, True) for e in (1, 2, 3)
    ]
    assert any("(step = count x N, the first save counted 1)" in n for n in run.notices)
    run = find_run(tmp_path / "checkpoints", step_every=100)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (100 * e, f"{origin}, counted from 1: n x 100") for e in (1, 2, 3)
    ]
    assert_matches_reference(run.checkpoints, states)
    result = run_cli(tmp_path / "checkpoints", "--step-every", "100", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "counted from 1: n x 100" in result.stdout


def test_zero_based_counts_still_add_one(tmp_path: Path) -> None:
    """A count from 0 (torch's ``for epoch in range(n)`` saving ``epoch``, as timm and ultralytics do) is
    the epoch just done: ``--step-every 10`` makes 0, 1 the steps 10, 20, and the origin says how."""
    folder = tmp_path / "run"
    folder.mkdir()
    for epoch in range(2):
        torch.save({"epoch": epoch, "state_dict": make_state(epoch)}, folder / f"ckpt-{epoch}.pt")
    run = find_run(folder)
    assert any("(step = (count + 1) x N, the first save counted 0)" in n for n in run.notices)
    run = find_run(folder, step_every=10)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (10, "metadata:epoch, counted from 0: (n+1) x 10"),
        (20, "metadata:epoch, counted from 0: (n+1) x 10"),
    ]


def test_torchtnt_fit_folders_are_read_at_their_training_step(tmp_path: Path) -> None:
    """Reproduced from torchtnt's ``DistributedCheckpointSaver`` (docs/trainer-layouts.md, section 2): the
    ``fit`` entry point names its DCP folders ``epoch_{E}_train_step_{N}_eval_step_{M}`` (N: training steps,
    M: evaluation steps) and saves ``{"app_state": {module, optimizer, train_progress}}``. The step is N:
    from ``train_progress`` inside (a counter in the save wins over its name), and from the name too when
    asked (the name's last number, M, was once taken)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    states = []
    for epoch, train, evaluated in ((1, 4, 2), (2, 8, 4)):
        state = dict(make_state(train))
        states.append(state)
        app_state = {
            "module": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3, 4]}]},
            "train_progress": {"num_epochs_completed": epoch, "num_steps_completed": train},
        }
        folder = tmp_path / "run" / f"epoch_{epoch}_train_step_{train}_eval_step_{evaluated}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"app_state": app_state}, checkpoint_id=str(folder))
    run = find_run(tmp_path / "run")
    inside = "metadata:app_state.train_progress.num_steps_completed"
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [(4, inside), (8, inside)]
    assert_matches_reference(run.checkpoints, states)
    by_name = find_run(tmp_path / "run", steps_from="filename")
    assert [(c.step, c.step_origin) for c in by_name.checkpoints] == [
        (4, "filename:train_step_N"),
        (8, "filename:train_step_N"),
    ]


# Selection before comparison (issue 17, item 1) --------------------------------------------------------


@pytest.mark.subprocess
def test_checkpoints_differing_only_in_excluded_tensors_make_one_run(tmp_path: Path) -> None:
    """``--exclude`` applies before checkpoints are compared: a tensor only step_2 has (an optimizer's, a
    model-only save beside full ones) is no mismatch once excluded; the output is the float64 average of the
    selected tensors."""
    run = tmp_path / "r"
    run.mkdir()
    states = [make_state(1), make_state(2)]
    save_file(dict(states[0]), str(run / "step_1.safetensors"))
    save_file({**states[1], "extra.w": torch.ones(3)}, str(run / "step_2.safetensors"))
    refused = run_cli(run, "--dry-run")
    assert refused.returncode == 1
    assert "step_2.safetensors: has tensor 'extra.w', absent from step_1.safetensors" in refused.stderr
    output = tmp_path / "ema.safetensors"
    result = run_cli(run, "--exclude", "extra.*", "-o", output, "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    out = load_file(str(output))
    assert set(out) == set(states[0])
    for name, tensor in float64_reference(states, [1, 2], 0.9).items():
        torch.testing.assert_close(out[name].double(), tensor, rtol=2e-6, atol=2e-7)


def test_include_selects_before_comparison_too(tmp_path: Path) -> None:
    """With ``--include``, a tensor outside it may differ in shape between checkpoints."""
    for step in (1, 2):
        state = {**make_state(step), "head.weight": torch.zeros(step, 16)}
        save_file(state, str(tmp_path / f"step_{step}.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"'head\.weight' is float32\[2, 16\]"):
        find_run(tmp_path)
    run = find_run(tmp_path, keeps=lambda name: name.startswith(("encoder.", "norm.")))
    assert [c.step for c in run.checkpoints] == [1, 2]


def test_copies_are_judged_on_the_selected_tensors(tmp_path: Path) -> None:
    """Two saves of one step whose selected tensors are equal are one checkpoint (a notice), even when an
    excluded tensor differs; without the selection they are a conflict naming both."""
    state = make_state(1)
    save_file({**state, "extra.w": torch.zeros(2)}, str(tmp_path / "step_5.safetensors"))
    save_file({**state, "extra.w": torch.ones(2)}, str(tmp_path / "last.safetensors"), metadata={"step": "5"})
    with pytest.raises(CheckpointMismatchError, match=r"has step 5, as does .* but different weights"):
        find_run(tmp_path)
    run = find_run(tmp_path, keeps=lambda name: not name.startswith("extra."))
    assert [c.path.name for c in run.checkpoints] == ["step_5.safetensors"]
    assert any("last.safetensors: same step (5) and weights as" in n for n in run.notices)


# Folder layouts are registry entries too (issue 20) -----------------------------------------------------


def test_a_folder_layout_is_one_module_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/tiny_folder_layout.py, registered with ``registry.register``: discovery finds its folders inside
    step folders (raw before ``ema``), reads each step from the trainer's side file around them
    (``progress.json``, 100 x the folder's number), names the other model, and lists the final model's
    weights by the layout's own names, all through the layout's hooks."""
    import tiny_folder_layout
    from ema_average.checkpoints import registry

    monkeypatch.setattr(registry, "_registered", [])  # the registration ends with the test
    monkeypatch.setattr(registry, "_cache", None)
    run = tmp_path / "run"
    states = []
    for n in (1, 2, 3):
        step = run / f"step-{n}"
        for model, seed in (("raw", n), ("ema", 10 + n)):
            (step / model).mkdir(parents=True)
            save_file(dict(make_state(seed)), str(step / model / "params.safetensors"))
        (step / "progress.json").write_text(f'{{"updates": {100 * n}}}')
        states.append(make_state(n))
    save_file(dict(make_state(9)), str(run / "params.safetensors"))  # the final model, in the run folder
    with pytest.raises(CheckpointError, match="holds checkpoints in 7 folders"):
        find_run(run)  # before it is registered, each params.safetensors is a loose file of its own

    registry.register(tiny_folder_layout.LAYOUT)

    found = find_run(run)
    assert [(c.path.name, c.step, c.step_origin, c.layout) for c in found.checkpoints] == [
        (f"step-{n}", 100 * n, "progress.json:updates", "params-folder") for n in (1, 2, 3)
    ]
    assert f"skipped {run} (params.safetensors): a final model saved beside the checkpoints" in found.notices
    assert "in each checkpoint: read raw; also here: ema (--submodel ema)" in found.notices
    assert_matches_reference(found.checkpoints, states)
    ema = find_run(run, submodel="ema")
    assert_matches_reference(ema.checkpoints, [make_state(10 + n) for n in (1, 2, 3)])
    assert "params folders (params.safetensors)" in registry.looked_for()


# Trainer-state files are not checkpoints (issue 17, items 1 and 5) -------------------------------------


def write_olmo_core_run(run: Path, steps: tuple[int, ...] = (2, 4, 6), ranks: int = 2) -> list[dict]:
    """Reproduced from olmo-core 3.0.0's ``Checkpointer.save`` (``olmo_core/train/checkpoint.py``, not
    installed): ``step{N}/`` holds ``model_and_optim/`` (DCP of the train module's ``state_dict_to_save()``:
    ``{"model": get_model_state_dict, "optim": get_optimizer_state_dict}``), ``train/rank{R}.pt`` (each
    rank's ``torch.save`` of ``Trainer.state_dict()``: step, data-loader position, RNG states, callbacks)
    and ``.metadata.json``. Returns the model's weights at each save."""
    import json
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    saved, done = [], 0
    for step in steps:
        for _ in range(step - done):
            optim.zero_grad()
            model(torch.randn(5, 8)).pow(2).mean().backward()
            optim.step()
        done = step
        folder = run / f"step{step}"
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(folder / "model_and_optim"))
        (folder / "train").mkdir()
        for rank in range(ranks):
            trainer_state = {
                "global_step": step,
                "global_train_tokens_seen": 512 * step,
                "max_steps": steps[-1],
                "data_loader": {
                    "batches_processed": step,
                    "tokens_processed": 512 * step,
                    "seed": 0,
                    "epoch": 1,
                },
                "epoch": 1,
                "world_size": ranks,
                "rng": {"torch": {"version": [2, 13], "state": torch.get_rng_state()}},
                "callbacks": {},
            }
            torch.save(trainer_state, folder / "train" / f"rank{rank}.pt")
        (folder / ".metadata.json").write_text(json.dumps({"version": "3.0.0"}))
        saved.append({name: t.detach().clone() for name, t in model.state_dict().items()})
    return saved


@pytest.mark.subprocess
def test_olmo_core_rank_files_are_trainer_state_not_checkpoints(tmp_path: Path) -> None:
    """``train/rank0.pt`` and ``train/rank1.pt`` (which hold a tensor: the RNG state) are neither taken as
    checkpoints nor make the run "checkpoints in 2 folders": each ``stepN/`` is one checkpoint, its model
    the DCP folder's ``model`` part, averaged exactly."""
    run = tmp_path / "run"
    states = write_olmo_core_run(run)
    found = find_run(run)
    assert [(c.path.name, c.step) for c in found.checkpoints] == [("step2", 2), ("step4", 4), ("step6", 6)]
    assert [unit.name for unit in found.units] == ["step2", "step4", "step6"]
    assert_matches_reference(found.checkpoints, states)
    result = run_cli(run, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "rank0.pt" not in result.stdout + result.stderr


def write_litgpt_pretrain_run(out: Path, steps: tuple[int, ...] = (4, 8, 12)) -> list[dict]:
    """Reproduced from litgpt 0.5.13's ``pretrain.py`` (not installed: it would change huggingface_hub):
    ``save_checkpoint`` writes ``fabric.save(out/step-{step_count:08d}/lit_model.pth, {model, optimizer,
    train_dataloader, iter_num, step_count})`` (Fabric saves each object's state dict) beside
    ``hyperparameters.yaml``, the tokenizer files and ``model_config.yaml``; at the end the same under
    ``final/``. 4 micro-batches per optimizer step: ``iter_num`` = 4 x ``step_count``."""
    states = []
    for folder, step in [*((f"step-{s:08d}", s) for s in steps), ("final", steps[-1])]:
        state = dict(make_state(step))
        (out / folder).mkdir(parents=True)
        torch.save(
            {
                "model": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0, 1, 2, 3, 4]}]},
                "train_dataloader": {"epoch": 0, "num_samples_yielded": 32 * step},
                "iter_num": 4 * step,
                "step_count": step,
            },
            out / folder / "lit_model.pth",
        )
        for side in ("model_config.yaml", "hyperparameters.yaml", "tokenizer.json", "tokenizer_config.json"):
            (out / folder / side).write_text("n_layer: 1\n")
        if folder != "final":
            states.append(state)
    return states


@pytest.mark.subprocess
def test_litgpt_final_folder_is_skipped_with_a_notice(tmp_path: Path) -> None:
    """litgpt's ``final/`` beside its ``step-0000000N/`` folders is the final model (README: skipped with a
    notice), not a second folder of checkpoints; steps are ``step_count`` from inside each file."""
    out = tmp_path / "out"
    states = write_litgpt_pretrain_run(out)
    found = find_run(out)
    assert [(c.path.name, c.step, c.step_origin) for c in found.checkpoints] == [
        (f"step-{s:08d}", s, "metadata:step_count") for s in (4, 8, 12)
    ]
    assert f"skipped final/ in {out}: a final model saved beside the checkpoints" in found.notices
    assert_matches_reference(found.checkpoints, states)
    output = tmp_path / "ema.safetensors"
    result = run_cli(out, "-o", output, "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    assert "skipped final/" in result.stdout + result.stderr
    written = load_file(str(output))
    for name, tensor in float64_reference(states, [4, 8, 12], 0.9).items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7)


def write_litgpt_lora_run(out: Path, steps: tuple[int, ...] = (2, 4, 6)) -> list[dict]:
    """Reproduced from litgpt 0.5.13's ``finetune/lora.py``: every ``save_interval`` optimizer steps
    ``save_lora_checkpoint`` writes ``torch.save({"model": <the lora_ parameters>},
    out/step-{step_count:06d}/lit_model.pth.lora)`` beside the copied config and tokenizer files,
    ``hyperparameters.yaml`` and ``prompt_style.yaml``; at the end ``final/lit_model.pth.lora`` and
    ``merge_lora``'s merged ``final/lit_model.pth``. No step is saved inside: it is the folder's name."""
    states = []
    g = torch.Generator().manual_seed(0)
    for folder in [*(f"step-{s:06d}" for s in steps), "final"]:
        lora = {
            f"transformer.h.0.attn.qkv.lora_{ab}": torch.randn(shape, generator=g)
            for ab, shape in (("A", (4, 16)), ("B", (48, 4)))
        }
        (out / folder).mkdir(parents=True)
        torch.save({"model": lora}, out / folder / "lit_model.pth.lora")
        for side in ("model_config.yaml", "hyperparameters.yaml", "prompt_style.yaml", "tokenizer.json"):
            (out / folder / side).write_text("n_layer: 1\n")
        if folder == "final":
            torch.save(
                {"transformer.h.0.attn.qkv.weight": torch.randn(48, 16)}, out / folder / "lit_model.pth"
            )
        else:
            states.append(lora)
    return states


@pytest.mark.subprocess
def test_litgpt_lora_adapters_are_the_checkpoints_and_named_in_the_plan(tmp_path: Path) -> None:
    """``lit_model.pth.lora`` (a torch file under litgpt's own suffix, safe-loaded) is what each step folder
    holds: read as the checkpoints, the plan naming them as litgpt LoRA adapters; ``final/`` (adapter and
    merged model) skipped with a notice."""
    out = tmp_path / "out"
    states = write_litgpt_lora_run(out)
    found = find_run(out)
    assert [(c.path.name, c.step, c.step_origin) for c in found.checkpoints] == [
        (f"step-{s:06d}", s, "filename:step=N") for s in (2, 4, 6)
    ]
    assert f"skipped final/ in {out}: a final model saved beside the checkpoints" in found.notices
    assert_matches_reference(found.checkpoints, states)
    result = run_cli(out, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "litgpt LoRA adapter" in result.stdout
    output = tmp_path / "ema.safetensors"
    assert run_cli(out, "-o", output, "--decay", "0.9").returncode == 0
    written = load_file(str(output))
    assert set(written) == set(states[0])
    for name, tensor in float64_reference(states, [2, 4, 6], 0.9).items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7)


def test_keras_files_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt-3.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04")
    with pytest.raises(
        NoCheckpointsError, match=r"holds Keras weights \(ckpt-3\.weights\.h5 \.\.\.\), which are not read"
    ):
        find_run(tmp_path)


def test_submodel_naming_a_module_of_the_model_read_says_where_it_is(tmp_path: Path) -> None:
    # sentence-transformers keeps its modules as 2_Dense/... in the model read: --submodel 2_Dense finds
    # no separate model, and the message says where its tensors are and the flag that picks them.
    for step in (1, 2):
        state = {
            "embeddings.weight": torch.full((4, 2), float(step)),
            "2_Dense/linear.weight": torch.ones(2, 2) * step,
        }
        save_file(state, str(tmp_path / f"step_{step}.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        find_run(tmp_path, submodel="2_Dense")
    assert "its tensors are part of the model read, in the output as 2_Dense/... (1 tensors)" in str(
        caught.value
    )
    assert "--include '2_Dense/*'" in str(caught.value)
    from ema_average.offline.plan import TensorSelection

    keeps = TensorSelection(include=("2_Dense/*",)).keeps
    assert [
        sorted(n for n in c.specs() if keeps(n)) for c in find_run(tmp_path, keeps=keeps).checkpoints
    ] == [["2_Dense/linear.weight"]] * 2
