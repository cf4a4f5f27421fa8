"""DCP folders inside a trainer's step folder: the model folder read, side folders skipped (issue 25)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

dcp = pytest.importorskip("torch.distributed.checkpoint")


def save_accelerate_fsdp_sharded(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """``checkpoint-N/`` as the HF Trainer writes it under FSDP with ``SHARDED_STATE_DICT``, followed from
    accelerate's source (``accelerate/utils/fsdp_utils.py``, installed): ``save_fsdp_model`` calls
    ``dist_cp.save(state_dict={"model": state_dict}, storage_writer=FileSystemWriter(ckpt_dir))`` into
    ``{FSDP_MODEL_NAME}_{model_index}`` = ``pytorch_model_fsdp_0/``; ``save_fsdp_optimizer`` calls
    ``dist_cp.save(state_dict={"optimizer": optim_state}, ..., planner=DefaultSavePlanner())`` into
    ``{OPTIMIZER_NAME}_{optimizer_index}`` = ``optimizer_0/``, ``optim_state`` from torch's
    ``get_optimizer_state_dict``; the Trainer adds ``trainer_state.json``. One process, real DCP saves
    of the model's and optimizer's state dicts as torch's state-dict API gives them."""
    import json

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = folder / "pytorch_model_fsdp_0"
        model_dir.mkdir(parents=True)
        dcp.save(
            state_dict={"model": get_model_state_dict(model)}, storage_writer=dcp.FileSystemWriter(model_dir)
        )
        optim_dir = folder / "optimizer_0"
        optim_dir.mkdir(parents=True)
        dcp.save(
            state_dict={"optimizer": get_optimizer_state_dict(model, optimizer)},
            storage_writer=dcp.FileSystemWriter(optim_dir),
            planner=DefaultSavePlanner(),
        )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))


def hf_trainer_fsdp_run(root: Path) -> tuple[torch.nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """A small model trained with AdamW, saved at steps 2, 4, 6; the weights saved at each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    saved = {}
    for step in range(1, 7):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            save_accelerate_fsdp_sharded(root / f"checkpoint-{step}", model, optimizer)
            saved[step] = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return model, saved


@pytest.mark.parametrize("flags", [[], ["--submodel", "pytorch_model_fsdp_0"]], ids=["default", "submodel"])
def test_hf_trainer_fsdp_sharded_save_skips_the_optimizer_folder(tmp_path: Path, flags: list[str]) -> None:
    """``optimizer_0/`` beside ``pytorch_model_fsdp_0/`` was fatal ("only optimizer state") and
    ``--submodel pytorch_model_fsdp_0`` an error: the optimizer folder is skipped with a notice, the
    model folder averaged across the checkpoint-N folders, equal to the float64 reference, and the
    output loads into the model."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ema_average.cli.app import app
    from helpers import float64_reference

    model, saved = hf_trainer_fsdp_run(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    result = CliRunner().invoke(app, [str(tmp_path / "run"), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    assert "skipped optimizer_0 in 3 checkpoints" in result.output
    assert "only optimizer state" in result.output
    expected = float64_reference([saved[s] for s in (2, 4, 6)], [2, 4, 6], decay=0.9999)
    averaged = load_file(out)
    assert set(averaged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(averaged[name].double(), tensor, rtol=1e-6, atol=1e-7)
    model.load_state_dict(averaged)  # every name the model has, no other
