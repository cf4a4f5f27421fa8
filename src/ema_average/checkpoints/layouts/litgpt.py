"""litgpt's checkpoints, read as the torch files they are and written back as litgpt loads them.

``pretrain`` and ``finetune`` save ``out/step-{N:08d}/lit_model.pth`` (``fabric.save`` of ``{model,
optimizer, iter_num, step_count}``) with ``model_config.yaml`` beside it; ``finetune_lora`` saves
``out/step-{N:06d}/lit_model.pth.lora``, ``torch.save({"model": {name: tensor}})`` of the ``lora_``
parameters only (``litgpt/finetune/lora.py``, ``save_lora_checkpoint``), with ``hyperparameters.yaml``; the
last save goes to ``final/``. Both are read as the torch layout reads any torch file (``weights_only``,
lazily); the LoRA files' layout name says in the plan that the average is of adapter weights, not of a
whole model.

A folder output (``-o DIR/``) is what litgpt loads: the averaged plain state dict as one ``torch.save``
file under the input's name (``lit_model.pth``, ``lit_model.pth.lora``), with ``model_config.yaml``,
``hyperparameters.yaml``, ``config.json`` and the tokenizer files from the latest step, else from the run's
``final/`` (what litgpt's ``copy_config_files`` puts there).
"""

from __future__ import annotations

from pathlib import Path

from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions, SavedModel, SavedWeights
from ema_average.checkpoints.contents.keys import is_side_file, loader_files
from ema_average.checkpoints.registry import open_weights_file

MODEL = "lit_model.pth"  # and lit_model.pth.lora for a LoRA's weights
LORA_SUFFIX = ".pth.lora"
LORA_NAME = "litgpt LoRA adapter (lora_ weights only)"
# What litgpt reads beside lit_model.pth (the model's config; a LoRA's hyperparameters for merge_lora),
# besides the loader files (tokenizer, config.json) of keys.py.
SIDE_FILES = ("model_config.yaml", "hyperparameters.yaml")
FINAL = "final"  # the run's last save, beside the step folders


def _claims(path: Path) -> bool:
    name = path.name
    return name == MODEL or (name.lower().endswith(LORA_SUFFIX) and not is_side_file(name))


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    ckpt = open_weights_file(path, options)  # a torch file, under litgpt's names
    if path.name.lower().endswith(LORA_SUFFIX):
        ckpt.layout = LORA_NAME  # as the plan names it
    if path.name.startswith(MODEL):
        ckpt.saved_as = saved_model(path)
    return ckpt


def saved_model(path: Path) -> SavedModel:
    """A litgpt weights file ``path`` as a folder output gives it back: one torch file of the same name,
    its configs from its step folder, else from the run's ``final/`` (the run folder then bounds them)."""
    step = path.parent
    final = step.parent / FINAL
    has_final = final.is_dir()
    return SavedModel(
        step,
        path.name,
        weights=(SavedWeights(path.name),),
        side_files=loader_files(path.name, SIDE_FILES),
        fallback=final if has_final else None,
        unit=final.parent if has_final else step,
    )


LAYOUT = Layout(
    "litgpt",
    "file",
    f"litgpt checkpoints ({MODEL}, *{LORA_SUFFIX})",
    _claims,
    _open,
)
