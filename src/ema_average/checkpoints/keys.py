"""Names trainers give things, in one place: where steps and weights are kept, which files are not weights.

Every layout reads these lists; none keeps a private copy, so a key learnt for one producer is known to all.
"""

from __future__ import annotations

# Where a training step is recorded, most specific first (torch dicts, safetensors metadata, DCP tensors).
# ``global_steps`` is DeepSpeed's; ``num_updates`` fairseq's; ``global_step`` Lightning's and HF's.
STEP_KEYS = (
    "global_step",
    "step",
    "num_updates",
    "iteration",
    "iter",
    "steps",
    "train_step",
    "global_steps",
)

# A count of epochs, not of steps (timm's ``epoch``): used only when nothing better is known, and flagged.
EPOCH_KEYS = ("epoch",)

# Where trainers put the model's weights, most common first. Raw weights come before averaged ones, so
# that a file holding both is read for its raw weights unless --state-dict-key says otherwise.
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "module",
    "model_state_dict",
    "model_state",
    "net",
    "network",
    "params",
    "weights",
    "ema",
    "model_ema",
    "ema_state_dict",
)

# Averaged weights that trainers keep beside the raw ones: timm ``state_dict_ema``, fairseq
# ``extra_state.ema``, Lightning EMAWeightAveraging (which moves the raw weights to ``current_model_state``).
EMA_MARKERS = ("ema", "swa", "averaged")

# Suffixes of single files that may hold weights (``.pth.tar``: timm and the ImageNet example scripts).
CHECKPOINT_SUFFIXES = (".pth.tar", ".pt.tar", ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th")

# Files and folders trainers write beside the weights that are never a model: optimizer and scheduler
# state, RNG state, arguments, loss scalers, torchtune's ``recipe_state/``, DeepSpeed's optimizer shards.
SIDE_MARKERS = (
    "optimizer",
    "optim_states",
    "scheduler",
    "rng_state",
    "random_states",
    "training_args",
    "scaler",
    "recipe_state",
)


def is_ema_name(name: str) -> bool:
    """Whether a key or folder name says it holds an average (``unet_ema``, ``state_dict_ema``, ``ema``)."""
    parts = name.lower().replace("-", "_").replace(".", "_").split("_")
    return any(marker in parts for marker in EMA_MARKERS)


def is_side_file(name: str) -> bool:
    """Whether a file or folder name marks trainer state that is not model weights."""
    lower = name.lower()
    return any(marker in lower for marker in SIDE_MARKERS)
