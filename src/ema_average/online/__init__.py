"""EMA callbacks for training frameworks: thin adapters over the one engine.

``ema_average.online.lightning.EMACallback`` (a ``lightning.pytorch.Callback``) and
``ema_average.online.transformers.EMACallback`` (a ``transformers.TrainerCallback``) keep an
:class:`~ema_average.ExponentialMovingAverage` of the model's parameters while it trains. What they share
lives here, free of either framework, so the package imports without them: when to update (once per
optimizer step, ``num_updates`` = the trainer's global step), swapping the averages in for evaluation,
the state saved with the trainer's checkpoint and read back on resume, and the refusal of models whose
parameters are not there between steps (DeepSpeed ZeRO-3).

One module per job: ``tracker`` (the averages while training: updates, swaps, several EMAs), ``records``
(the saved record checked on resume), ``models`` (what is read from a model: its averaged parameters, the
averaged state dict, a digest of the training weights).
"""

from __future__ import annotations

from ema_average.online.models import (
    average_model_state,
    averaged_parameters,
    averaged_tensors,
    unwrap_model,
    weights_digest,
)
from ema_average.online.records import STATE_KEYS
from ema_average.online.tracker import DEFAULT_NAME, EVALUATE_CHOICES, EmaTracker, default_names

__all__ = [
    "DEFAULT_NAME",
    "EVALUATE_CHOICES",
    "STATE_KEYS",
    "EmaTracker",
    "average_model_state",
    "averaged_parameters",
    "averaged_tensors",
    "default_names",
    "unwrap_model",
    "weights_digest",
]
