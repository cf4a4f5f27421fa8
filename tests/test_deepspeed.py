"""DeepSpeed 0.19 run folders, written by real DeepSpeed on CPU (gloo; one and two ranks; ZeRO 0-3; fp32, bf16).

Every read is checked against DeepSpeed's own ``zero_to_fp32`` (an independent implementation of the
rebuild) and every average against the float64 reference.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import DeepSpeedCheckpoint, find_run
from ema_average.errors import CheckpointError
from ema_average.pipeline import RunOptions, average_checkpoints
from ema_average.plan import AverageSettings
from helpers import DEEPSPEED_RUNS, assert_matches_reference, float64_reference

pytest.importorskip("deepspeed")

VARIANTS = [(world, v) for world, variants in DEEPSPEED_RUNS.items() for v in variants]


def run_folder(runs: Path, world: int, variant: str) -> Path:
    stage, dtype = variant.split(":")
    return runs / f"z{stage}-{dtype}-w{world}"


def zero_to_fp32(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of one tag (it prints; silenced)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return {name: tensor.contiguous() for name, tensor in state.items()}


@pytest.mark.parametrize(("world", "variant"), VARIANTS)
def test_steps_and_default_model(deepspeed_runs: Path, world: int, variant: str) -> None:
    run = find_run(run_folder(deepspeed_runs, world, variant))
    assert [c.step for c in run.checkpoints] == [2, 4, 6]
    assert {c.step_origin for c in run.checkpoints} == {"metadata:global_steps"}
    assert [c.path.name for c in run.checkpoints] == ["global_step2", "global_step4", "global_step6"]
    stage = int(variant[0])
    expected = {0: "", 1: "module", 2: "module", 3: "fp32"}[stage]
    assert {c.model for c in run.checkpoints} == {expected}
    if stage in (1, 2):
        assert run.notices == ["in each checkpoint: read module; also here: fp32 (--submodel fp32)"]
    assert run.checkpoints[0].aliases() == {"head.weight": "embed.weight"}


@pytest.mark.parametrize(("world", "variant"), [v for v in VARIANTS if not v[1].startswith("0")])
def test_fp32_master_weights_equal_zero_to_fp32(deepspeed_runs: Path, world: int, variant: str) -> None:
    folder = run_folder(deepspeed_runs, world, variant)
    run = find_run(folder, submodel="fp32")
    for ckpt in run.checkpoints:
        expected = zero_to_fp32(folder, ckpt.path.name)
        if variant.startswith("1"):
            # ZeRO-1 does not save frozen parameters as such; zero_to_fp32 drops them, we keep module's.
            assert {n for n in ckpt.specs() if n not in expected} == {"frozen.weight", "frozen.bias"}
            assert torch.equal(ckpt.read("frozen.weight"), ckpt.read("frozen.weight").float())
        for name, tensor in expected.items():
            got = ckpt.read(name)
            assert got.dtype == tensor.dtype, name
            assert torch.equal(got, tensor), name
            assert got.numel() > 0


@pytest.mark.parametrize(("world", "variant"), VARIANTS)
def test_average_matches_float64_reference(deepspeed_runs: Path, world: int, variant: str) -> None:
    run = find_run(run_folder(deepspeed_runs, world, variant))
    states = [{n: c.read(n) for n in c.specs()} for c in run.checkpoints]
    assert_matches_reference(run.checkpoints, states)


def test_module_weights_are_the_models_dtype(deepspeed_runs: Path) -> None:
    ckpt = find_run(run_folder(deepspeed_runs, 1, "1:bf16")).checkpoints[0]
    assert ckpt.specs()["inp.weight"].dtype == torch.bfloat16
    assert ckpt.specs()["scale"].dtype == torch.float32
    fp32 = find_run(run_folder(deepspeed_runs, 1, "1:bf16"), submodel="fp32").checkpoints[0]
    assert fp32.specs()["inp.weight"].dtype == torch.float32
    assert torch.allclose(fp32.read("inp.weight").bfloat16().float(), ckpt.read("inp.weight").float())


def test_zero3_module_is_refused_not_read_empty(deepspeed_runs: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"global_step2: is a ZeRO-3 save: its module holds only placeholders"
    ):
        find_run(run_folder(deepspeed_runs, 2, "3:bf16"), submodel="module")


def test_lazy_reads_reopen_after_close(deepspeed_runs: Path) -> None:
    ckpt = find_run(run_folder(deepspeed_runs, 2, "3:bf16")).checkpoints[-1]
    before = ckpt.read("inp.weight").clone()
    ckpt.close()
    assert torch.equal(ckpt.read("inp.weight"), before)
    assert isinstance(ckpt, DeepSpeedCheckpoint) and ckpt.stage == 3


def test_a_missing_rank_is_one_line(deepspeed_runs: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder(deepspeed_runs, 2, "3:bf16"), tmp_path / "run")
    for tag in folder.glob("global_step*"):
        (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"global_step2: needs the optimizer partitions of 2 ranks, but holds 1"
    ):
        find_run(folder)


def test_tensor_parallel_is_refused(deepspeed_runs: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder(deepspeed_runs, 1, "0:fp32"), tmp_path / "run")
    tag = folder / "global_step2"
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    with pytest.raises(
        CheckpointError, match=r"global_step2: is a tensor-parallel DeepSpeed save \(mp_rank_01\)"
    ):
        find_run(folder)


def trainer_weights(kind: str, source: Path, tag: str) -> dict[str, torch.Tensor]:
    """What the Trainer saved as ``model.safetensors`` beside the DeepSpeed tag ``tag``."""
    if kind == "placeholders":
        return {}
    if kind == "other":
        return {"other.weight": torch.zeros(3)}
    return {name: t.clone() for name, t in zero_to_fp32(source, tag).items()}  # tied weights saved apart


def hf_trainer_deepspeed_run(
    deepspeed_runs: Path, out: Path, variant: str = "3:bf16", weights: str = "placeholders"
) -> Path:
    """The HF Trainer with DeepSpeed: the tag inside checkpoint-N beside the Trainer's own save
    (reproduced from transformers' Trainer): under ZeRO-3 with stage3_gather_16bit_weights_on_model_save=false
    an empty model.safetensors, else the module's weights (``"module"``), or, for the refusal, weights of
    another model (``"other"``); and config.json. The DeepSpeed run it was made from is returned."""
    from safetensors.torch import save_file

    source = run_folder(deepspeed_runs, 2, variant)
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        shutil.copytree(source / f"global_step{step}", folder / f"global_step{step}")
        state = trainer_weights(weights, source, f"global_step{step}")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(f'{{"model_type": "tiny", "saved_at": {step}}}')
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return source


def test_hf_trainer_zero3_without_gathering(deepspeed_runs: Path, tmp_path: Path) -> None:
    source = hf_trainer_deepspeed_run(deepspeed_runs, tmp_path / "out")
    run = find_run(tmp_path / "out")
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (s, "metadata:global_steps") for s in (2, 4, 6)
    ]
    assert {c.model for c in run.checkpoints} == {
        "global_step2/fp32",
        "global_step4/fp32",
        "global_step6/fp32",
    }
    expected = zero_to_fp32(source, "global_step6")
    assert all(torch.equal(run.checkpoints[-1].read(n), t) for n, t in expected.items())


@pytest.mark.parametrize(
    ("variant", "weights", "submodel", "completed"),
    [
        ("3:bf16", "placeholders", None, True),  # ZeRO-3: the tag is read by default
        ("2:bf16", "module", "fp32", True),  # ZeRO-2's fp32 master weights, asked for
        ("2:bf16", "other", "fp32", False),  # the Trainer's save is not this model: no config beside it
    ],
)
def test_hf_trainer_deepspeed_folder_output_is_the_trainers_model_folder(
    deepspeed_runs: Path,
    tmp_path: Path,
    variant: str,
    weights: str,
    submodel: str | None,
    completed: bool,
) -> None:
    # -o DIR: the weights rebuilt from the DeepSpeed tags, named and completed as the Trainer's own save
    # (model.safetensors beside the latest checkpoint's config.json), which from_pretrained loads.
    from safetensors.torch import load_file

    source = hf_trainer_deepspeed_run(deepspeed_runs, tmp_path / "out", variant, weights)
    settings = AverageSettings(decay=0.9)
    average_checkpoints(RunOptions(tmp_path / "out", tmp_path / "avg", settings=settings, submodel=submodel))
    written = sorted(p.name for p in (tmp_path / "avg").iterdir())
    assert written == (["config.json", "model.safetensors"] if completed else ["model.safetensors"])
    if completed:
        config = (tmp_path / "out/checkpoint-6/config.json").read_text()
        assert (tmp_path / "avg" / "config.json").read_text() == config
    states = [zero_to_fp32(source, f"global_step{step}") for step in (2, 4, 6)]
    expected = float64_reference(states, [2, 4, 6], 0.9)
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-5, atol=1e-6)
