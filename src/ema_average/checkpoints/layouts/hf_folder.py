"""Folders written by ``save_pretrained`` and the trainers built on it: one model's weights, one file or
shards behind an index.

The Hugging Face Trainer's ``checkpoint-N/``, PEFT adapters (``adapter_model.safetensors``), diffusers models
(``diffusion_pytorch_model.safetensors``) and LoRA weights (``pytorch_lora_weights.safetensors``), torchtune's
``epoch_E/`` shards, accelerate's ``save_state`` folders. Where a folder holds several of these (torchtune
saves the merged model and the adapter), the full model is read and the others are named with the
``--submodel`` that reads them. The reading is :mod:`.save_pretrained`'s.
"""

from __future__ import annotations

from pathlib import Path

from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions
from ema_average.checkpoints.layouts.save_pretrained import (
    HfFolderCheckpoint,
    is_hf_folder,
    own_model,
    save_count,
    side_file_problem,
    side_file_step,
    weight_sets,
)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return HfFolderCheckpoint(path, trust_pickle=options.trust_pickle, submodel=options.submodel)


LAYOUT = Layout(
    "hf-folder",
    "folder",
    "Hugging Face folders (checkpoint-N/ with model.safetensors or pytorch_model.bin, shards behind an index, "
    "adapter_model.*, diffusion_pytorch_model.*)",
    is_hf_folder,
    _open,
    models=weight_sets,
    side_step=side_file_step,
    side_step_problem=side_file_problem,
    name_step=save_count,
    own_model=own_model,
)
