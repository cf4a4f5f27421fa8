"""litgpt's LoRA adapters: ``finetune_lora`` saves ``out/step-{N:06d}/lit_model.pth.lora`` (and
``final/lit_model.pth.lora`` beside the merged ``final/lit_model.pth``).

Each is ``torch.save({"model": {name: tensor}})`` of the ``lora_`` parameters only
(``litgpt/finetune/lora.py``, ``save_lora_checkpoint``): a torch file under a suffix of its own, read as
the torch layout reads any (``weights_only``, lazily). The layout's name says in the plan that the average
is of adapter weights, not of a whole model.
"""

from __future__ import annotations

from pathlib import Path

from ema_average.checkpoints.base import Checkpoint, Layout, OpenOptions
from ema_average.checkpoints.contents.keys import is_side_file
from ema_average.checkpoints.registry import open_weights_file

SUFFIX = ".pth.lora"
NAME = "litgpt LoRA adapter (lora_ weights only)"


def _claims(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIX) and not is_side_file(path.name)


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    ckpt = open_weights_file(path, options)  # a torch file, named as litgpt's
    ckpt.layout = NAME  # as the plan names it
    return ckpt


LAYOUT = Layout("litgpt-lora", "file", f"litgpt LoRA adapters (*{SUFFIX})", _claims, _open)
