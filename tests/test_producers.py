"""Every trainer's run folder as it is written (issue 11): pointed at, it works with no flags, or stops with
one line saying what to do. Real runs where the producer installs beside torch (PEFT 0.21, diffusers 0.42,
accelerate 1.15, transformers 5, Lightning 2.6); the others reproduced from their source, said per test.
Every average is checked against the float64 reference of the producer's own tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ema_average.checkpoints import find_run
from ema_average.checkpoints.discovery.discover import candidates
from ema_average.errors import CheckpointError, ConfigurationError
from helpers import (
    assert_matches_reference,
    make_state,
    tiny_gpt2,
    tiny_unet,
    write_fairseq_run,
    write_lightning_run,
)

pytestmark = pytest.mark.producers

# PEFT LoRA through the HF Trainer ---------------------------------------------------------------------


def test_peft_lora_adapters_and_the_final_adapter(peft_lora_run: Path) -> None:
    run = find_run(peft_lora_run)
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        ("checkpoint-3", 3, "trainer_state.json:global_step"),
        ("checkpoint-6", 6, "trainer_state.json:global_step"),
    ]
    assert run.notices == [
        f"skipped {peft_lora_run} (adapter_model.safetensors): a final model saved beside the checkpoints"
    ]
    states = [load_file(str(c.path / "adapter_model.safetensors")) for c in run.checkpoints]
    assert all("lora_A" in n or "lora_B" in n for n in states[0])
    assert_matches_reference(run.checkpoints, states)


# HF Trainer with trainer.save_model() at the end ------------------------------------------------------


def test_hf_trainer_final_model_beside_the_checkpoints(hf_trainer_run: Path, tmp_path: Path) -> None:
    """``trainer.save_model()`` is ``save_pretrained(output_dir)`` (plus training_args.bin)."""
    from transformers import GPT2LMHeadModel

    run_dir = shutil.copytree(hf_trainer_run, tmp_path / "out")
    GPT2LMHeadModel.from_pretrained(run_dir / "checkpoint-6").save_pretrained(run_dir)
    shutil.copy(run_dir / "checkpoint-6" / "training_args.bin", run_dir / "training_args.bin")
    run = find_run(run_dir)
    assert [c.step for c in run.checkpoints] == [3, 6]
    assert run.notices == [
        f"skipped {run_dir} (model.safetensors): a final model saved beside the checkpoints"
    ]
    states = [load_file(str(c.path / "model.safetensors")) for c in run.checkpoints]
    assert_matches_reference(run.checkpoints, states)


# diffusers -----------------------------------------------------------------------------------------------


def test_diffusers_training_script_reads_unet_not_unet_ema(diffusers_training_run: Path) -> None:
    run = find_run(diffusers_training_run)
    assert [(c.path.name, c.step) for c in run.checkpoints] == [("checkpoint-2", 2), ("checkpoint-4", 4)]
    assert {c.step_origin for c in run.checkpoints} == {"unet_ema/config.json:optimization_step"}
    assert {c.model for c in run.checkpoints} == {"unet"}
    assert run.notices == [
        f"skipped unet/ in {diffusers_training_run}: a final model saved beside the checkpoints",
        "in each checkpoint: read unet; also here: unet_ema (--submodel unet_ema)",
    ]
    states = [
        load_file(str(c.path / "unet" / "diffusion_pytorch_model.safetensors")) for c in run.checkpoints
    ]
    assert_matches_reference(run.checkpoints, states)


def test_diffusers_unet_ema_on_request(diffusers_training_run: Path) -> None:
    run = find_run(diffusers_training_run, submodel="unet_ema")
    assert {c.model for c in run.checkpoints} == {"unet_ema"}
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (2, "config.json:optimization_step"),
        (4, "config.json:optimization_step"),
    ]
    states = [
        load_file(str(c.path / "unet_ema" / "diffusion_pytorch_model.safetensors")) for c in run.checkpoints
    ]
    assert_matches_reference(run.checkpoints, states)


def test_unknown_submodel_is_one_line(diffusers_training_run: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"checkpoint-2: has no model 'vae' \(--submodel\); its models: unet, unet_ema"
    ):
        find_run(diffusers_training_run, submodel="vae")


def test_pointing_at_one_diffusers_checkpoint(diffusers_training_run: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint-2: is one checkpoint folder"):
        find_run(diffusers_training_run / "checkpoint-2")


def test_diffusers_save_pretrained_per_step(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    unet = tiny_unet()
    states = []
    for step in (10, 20, 30):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * step)
        unet.save_pretrained(tmp_path / "run" / f"step_{step}")
        states.append({k: v.clone() for k, v in unet.state_dict().items()})
    run = find_run(tmp_path / "run")
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (s, "filename:step=N") for s in (10, 20, 30)
    ]
    assert_matches_reference(run.checkpoints, states)


# accelerate save_state with automatic naming ------------------------------------------------------------


def test_accelerate_counter_is_flagged(accelerate_run: Path) -> None:
    run = find_run(accelerate_run)
    assert [c.path.name for c in run.checkpoints] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    assert [c.step for c in run.checkpoints] == [0, 1, 2]
    assert all(c.step_is_counter for c in run.checkpoints)
    assert any("count saves or epochs" in n and "--step-every N" in n for n in run.notices)


def test_accelerate_step_every_gives_real_steps(accelerate_run: Path) -> None:
    run = find_run(accelerate_run, step_every=2)
    assert [c.step for c in run.checkpoints] == [2, 4, 6]
    assert not any(c.step_is_counter for c in run.checkpoints)
    assert not any("count saves" in n for n in run.notices)
    states = [load_file(str(c.path / "model.safetensors")) for c in run.checkpoints]
    assert_matches_reference(run.checkpoints, states)
    assert [c.step for c in find_run(accelerate_run, steps=[5, 50, 500]).checkpoints] == [5, 50, 500]


def test_step_every_where_steps_are_known(tmp_path: Path) -> None:
    from helpers import write_safetensors_run

    write_safetensors_run(tmp_path, [1, 2])
    with pytest.raises(ConfigurationError, match="--step-every applies to checkpoints numbered by a count"):
        find_run(tmp_path, step_every=10)
    with pytest.raises(ConfigurationError, match="3 steps given for 2 checkpoints"):
        find_run(tmp_path, steps=[1, 2, 3])


# torchtune 0.6 ------------------------------------------------------------------------------------------


def write_torchtune_run(folder: Path, epochs: int = 2, lora: bool = True) -> list[dict[str, torch.Tensor]]:
    """Reproduced from torchtune 0.6.1's FullModelHFCheckpointer.save_checkpoint (read from its source):
    ``epoch_{E}/model-0000i-of-0000N.safetensors`` (metadata {"format": "pt"}) with
    ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map"}), the model's config.json
    copied in; for LoRA also ``adapter_model.pt``, ``adapter_model.safetensors`` and ``adapter_config.json``;
    the newest epoch's optimizer and progress in ``recipe_state/recipe_state.pt``."""
    states = []
    for epoch in range(epochs):
        out = folder / f"epoch_{epoch}"
        out.mkdir(parents=True)
        state = dict(make_state(epoch + 1))
        shards = {
            "model-00001-of-00002": dict(list(state.items())[:2]),
            "model-00002-of-00002": dict(list(state.items())[2:]),
        }
        weight_map = {}
        for shard, tensors in shards.items():
            save_file(tensors, str(out / f"{shard}.safetensors"), metadata={"format": "pt"})
            weight_map.update({k: f"{shard}.safetensors" for k in tensors})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        if lora:
            adapter = {
                "layers.0.attn.q_proj.lora_a.weight": torch.randn(2, 8),
                "layers.0.attn.q_proj.lora_b.weight": torch.randn(8, 2),
            }
            torch.save(adapter, out / "adapter_model.pt")
            save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            (out / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
        states.append(state)
    (folder / "recipe_state").mkdir()
    recipe = {
        "seed": 0,
        "epochs_run": epochs,
        "total_epochs": epochs,
        "max_steps_per_epoch": None,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
    }
    torch.save(recipe, folder / "recipe_state" / "recipe_state.pt")
    return states


def test_torchtune_epochs_beside_recipe_state(tmp_path: Path) -> None:
    states = write_torchtune_run(tmp_path / "out")
    run = find_run(tmp_path / "out")
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        ("epoch_0", 0, "filename:epoch_N"),
        ("epoch_1", 1, "filename:epoch_N"),
    ]
    assert (
        "in each checkpoint: read model; also here: adapter_model (--submodel adapter_model)" in run.notices
    )
    run = find_run(tmp_path / "out", step_every=100)
    assert [c.step for c in run.checkpoints] == [100, 200]
    assert_matches_reference(run.checkpoints, states)
    adapters = find_run(tmp_path / "out", submodel="adapter_model", step_every=100).checkpoints
    assert set(adapters[0].specs()) == {
        "layers.0.attn.q_proj.lora_a.weight",
        "layers.0.attn.q_proj.lora_b.weight",
    }


# MosaicML composer 0.32 ----------------------------------------------------------------------------------


def composer_checkpoint(
    state: dict[str, torch.Tensor], epoch: int, batch: int, ema: dict | None = None
) -> dict:
    """Reproduced from composer 0.32.1's source (utils/checkpoint.py ``_save_checkpoint``, core/state.py
    ``State.state_dict``, core/time.py ``Timestamp.state_dict``): ``{"state": {...}, "rng": [...]}``, the
    model under ``state.model``, ``state.timestamp`` = ``{"Timestamp": {"batch": ..., "total_wct":
    timedelta...}}``, algorithms as ``[(qualname, state_dict)]`` (the EMA algorithm's ``ema_model`` holds the
    training weights while ``ema_weights_active``), metadata with ``torch.__version__``, numpy RNG state."""
    import datetime

    import numpy as np

    wct = datetime.timedelta(seconds=batch)
    timestamp = {
        "iteration": 0,
        "epoch": epoch,
        "batch": batch,
        "sample": batch * 4,
        "token": 0,
        "epoch_in_iteration": epoch,
        "token_in_iteration": 0,
        "batch_in_epoch": batch,
        "sample_in_epoch": batch * 4,
        "token_in_epoch": 0,
        "total_wct": wct,
        "iteration_wct": wct,
        "epoch_wct": wct,
        "batch_wct": wct,
    }
    algorithms = []
    if ema is not None:
        algorithms.append(
            (
                "EMA",
                {
                    "repr": "EMA(half_life='1ba')",
                    "ema_model": {"named_parameters_dict": ema, "named_buffers_dict": {}},
                    "ema_weights_active": True,
                    "ema_started": True,
                },
            )
        )
    return {
        "state": {
            "model": state,
            "optimizers": {"SGD": {"state": {}, "param_groups": [{"lr": 0.1, "params": list(state)}]}},
            "schedulers": {"LambdaLR": {"base_lrs": [0.1], "last_epoch": batch, "lr_lambdas": [None]}},
            "algorithms": algorithms,
            "callbacks": {"CheckpointSaver": {"all_saved_checkpoints_to_timestamp": []}},
            "scaler": {},
            "timestamp": {"Timestamp": timestamp},
            "rank_zero_seed": 42,
            "train_metrics": {},
            "eval_metrics": {},
            "run_name": "run",
            "dataset_state": {"train": None, "eval": {}},
            "integrations": {},
            "metadata": {
                "composer_env_info": {"composer_version": "0.32.1"},
                "torch_version": torch.__version__,
                "device": "cpu",
                "precision": "fp32",
                "world_size": 1,
            },
        },
        "rng": [
            {
                "python": (3, tuple(range(5)), None),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            }
        ],
    }


def test_composer_steps_from_timestamp(tmp_path: Path) -> None:
    states = []
    for epoch, batch in ((0, 10), (0, 20), (1, 30)):
        states.append({f"model.{k}": v for k, v in make_state(batch).items()})
        torch.save(composer_checkpoint(states[-1], epoch, batch), tmp_path / f"ep{epoch}-ba{batch}-rank0.pt")
    os.symlink(tmp_path / "ep1-ba30-rank0.pt", tmp_path / "latest-rank0.pt")  # composer's latest_filename
    run = find_run(tmp_path)
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        (f"ep{e}-ba{b}-rank0.pt", b, "metadata:state.timestamp.batch") for e, b in ((0, 10), (0, 20), (1, 30))
    ]
    assert any("latest-rank0.pt: same step (30)" in n for n in run.notices)
    assert {c.state_dict_key for c in run.checkpoints} == {"state.model"}
    assert_matches_reference(run.checkpoints, states)


def test_composer_ema_algorithm_reads_the_training_weights(tmp_path: Path) -> None:
    raw = []
    for batch in (10, 20):
        raw.append({f"model.{k}": v for k, v in make_state(batch).items() if v.is_floating_point()})
        averaged = {k: v + 1 for k, v in raw[-1].items()}
        torch.save(composer_checkpoint(averaged, 0, batch, ema=raw[-1]), tmp_path / f"ep0-ba{batch}-rank0.pt")
    run = find_run(tmp_path)
    assert (
        "in each checkpoint: read state.algorithms.EMA; also here: state.model "
        "(the average; --state-dict-key state.model)" in run.notices  # the EMA swapped into the model
    )
    assert_matches_reference(run.checkpoints, raw)
    averages = find_run(tmp_path, state_dict_key="state.model").checkpoints
    assert torch.equal(averages[0].read("model.head.weight"), raw[0]["model.head.weight"] + 1)


# timm 1.0 CheckpointSaver --------------------------------------------------------------------------------


def write_timm_run(folder: Path, epochs: int = 3) -> list[dict[str, torch.Tensor]]:
    """Reproduced from timm 1.0.31's utils/checkpoint_saver.py (``CheckpointSaver._save`` and
    ``save_checkpoint``): ``torch.save`` of {epoch, arch, optimizer, version: 2, args (argparse.Namespace),
    state_dict, state_dict_ema, metric, saver} to ``tmp.pth.tar``, renamed to ``last.pth.tar`` and hard-linked
    as ``checkpoint-{epoch}.pth.tar`` and (when the metric is the best) ``model_best.pth.tar``."""
    folder.mkdir(parents=True)
    states = []
    for epoch in range(epochs):
        state = dict(make_state(epoch + 1))
        states.append(state)
        save_state = {
            "epoch": epoch,
            "arch": "resnet18",
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "version": 2,
            "args": argparse.Namespace(model="resnet18", lr=0.1),
            "state_dict": state,
            "state_dict_ema": {k: v * 0.5 for k, v in state.items()},
            "metric": 70.0 + epoch,
            "saver": {
                "checkpoint_files": [],
                "best_epoch": epoch,
                "best_metric": 70.0 + epoch,
                "pending": (epoch, 70.0 + epoch),
            },
        }
        torch.save(save_state, folder / "tmp.pth.tar")
        os.replace(folder / "tmp.pth.tar", folder / "last.pth.tar")
        os.link(folder / "last.pth.tar", folder / f"checkpoint-{epoch}.pth.tar")
        (folder / "model_best.pth.tar").unlink(missing_ok=True)
        os.link(folder / "last.pth.tar", folder / "model_best.pth.tar")
    return states


def test_timm_epochs_raw_weights_and_copies(tmp_path: Path) -> None:
    states = write_timm_run(tmp_path / "out")
    run = find_run(tmp_path / "out")
    assert [(c.path.name, c.step, c.step_origin) for c in run.checkpoints] == [
        (f"checkpoint-{e}.pth.tar", e, "metadata:epoch") for e in range(3)
    ]
    assert all(c.step_is_counter for c in run.checkpoints)
    assert sum("same step (2)" in n for n in run.notices) == 2  # last.pth.tar, model_best.pth.tar
    assert (
        "in each checkpoint: read state_dict; also here: state_dict_ema (--state-dict-key state_dict_ema)"
        in run.notices
    )
    run = find_run(tmp_path / "out", step_every=1000)
    assert [c.step for c in run.checkpoints] == [1000, 2000, 3000]
    assert_matches_reference(run.checkpoints, states)


# Lightning 2.6 EMAWeightAveraging ------------------------------------------------------------------------


def test_lightning_ema_weight_averaging_reads_current_model_state(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    write_lightning_run(tmp_path / "ckpts", callbacks=[EMAWeightAveraging(decay=0.5)])
    run = find_run(tmp_path / "ckpts")
    assert [c.step for c in run.checkpoints] == [4, 8, 12]
    assert {c.state_dict_key for c in run.checkpoints} == {"current_model_state"}
    assert (
        "in each checkpoint: read current_model_state; also here: state_dict (the average; --state-dict-key state_dict); "
        "not averaged: trainer state (callbacks)" in run.notices
    )
    raw = [torch.load(c.path, weights_only=False)["current_model_state"] for c in run.checkpoints]
    assert not torch.equal(
        raw[0]["net.0.weight"],
        torch.load(run.checkpoints[0].path, weights_only=False)["state_dict"]["net.0.weight"],
    )
    assert_matches_reference(run.checkpoints, raw)


# fairseq: its EMA beside the model, and choosing files by name -------------------------------------------


def test_fairseq_ema_is_named_and_files_chosen_by_glob(tmp_path: Path) -> None:
    states = write_fairseq_run(tmp_path, [100, 200])
    for n in (100, 200):  # fairseq's --store-ema puts the EMA in extra_state["ema"]
        obj = torch.load(tmp_path / f"checkpoint_1_{n}.pt", weights_only=False)
        obj["extra_state"]["ema"] = {k: v * 0 for k, v in obj["model"].items()}
        torch.save(obj, tmp_path / f"checkpoint_1_{n}.pt")
    shutil.copy(tmp_path / "checkpoint_1_200.pt", tmp_path / "checkpoint1.pt")  # an epoch checkpoint
    for copy in ("checkpoint_last.pt", "checkpoint_best.pt"):
        shutil.copy(tmp_path / "checkpoint_1_200.pt", tmp_path / copy)
    run = find_run(tmp_path, globs=("checkpoint_*_*.pt",))
    assert [c.path.name for c in run.checkpoints] == ["checkpoint_1_100.pt", "checkpoint_1_200.pt"]
    assert (
        "in each checkpoint: read model; also here: extra_state.ema (--state-dict-key extra_state.ema)"
        in run.notices
    )
    assert_matches_reference(run.checkpoints, [states[100], states[200]])
    assert candidates(tmp_path, ("checkpoint_*_*.pt",)) == [
        tmp_path / "checkpoint_1_100.pt",
        tmp_path / "checkpoint_1_200.pt",
    ]


# Side folders and placeholders ---------------------------------------------------------------------------


def test_loose_weight_files_in_step_folders(tmp_path: Path) -> None:
    states = []
    for step in (5, 10):
        (tmp_path / "run" / f"step_{step}").mkdir(parents=True)
        states.append(dict(make_state(step)))
        torch.save(states[-1], tmp_path / "run" / f"step_{step}" / "model.pt")
        torch.save({"state": {}}, tmp_path / "run" / f"step_{step}" / "optimizer.pt")
    run = find_run(tmp_path / "run")
    assert [(c.path.name, c.step) for c in run.checkpoints] == [("step_5", 5), ("step_10", 10)]
    assert_matches_reference(run.checkpoints, states)


def test_empty_placeholders_are_never_averaged(tmp_path: Path) -> None:
    for step in (1, 2):
        torch.save(
            {"module": {"w": torch.empty(0, dtype=torch.bfloat16)}, "global_steps": step},
            tmp_path / f"m_{step}.pt",
        )
    with pytest.raises(CheckpointError, match=r"m_1\.pt: tensor 'w' has no elements: a placeholder"):
        find_run(tmp_path)


def test_gpt2_config_hf_folder_still_has_no_optimization_step(hf_trainer_run: Path) -> None:
    assert tiny_gpt2() is not None  # the config.json of transformers models holds no optimization_step
    assert {c.step_origin for c in find_run(hf_trainer_run).checkpoints} == {"trainer_state.json:global_step"}
