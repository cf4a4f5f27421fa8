"""Finding a run: order, step sources, what is skipped, and every bad input named clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ema_average.checkpoints import discover, find_run
from ema_average.errors import CheckpointError, CheckpointMismatchError, NoCheckpointsError
from helpers import make_state, write_safetensors_run, write_torch_run


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
    """Discovery knows layouts only through layouts.LAYOUTS: one entry adds a kind of file, its open and
    its line in the "looked for" message."""
    from ema_average.checkpoints import layouts
    from ema_average.checkpoints.base import Layout
    from ema_average.checkpoints.safetensors_file import SafetensorsCheckpoint

    npz = Layout(
        "npz",
        "file",
        "files ending .npz",
        lambda p: p.suffix == ".npz",
        lambda p, o: SafetensorsCheckpoint(p),
    )
    monkeypatch.setattr(layouts, "LAYOUTS", (*layouts.LAYOUTS, npz))
    with pytest.raises(NoCheckpointsError, match=r"looked for .*; files ending \.npz; DCP folders"):
        discover(tmp_path)
    write_safetensors_run(tmp_path, [1, 2])
    for p in tmp_path.glob("*.safetensors"):
        p.rename(p.with_suffix(".npz"))
    assert [c.step for c in discover(tmp_path)] == [1, 2]
