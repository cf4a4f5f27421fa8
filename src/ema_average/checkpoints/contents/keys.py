"""Names trainers give things, in one place: where steps and weights are kept, which files are not weights.

Every layout reads these lists; none keeps a private copy, so a key learnt for one producer is known to all.
"""

from __future__ import annotations

import re
from typing import Literal

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

# Step counters that trainers keep one or two levels down, in their trainer-state containers, tried after
# the top-level STEP_KEYS and before any epoch count: ignite ``trainer.iteration`` (Engine.state_dict),
# mmengine ``meta.iter``, torchtnt ``[app_state.]train_progress.num_steps_completed``, torchtitan
# ``train_state.step``, litgpt ``step_count`` (optimizer steps) then ``iter_num`` (micro-batches),
# ultralytics ``updates`` (EMA updates = optimizer steps). A counter inside a file wins over its name.
NESTED_STEP_KEYS: tuple[tuple[str, ...], ...] = (
    ("trainer", "iteration"),
    ("meta", "iter"),
    ("train_progress", "num_steps_completed"),
    ("app_state", "train_progress", "num_steps_completed"),
    ("train_state", "step"),
    ("step_count",),
    ("iter_num",),
    ("updates",),
)

# How an epoch count found inside a file is based, most specific first: (where, keys beside it that must be
# there, the first save's count). 1: epochs completed (mmengine ``meta.epoch = runner.epoch + 1``; open_clip
# ``{epoch: completed_epoch, name, state_dict, optimizer}``); 0: the index of the epoch just done (timm
# ``version`` 2, ultralytics, torch's ``for epoch in range(n)``). ``--step-every N`` makes count n the step
# (n + 1 - first) x N.
EPOCH_COUNTERS: tuple[tuple[tuple[str, ...], tuple[str, ...], int], ...] = (
    (("meta", "epoch"), (), 1),
    (("epoch",), ("name",), 1),
    (("epoch",), (), 0),
)

# The words an origin ends with where its count starts at 1 (a count from 0 says nothing more).
COUNTED_FROM_1 = " (epochs completed, from 1)"

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

# Weights saved by other frameworks, named when a folder holds nothing else: read by none of the layouts.
FOREIGN_SUFFIXES = {".keras": "Keras", ".weights.h5": "Keras", ".h5": "Keras (HDF5)"}

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
    """Whether a file or folder name marks trainer state that is not model weights: a marker anywhere, or
    the word ``optim`` without ``model`` (Megatron's ``distrib_optim.pt``; its ``model_optim_rng.pt`` holds
    the model)."""
    lower = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lower))
    return any(marker in lower for marker in SIDE_MARKERS) or ("optim" in words and "model" not in words)


# What a container is, by its key (``contents.split``): the key lower-cased, ``-`` as ``_``, compared whole
# or, for the averages, by any ``_``-separated part (``state_dict_ema``, ``model_ema``).
OPTIMIZER_KEYS = (
    "optimizer",
    "optimizers",
    "optim",
    "optimizer_states",
    "optim_states",
    "optimizer_state_dict",
    "optimizer_state",
)
SCHEDULER_KEYS = (
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "schedulers",
    "param_schedulers",
    "lr_scheduler_state",
)
TRAINER_KEYS = (
    "train_state",
    "trainer_state",
    "train_progress",
    "dataloader",
    "data_loader",
    "sampler",
    "rng",
    "rng_state",
    "rng_states",
    "random_states",
    "loops",
    "callbacks",
    "message_hub",
    "meta",
    "scaler",
    "grad_scaler",
    "amp",
    "hyper_parameters",
    "hparams",
    "args",
    "train_args",
    "train_metrics",
    "loss_scaler",
    "train_dataloader",
    "dl_state_dict",
    "random_state",
    "numpy_random_seed",
    "torch_manual_seed",
    "torch_cuda_manual_seed",
    "runtime_info",
    "dataset_meta",
)

# Keys that hold a save's parts rather than name a module of the model: looked through in names split at
# their dots (DCP's ``app_state.module.x``, composer's ``state.model.x``). Elsewhere every lone container is.
CONTAINER_KEYS = (*STATE_DICT_KEYS, "app_state", "state", "model_and_optim")

# Per-parameter optimizer state as torch's optimizers name it (Adam/AdamW, SGD, RMSprop, Adagrad, Adadelta,
# Adamax, ASGD, Rprop, Adafactor...): ``<parameter>.exp_avg`` beside ``<parameter>`` is a moment, not a
# weight (a module's tensor has no children, so the pair cannot be two weights).
OPTIMIZER_MOMENTS = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "acc_delta",
    "sum",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
    "grad_avg",
    "mu_product",
    "step",
    "mu",
    "eta",
    "ax",
    "prev",
    "step_size",
    "exp_inf",
)


def kind_of_key(key: str) -> Literal["average", "optimizer", "scheduler", "trainer"] | None:
    """What a container named ``key`` holds, where its name says (``None``: nothing said). A number after
    the name counts one of several (Lightning's sharded save: ``optimizer_0``, ``optimizer_1``)."""
    lower = key.lower().replace("-", "_")
    name, _, number = lower.rpartition("_")
    if name and number.isdigit():
        lower = name
    if lower in OPTIMIZER_KEYS:
        return "optimizer"
    if lower in SCHEDULER_KEYS:
        return "scheduler"
    if lower in TRAINER_KEYS:
        return "trainer"
    if is_ema_name(key):
        return "average"
    return None


# What transformers, PEFT and diffusers read beside the weights (configs, tokenizers): the side files a
# folder output of a layout built on them may copy; nothing else is ever copied. litgpt's
# ``copy_config_files`` copies the same tokenizer files and ``config.json``.
LOADER_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "adapter_config.json",
    "scheduler_config.json",
    "preprocessor_config.json",
)
# Loader files that belong beside one kind of weights only: transformers' from_pretrained, finding an
# adapter_config.json beside full weights, would try to load an adapter instead.
_ONLY_WITH = {"adapter_config.json": "adapter_model.safetensors"}


def loader_files(weights_name: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The loader files (and a layout's ``extra`` ones) that may go beside weights named ``weights_name``."""
    return tuple(n for n in (*LOADER_FILES, *extra) if _ONLY_WITH.get(n, weights_name) == weights_name)
