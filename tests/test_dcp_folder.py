"""torch.distributed.checkpoint folders, read without a process group."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_helpers import run_cli
from dcp_helpers import olmo_core_look_alike, rewrite_metadata, save_dcp
from ema_average.checkpoints import DcpCheckpoint, find_run
from ema_average.checkpoints.base import StepInfo
from ema_average.checkpoints.safetensors_format import DTYPE_NAMES
from ema_average.errors import CheckpointError, UnsafeCheckpointError
from helpers import WritesMarker, make_state

dcp = pytest.importorskip("torch.distributed.checkpoint")


def test_model_and_optimizer_with_step_tensor(tmp_path: Path) -> None:
    for step in (100, 200):
        state = {
            "model": dict(make_state(step)),
            "optimizer": {"lr": torch.tensor(0.1)},
            "step": torch.tensor(step),
        }
        save_dcp(tmp_path / f"save_{step}", state)
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin, c.layout) for c in run.checkpoints] == [
        (100, "metadata:step", "dcp"),
        (200, "metadata:step", "dcp"),
    ]
    ckpt = run.checkpoints[1]
    assert ckpt.tensor_names() == list(make_state(200))  # the model's part, under its own names
    for name, tensor in make_state(200).items():
        assert torch.equal(ckpt.read(name), tensor)


def test_bare_state_with_step_in_folder_name(tmp_path: Path) -> None:
    for step in (3, 1):
        save_dcp(tmp_path / f"step_{step}", dict(make_state(step)))
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (1, "filename:step=N"),
        (3, "filename:step=N"),
    ]
    assert torch.equal(run.checkpoints[0].read("encoder.weight"), make_state(1)["encoder.weight"])


class Harmless:
    def __init__(self) -> None:
        self.value = 3


def each_storage_entry(change: Callable[[Any], None]) -> Callable[[Any], None]:
    return lambda metadata: [change(info) for info in metadata.storage_data.values()]  # type: ignore[func-returns-value]


def test_a_metadata_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "step_1"
    save_dcp(folder, dict(make_state(1)))
    rewrite_metadata(folder, lambda m: setattr(m, "planner_data", {"x": WritesMarker(marker)}))
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"\.metadata: needs arbitrary unpickling \(posix\.system\).*--trust-pickle",
    ):
        find_run(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        DcpCheckpoint(folder)
    assert not marker.exists()


def test_trust_pickle_reads_other_globals_with_a_warning(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))
    rewrite_metadata(tmp_path, lambda m: setattr(m, "planner_data", {"x": Harmless()}))
    with pytest.raises(UnsafeCheckpointError, match=r"Harmless.*--trust-pickle"):
        DcpCheckpoint(tmp_path)
    with pytest.warns(UserWarning, match="full unpickling"):
        ckpt = DcpCheckpoint(tmp_path, trust_pickle=True)
    assert torch.equal(ckpt.read("head.weight"), make_state(1)["head.weight"])


def test_damaged_metadata_is_not_called_unsafe(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"\.metadata: is damaged or not DCP metadata") as caught:
        DcpCheckpoint(tmp_path)
    assert not isinstance(caught.value, UnsafeCheckpointError)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def trained_model_and_optimizer() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": torch.tensor(12)}


def every_dtype() -> dict[str, torch.Tensor]:
    return {str(d): torch.arange(6).reshape(2, 3).to(d) for d in DTYPE_NAMES}


@pytest.mark.parametrize(
    "make", [trained_model_and_optimizer, every_dtype], ids=["model+optimizer", "dtypes"]
)
def test_real_saves_pass_the_allow_list(tmp_path: Path, make: Callable[[], dict[str, Any]]) -> None:
    state = make()
    save_dcp(tmp_path, state)
    ckpt = DcpCheckpoint(tmp_path)
    expected = state.get("model", state)
    assert ckpt.tensor_names() == list(expected)
    for name, tensor in expected.items():
        assert ckpt.specs()[name].dtype == tensor.dtype
        assert torch.equal(as_bytes(ckpt.read(name)), as_bytes(tensor))
    if "step" in state:
        assert ckpt.metadata_step() == StepInfo(12, "metadata:step")


def test_metadata_is_read_once(tmp_path: Path) -> None:
    save_dcp(tmp_path, {"model": dict(make_state(5)), "step": torch.tensor(5)})
    ckpt = DcpCheckpoint(tmp_path)
    (tmp_path / ".metadata").unlink()  # every later read uses what was read (and checked) at open
    assert ckpt.metadata_step() == StepInfo(5, "metadata:step")
    for name, tensor in make_state(5).items():
        assert torch.equal(ckpt.read(name), tensor)


@pytest.mark.parametrize("where", ["../outside.distcp", "absolute"])
def test_data_files_outside_the_folder_are_refused(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "ckpt"
    save_dcp(folder, dict(make_state(1)))
    outside = tmp_path / "outside.distcp"
    outside.write_bytes(next(folder.glob("*.distcp")).read_bytes())  # readable, were it allowed
    relative = str(outside) if where == "absolute" else where
    rewrite_metadata(folder, each_storage_entry(lambda info: setattr(info, "relative_path", relative)))
    with pytest.raises(
        CheckpointError, match=r"ckpt: names data file .*outside\.distcp.*outside the checkpoint"
    ):
        DcpCheckpoint(folder)


def test_a_small_folder_claiming_a_huge_tensor_is_refused_at_open(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))

    def claim_4_tb(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["encoder.bias"]
        entry.size = torch.Size([10**12])
        entry.chunks[0].sizes = torch.Size([10**12])

    rewrite_metadata(tmp_path, claim_4_tb)
    with pytest.raises(
        CheckpointError, match=r"claims 4000000\d+ bytes of tensors, but its data files hold only"
    ):
        DcpCheckpoint(tmp_path)


def test_stream_transforms_are_refused(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))
    rewrite_metadata(
        tmp_path, each_storage_entry(lambda info: setattr(info, "transform_descriptors", ["zstd"]))
    )
    with pytest.raises(CheckpointError, match=r"uses DCP stream transforms"):
        DcpCheckpoint(tmp_path)


def test_a_chunk_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))
    rewrite_metadata(tmp_path, each_storage_entry(lambda info: setattr(info, "offset", info.offset + 10**6)))
    with pytest.raises(CheckpointError, match=r"is truncated: '.*\.distcp' ends before byte"):
        DcpCheckpoint(tmp_path)


@pytest.mark.parametrize(
    "step", [torch.tensor(1 + 2j), torch.tensor(True), torch.tensor(-5)], ids=["complex", "bool", "negative"]
)
def test_a_bad_step_tensor_is_one_clear_error(tmp_path: Path, step: torch.Tensor) -> None:
    save_dcp(tmp_path, {"model": dict(make_state(1)), "step": step})
    with pytest.raises(CheckpointError, match=r"has step .*\(metadata:step\), not a whole number"):
        DcpCheckpoint(tmp_path).metadata_step()


def test_a_tensor_the_tool_cannot_handle_is_refused_at_open(tmp_path: Path) -> None:
    state = dict(make_state(1))
    state["rotary.freqs"] = torch.ones(4, dtype=torch.complex64)
    save_dcp(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"tensor 'rotary\.freqs' is complex64 \(complex\)"):
        DcpCheckpoint(tmp_path)


def replace_slice(folder: Path, fqn: str, obj: object) -> Path:
    """Point ``fqn``'s chunk at ``torch.save(obj)`` appended to its data file, as damage or an attacker
    would leave it; returns that data file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = next(folder.glob("*.distcp"))
    start = data.stat().st_size
    with open(data, "ab") as f:
        f.write(buffer.getvalue())

    def point(metadata: Any) -> None:
        for index, info in metadata.storage_data.items():
            if index.fqn == fqn:
                info.offset, info.length = start, len(buffer.getvalue())

    rewrite_metadata(folder, point)
    return data


def zero_first_bytes(folder: Path) -> Path:
    data = next(folder.glob("*.distcp"))
    damaged = bytearray(data.read_bytes())
    damaged[:64] = bytes(64)
    data.write_bytes(bytes(damaged))
    return data


DAMAGE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zeroed": (zero_first_bytes, r"its bytes are not a saved tensor"),
    "dict": (lambda f: replace_slice(f, "model.encoder.bias", {"a": torch.ones(16)}), r"other than a tensor"),
    "too small": (lambda f: replace_slice(f, "model.encoder.bias", torch.ones(4)), r"other than a tensor"),
    "global": (
        lambda f: replace_slice(f, "model.encoder.bias", torch.nn.Linear(1, 1)),
        r"it names torch\.nn\.modules\.linear\.Linear, not a tensor; refused",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_data_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    """torch wraps every read failure in a CheckpointException, a BaseException no `except Exception`
    catches: the damaged slice must still be one CheckpointError naming the data file and tensor."""
    save_dcp(tmp_path, {"model": dict(make_state(1)), "step": torch.tensor(1)})
    make, problem = DAMAGE[damage]
    data = make(tmp_path)
    ckpt = DcpCheckpoint(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        for name in ckpt.specs():
            ckpt.read(name)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert re.fullmatch(
        rf"{re.escape(str(data))}: cannot read tensor 'model\.encoder\.\w+': damaged DCP data \(.*\)", message
    )
    assert re.search(problem, message)


@pytest.mark.subprocess
def test_damaged_step_tensor_under_dry_run_is_one_line(tmp_path: Path) -> None:
    for step in (1, 2):
        save_dcp(tmp_path / f"save_{step}", {"model": dict(make_state(step)), "step": torch.tensor(step)})
    data = replace_slice(tmp_path / "save_2", "step", {"step": 2})
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ema-average"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        f"ema-average: error: {data}: cannot read tensor 'step': damaged DCP data (it holds something "
        "other than a tensor of the size the metadata gives)"
    ]


def test_an_interrupt_during_a_read_stays_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP wraps a Ctrl-C landing inside its read too; it must come out as the KeyboardInterrupt it was."""
    from ema_average.checkpoints.layouts import dcp_reading

    save_dcp(tmp_path, dict(make_state(1)))
    ckpt = DcpCheckpoint(tmp_path)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp_reading, "check_stored", interrupted)  # inside DCP's read_data call
    with pytest.raises(KeyboardInterrupt):
        ckpt.read("encoder.weight")


def test_a_shape_no_tensor_can_have_is_refused_at_open(tmp_path: Path) -> None:
    """A pickled shape is a plain tuple: [2**63, 0] claims no bytes, but torch cannot make it."""
    save_dcp(tmp_path, dict(make_state(1)))

    def impossible(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["encoder.bias"]
        entry.size = (2**63, 0)
        entry.chunks[0].sizes = (2**63, 0)
        entry.chunks[0].offsets = (0, 0)

    rewrite_metadata(tmp_path, impossible)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'encoder\.bias' has shape \[9223372036854775808, 0\], beyond what torch can index",
    ):
        DcpCheckpoint(tmp_path)


def adamw_trained(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model's state dict and its AdamW state flattened by parameter name, as torch's
    ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` and torchtitan write it."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    names = [n for n, _ in model.named_parameters()]
    flat = {
        f"state.{names[i]}.{slot}": value
        for i, per_param in optimizer.state_dict()["state"].items()
        for slot, value in per_param.items()
    }
    flat.update({f"param_groups.{n}.lr": 0.01 for n in names})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, flat


def test_torchtitan_step_folders_average_the_model_only(tmp_path: Path) -> None:
    # torchtitan (torchtitan/components/checkpoint.py, reproduced: it is not installed): the model's
    # weights at the top level beside optimizer, lr_scheduler, train_state and dataloader; the last step
    # model-only. 14 of the 20 tensors of a full save are optimizer state.
    models = {}
    for step in (10, 20, 30):
        model, optim = adamw_trained(step)
        models[step] = model
        state: dict[str, Any] = dict(model)
        if step != 30:
            state |= {
                "optimizer": optim,
                "lr_scheduler": {"last_epoch": step},
                "train_state": {"step": step, "ntokens_seen": 64 * step},
                "dataloader": {"dp_rank_0": b"state"},
            }
        save_dcp(tmp_path / "checkpoint" / f"step-{step}", state)
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [10, 20, 30]
    for step, ckpt in zip((10, 20, 30), run.checkpoints, strict=True):
        assert ckpt.tensor_names() == list(models[step])
        assert all(torch.equal(ckpt.read(n), t) for n, t in models[step].items())
    assert (
        run.checkpoints[0].choices[0].describe()
        == "read the top level; not averaged: optimizer state (optimizer)"
    )


def test_torchtnt_app_state_reads_the_module(tmp_path: Path) -> None:
    # torchtnt's DistributedCheckpointSaver: everything under app_state (module, optimizer, train_progress).
    for step in (4, 8):
        model, _ = adamw_trained(step)
        torch.manual_seed(step)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
        optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
        optimizer.step()
        app_state = {
            "module": model,
            "optimizer": optimizer.state_dict(),
            "train_progress": {"num_steps_completed": torch.tensor(step)},
        }
        save_dcp(tmp_path / f"epoch_0_train_step_{step}", {"app_state": app_state})
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [4, 8]
    model, _ = adamw_trained(8)
    assert run.checkpoints[1].tensor_names() == list(model)
    assert all(torch.equal(run.checkpoints[1].read(n), t) for n, t in model.items())


def test_a_save_with_no_model_is_one_clear_error(tmp_path: Path) -> None:
    _, optim = adamw_trained(1)
    save_dcp(tmp_path / "step-1", {"optimizer": optim})
    with pytest.raises(
        CheckpointError, match=r"step-1: holds no model weights, only optimizer state \(optimizer\)"
    ):
        DcpCheckpoint(tmp_path / "step-1")


def test_a_save_of_byte_items_alone_says_it_holds_no_tensors(tmp_path: Path) -> None:
    """A folder of byte items only (a step and a note): the refusal said 'holds no model weights, only'
    and stopped there."""
    save_dcp(tmp_path / "step-1", {"step": 1, "note": "x"})
    with pytest.raises(CheckpointError, match=r"step-1: holds no tensors$"):
        DcpCheckpoint(tmp_path / "step-1")


def test_olmo_core_storage_info_look_alike_is_read_as_dcps(tmp_path: Path) -> None:
    save_dcp(tmp_path / "step2", {"model": dict(make_state(2))})
    olmo_core_look_alike(tmp_path / "step2")
    assert b"olmo_core.distributed.checkpoint.filesystem" in (tmp_path / "step2" / ".metadata").read_bytes()
    ckpt = DcpCheckpoint(tmp_path / "step2")
    assert all(torch.equal(ckpt.read(n), t) for n, t in make_state(2).items())


class TorchtitanTrainer:
    """torchtitan 0.3.0's ``Trainer`` as its checkpointer saves it (``states={"train_state": self}``):
    a Stateful whose ``state_dict()`` is ``{"step": self.step, "ntokens_seen": self.ntokens_seen}``,
    plain ints that DCP writes as byte items (torchtitan/trainer.py; not installed here)."""

    def __init__(self, step: int) -> None:
        self.step, self.ntokens_seen = step, 64 * step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state_dict["step"], state_dict["ntokens_seen"]


def save_dcp_unflattened(folder: Path, state: dict) -> None:
    """DCP with ``flatten_state_dict=False``: a dict beside the tensors is saved as one byte item."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), planner=DefaultSavePlanner(flatten_state_dict=False))


BYTE_STEPS: dict[str, tuple[Callable[[Path, dict[str, torch.Tensor]], None], str]] = {
    "dict": (
        lambda f, m: save_dcp(f, {"model": m, "train_state": {"step": 7}}),
        "metadata:train_state.step",
    ),
    "torchtitan": (
        lambda f, m: save_dcp(f, {**m, "train_state": TorchtitanTrainer(7)}),
        "metadata:train_state.step",
    ),
    "torchtnt": (  # torchtnt Progress.state_dict(): ints
        lambda f, m: save_dcp(
            f,
            {
                "app_state": {
                    "module": m,
                    "train_progress": {
                        "num_epochs_completed": 0,
                        "num_steps_completed": 7,
                        "num_steps_completed_in_epoch": 7,
                    },
                }
            },
        ),
        "metadata:app_state.train_progress.num_steps_completed",
    ),
    "top-level int": (lambda f, m: save_dcp(f, {"model": m, "step": 7}), "metadata:step"),
    "torchtitan before 0.3 (int32 tensor)": (
        lambda f, m: save_dcp(f, {**m, "train_state": {"step": torch.tensor(7, dtype=torch.int32)}}),
        "metadata:train_state.step",
    ),
    "one object": (
        lambda f, m: save_dcp_unflattened(f, {**m, "train_state": {"step": 7, "ntokens_seen": 448}}),
        "metadata:train_state.step",
    ),
}


@pytest.mark.parametrize("encoding", list(BYTE_STEPS))
def test_a_step_counter_saved_as_a_byte_item_wins_over_the_folder_name(tmp_path: Path, encoding: str) -> None:
    save, origin = BYTE_STEPS[encoding]
    for name in ("step-5", "step-9"):
        save(tmp_path / name, dict(make_state(1)))
    (tmp_path / "step-9" / ".metadata").unlink()
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [(7, origin)]
    assert run.checkpoints[0].tensor_names() == list(make_state(1))


def test_the_plan_says_a_byte_item_step_was_used(tmp_path: Path) -> None:
    for name, step in (("step-5", 7), ("step-10", 12)):
        save_dcp(tmp_path / name, {**make_state(step), "train_state": TorchtitanTrainer(step)})
    result = run_cli(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "metadata:train_state.step" in line]
    assert len(lines) == 2 and "7" in lines[0] and "12" in lines[1], result.stdout


def test_a_byte_item_that_runs_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    save_dcp(
        tmp_path / "step-5", {"model": dict(make_state(1)), "train_state": {"step": WritesMarker(marker)}}
    )
    with pytest.raises(CheckpointError) as caught:
        find_run(tmp_path)
    data = next((tmp_path / "step-5").glob("*.distcp"))
    assert str(caught.value) == (
        f"{data}: byte item 'train_state.step' names posix.system, not a step counter; refused"
    )
    assert not marker.exists()


def test_a_huge_byte_item_at_a_step_key_is_refused_unread(tmp_path: Path) -> None:
    """A byte item claiming 1 GiB (a sparse hole appended to its data file) is refused from its length."""
    folder = tmp_path / "step-5"
    save_dcp(folder, {"model": dict(make_state(1)), "train_state": {"step": 7}})
    data = next(folder.glob("*.distcp"))
    start = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(start + 2**30)

    def point(metadata: Any) -> None:
        for index, info in metadata.storage_data.items():
            if index.fqn == "train_state.step":
                info.offset, info.length = start, 2**30

    rewrite_metadata(folder, point)
    with pytest.raises(CheckpointError) as caught:
        DcpCheckpoint(folder).metadata_step()
    assert str(caught.value) == (
        f"{folder}: byte item 'train_state.step' is 1073741824 bytes, more than a step counter's 65536; refused"
    )


def test_a_large_trainer_state_object_is_not_read_for_its_step(tmp_path: Path) -> None:
    """A trainer state saved whole, above the cap, is skipped: the folder name gives the step."""
    state = {**make_state(1), "train_state": {"step": 7, "history": list(range(100_000))}}
    save_dcp_unflattened(tmp_path / "step-5", state)
    [ckpt] = find_run(tmp_path).checkpoints
    assert (ckpt.step, ckpt.step_origin) == (5, "filename:step=N")
