"""The callbacks' saved record, read back on resume: untrusted input, checked as ``load_state_dict`` checks a
state, before any of it is used. Every refusal is one line that names the file and, where there is one, says
what the user of a callback (not of the engine) can do about it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ema_average.engine.averages import ExponentialMovingAverage, local_part
from ema_average.engine.decay_rules import DecayRule
from ema_average.errors import AverageStateError, ConfigurationError

__all__ = ["STATE_KEYS", "Pending", "checked_record", "checked_settings", "finite", "record_of"]

# The trainer-independent part of the callbacks' saved state (beside the averages themselves).
STATE_KEYS = ("method", "settings", "num_applied", "last_step")


@dataclass
class Pending:
    """A record read from a checkpoint and checked on its own, waiting for the model it belongs to."""

    method: object
    settings: object
    num_applied: object  # checked by the engine's load_state_dict
    last_step: int
    averages: Mapping[str, Any]
    where: str


def record_of(average: ExponentialMovingAverage, last_step: int) -> dict[str, Any]:
    """What resuming needs beside the averages: the rule, the update count, the last step."""
    return {
        "method": average.registered_name,
        "settings": average.settings(),
        "num_applied": average.num_applied,
        "last_step": last_step,
    }


def checked_record(state: object, averages: object, where: str) -> Pending:
    """A saved record and its averages, checked on their own: anything but the mapping :func:`record_of`
    writes (empty, ``null``, a list) is refused, never taken as "no average" (that would throw the saved
    one away and start anew)."""
    if not isinstance(state, Mapping):
        raise AverageStateError(
            f"{where}: the EMA callback's saved state must be the mapping it writes, got "
            f"{type(state).__name__} {shown(state)}"
        )
    if not state:
        raise AverageStateError(
            f"{where}: the EMA callback's saved state is empty: the checkpoint holds no average to "
            "continue; resume from a checkpoint saved with the callback, or start a new run from these "
            "weights"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise AverageStateError(f"{where}: the EMA callback's saved state lacks {', '.join(missing)}")
    if not isinstance(averages, Mapping):
        raise AverageStateError(
            f"{where}: the EMA callback's saved averages must be a mapping of tensors, got "
            f"{type(averages).__name__}"
        )
    last_step = saved_step(where, state["last_step"])
    num_applied = state["num_applied"]
    if isinstance(num_applied, int) and not isinstance(num_applied, bool) and num_applied > last_step:
        raise AverageStateError(
            f"{where}: the EMA callback's saved state counts {num_applied} updates by step {last_step}: "
            "at most one update a step; the record is inconsistent"
        )
    return Pending(state["method"], state["settings"], num_applied, last_step, averages, where)


def checked_settings(average: ExponentialMovingAverage, rule: DecayRule, pending: Pending) -> None:
    """The saved rule is this callback's, or a refusal whose advice a callback's user can follow (the
    engine's own advises ``load_state_dict(settings=...)``, which a callback does not take)."""
    where, name = pending.where, average.registered_name
    if pending.method != name:
        raise AverageStateError(
            f"{where}: the saved average is {pending.method!r}, this callback keeps {name!r}"
        )
    settings = pending.settings
    try:
        saved = type(average).make_rule(**settings) if isinstance(settings, Mapping) else None
    except (ConfigurationError, TypeError, ValueError):
        saved = None
    if saved is None:
        raise AverageStateError(f"{where}: the saved settings {shown(settings)} are not an {name} average's")
    if saved != rule:
        raise AverageStateError(
            f"{where}: the EMA was saved with {settings_text(saved.settings())}, this callback has "
            f"{settings_text(rule.settings())}; build EMACallback({settings_text(saved.settings())}) "
            "to continue it"
        )


def saved_step(where: str, value: Any) -> int:
    """The trainer step of the last update, as saved: a whole number >= 0 (2.7 is not truncated to 2)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AverageStateError(
            f"{where}: the EMA callback's saved last_step must be a whole number >= 0, got {value!r}"
        )
    return value


def finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a saved average (this rank's part of a DTensor) is finite."""
    return bool(torch.isfinite(local_part(tensor)).all())


def shown(value: object, limit: int = 60) -> str:
    """A short repr of an untrusted value for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())
