"""A PEFT model's EMA saved as PEFT saves an adapter: ``adapter_model.safetensors`` under PEFT's own keys
(no adapter name in them: ``lora_A.weight``, not ``lora_A.default.weight``) beside ``adapter_config.json``,
so that ``PeftModel.from_pretrained(base, "checkpoint-N/ema")`` loads the averaged adapter. The key mapping is
PEFT's (``get_peft_model_state_dict``), not restated here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_keys",
    "adapter_state",
    "is_peft_model",
    "save_adapter_config",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME


def is_peft_model(model: torch.nn.Module) -> bool:
    """Decided by structure: a model carrying PEFT adapter configurations."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, Mapping) and bool(configs)


def _adapter_name(model: torch.nn.Module) -> str:
    active = getattr(model, "active_adapter", "default")
    return active if isinstance(active, str) else active[0]


def adapter_keys(model: torch.nn.Module) -> dict[str, str]:
    """The model's state-dict key of each tensor PEFT saves for the active adapter -> PEFT's saved key."""
    from peft.utils import get_peft_model_state_dict

    full = model.state_dict(keep_vars=True)
    by_identity = {id(t): key for key, t in full.items()}
    saved = get_peft_model_state_dict(model, state_dict=dict(full), adapter_name=_adapter_name(model))
    return {by_identity[id(t)]: key for key, t in saved.items() if id(t) in by_identity}


def adapter_state(model: torch.nn.Module, averaged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged model's state (``average_model_state``) under PEFT's saved keys, the adapter alone."""
    return {saved: averaged[key] for key, saved in adapter_keys(model).items()}


def save_adapter_config(model: torch.nn.Module, folder: Path) -> None:
    configs: Mapping[str, Any] = getattr(model, "peft_config", {})
    configs[_adapter_name(model)].save_pretrained(str(folder))
