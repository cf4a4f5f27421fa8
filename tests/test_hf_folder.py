"""Hugging Face Trainer checkpoint-N folders: single file, pytorch_model.bin, and sharded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ema_average.checkpoints import find_run
from ema_average.errors import CheckpointError, NoCheckpointsError
from helpers import make_state


def test_real_trainer_output(hf_trainer_run: Path) -> None:
    run = find_run(hf_trainer_run)
    assert [c.path.name for c in run.checkpoints] == ["checkpoint-3", "checkpoint-6"]
    assert [c.step for c in run.checkpoints] == [3, 6]
    assert {c.step_origin for c in run.checkpoints} == {"trainer_state.json:global_step"}
    for ckpt in run.checkpoints:
        expected = load_file(str(ckpt.path / "model.safetensors"))
        assert set(ckpt.tensor_names()) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(ckpt.read(name), tensor)


def test_step_from_folder_name_without_trainer_state(hf_trainer_run: Path, tmp_path: Path) -> None:
    for src in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(
            hf_trainer_run / src, tmp_path / src, ignore=shutil.ignore_patterns("trainer_state.json")
        )
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (3, "filename:checkpoint-N"),
        (6, "filename:checkpoint-N"),
    ]


def test_pytorch_model_bin_folders(tmp_path: Path) -> None:
    # transformers < 4.35 saved torch.save(state_dict) as WEIGHTS_NAME = "pytorch_model.bin", with the
    # Trainer's trainer_state.json beside it.
    for step in (10, 20):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        torch.save(make_state(step), folder / "pytorch_model.bin")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({"state": {}}, folder / "optimizer.pt")
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [10, 20]
    assert torch.equal(run.checkpoints[1].read("head.weight"), make_state(20)["head.weight"])


def test_sharded_folders_through_the_index(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    for step in (5, 10):
        torch.manual_seed(step)
        folder = tmp_path / f"checkpoint-{step}"
        GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="20KB")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert (tmp_path / "checkpoint-5" / "model.safetensors.index.json").is_file()
    run = find_run(tmp_path)
    ckpt = run.checkpoints[0]
    weight_map = json.loads((ckpt.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(ckpt.tensor_names()) == set(weight_map)
    for name, shard in weight_map.items():
        assert torch.equal(ckpt.read(name), load_file(str(ckpt.path / shard))[name])


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "gone.safetensors"}})
    )
    with pytest.raises(
        CheckpointError, match=r"index\.json: names shard gone\.safetensors, which does not exist"
    ):
        find_run(tmp_path)


def test_pointing_at_one_checkpoint_folder(hf_trainer_run: Path) -> None:
    with pytest.raises(NoCheckpointsError, match="is one checkpoint folder"):
        find_run(hf_trainer_run / "checkpoint-3")


def sharded_folder(folder: Path, weight_map: object, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A checkpoint-N folder with the given index and shard files, as an attacker or a bug writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/ABSOLUTE/outside.safetensors"])
def test_index_paths_must_stay_inside_the_folder(tmp_path: Path, escape: str) -> None:
    from safetensors.torch import save_file

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, str(outside))
    target = escape.replace("/ABSOLUTE", str(tmp_path))
    sharded_folder(tmp_path / "run" / "checkpoint-1", {"w": target}, {})
    with pytest.raises(
        CheckpointError, match=r"names shard .*outside\.safetensors.*, which is outside its folder"
    ):
        find_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("weight_map", "problem"),
    [
        (["a.safetensors"], "no 'weight_map' object"),
        ({"w": 3}, "maps tensor 'w' to 3, not a file name"),
        ({}, "no 'weight_map' object"),
    ],
)
def test_malformed_weight_map_is_one_error(tmp_path: Path, weight_map: object, problem: str) -> None:
    sharded_folder(tmp_path / "checkpoint-1", weight_map, {"a.safetensors": {"w": torch.ones(2)}})
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: ") as info:
        find_run(tmp_path)
    assert problem in str(info.value)


def test_shard_holding_a_tensor_the_index_does_not_list(tmp_path: Path) -> None:
    shards = {"a.safetensors": {"w": torch.ones(2), "secret": torch.ones(1)}}
    sharded_folder(tmp_path / "checkpoint-1", {"w": "a.safetensors"}, shards)
    with pytest.raises(
        CheckpointError, match=r"a\.safetensors: holds tensor 'secret', which model\.safetensors"
    ):
        find_run(tmp_path)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    shards = {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"v": torch.ones(2)}}
    sharded_folder(tmp_path / "checkpoint-1", {"w": "a.safetensors", "v": "a.safetensors"}, shards)
    with pytest.raises(CheckpointError, match=r"lists tensor 'v' in a\.safetensors, which does not hold it"):
        find_run(tmp_path)


def test_trainer_state_that_is_not_json(tmp_path: Path) -> None:
    sharded_folder(tmp_path / "checkpoint-1", {"w": "a.safetensors"}, {"a.safetensors": {"w": torch.ones(2)}})
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: is not valid JSON"):
        find_run(tmp_path)


UNREAD_STATES = {
    "an array": (
        "[3, 6]",
        "trainer_state.json is not a JSON object (it is an array), so its global_step was not read",
    ),
    "a string": (
        '"6"',
        "trainer_state.json is not a JSON object (it is a string), so its global_step was not read",
    ),
    "no step": ('{"epoch": 1.0}', "trainer_state.json has no global_step, so no step was read from it"),
    "null step": (
        '{"global_step": null}',
        "trainer_state.json's global_step is null, not a step, so it was not read",
    ),
}


def run_with_trainer_state(run: Path, text: str) -> None:
    """checkpoint-3 with ``text`` as its trainer_state.json, checkpoint-6 with a good one."""
    from safetensors.torch import save_file

    for step in (3, 6):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(dict(make_state(step)), str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(text if step == 3 else json.dumps({"global_step": step}))


@pytest.mark.parametrize("state", list(UNREAD_STATES))
def test_a_trainer_state_giving_no_step_is_said_in_the_plan(tmp_path: Path, state: str) -> None:
    """It was ignored silently and the step taken from the name: the plan now says so, per checkpoint."""
    text, why = UNREAD_STATES[state]
    run_with_trainer_state(tmp_path, text)
    run = find_run(tmp_path)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (3, "filename:checkpoint-N"),
        (6, "trainer_state.json:global_step"),
    ]
    assert [c.notes for c in run.checkpoints] == [
        [f"{why}: step 3 taken from the name (filename:checkpoint-N)"],
        [],
    ]


@pytest.mark.subprocess
def test_the_command_prints_that_note(tmp_path: Path) -> None:
    run_with_trainer_state(tmp_path / "run", "[3, 6]")
    exe = str(Path(sys.executable).parent / "ema-average")
    result = subprocess.run(
        [exe, str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (
        "note: checkpoint-3: trainer_state.json is not a JSON object (it is an array), so its global_step was "
        "not read: step 3 taken from the name (filename:checkpoint-N)"
    ) in result.stdout.splitlines()


@pytest.mark.parametrize("file", ["model.safetensors.index.json", "trainer_state.json"])
def test_json_nested_too_deeply_is_one_error(tmp_path: Path, file: str) -> None:
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.ones(2) * step}, str(folder / "model-1.safetensors"))
        index = {"weight_map": {"w": "model-1.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "checkpoint-2" / file).write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"is not valid JSON \(nested too deeply to read\)") as caught:
        find_run(tmp_path)
    assert str(tmp_path / "checkpoint-2" / file) in str(caught.value)
