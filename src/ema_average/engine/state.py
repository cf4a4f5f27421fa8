"""Checking a saved state before any of it is loaded: averages, update count and settings.

Its own module because a state is untrusted input (a file, another world size, other settings): each
check here names the key and the problem, and ``MovingAverage.load_state_dict`` loads all or nothing.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ema_average.engine.decay_rules import DecayRule
from ema_average.engine.dtensor_layouts import DTensorLayout, is_dtensor
from ema_average.errors import AverageStateError, ConfigurationError

MISSING = object()
_MAX_COUNT = 2**63 - 1  # a counter is an int64 wherever it is saved


def checked_count(value: object) -> int:
    """A saved ``num_applied``: a whole number in [0, 2**63) (not a bool, float, NaN or list)."""
    if value is MISSING:
        raise AverageStateError("state has no 'num_applied' (the number of updates in the averages)")
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= int(value) <= _MAX_COUNT
    ):
        raise AverageStateError(f"state's 'num_applied' must be a whole number >= 0, got {value!r}")
    return int(value)


def _tensor_problem(value: object) -> str | None:
    """Why a saved average cannot be copied into a float32/float64 one, or None."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if not value.is_floating_point():
        return f"has dtype {str(value.dtype).removeprefix('torch.')}, not a floating-point one"
    if value.layout != torch.strided:
        return f"is a {value.layout} tensor, not a dense one"
    if value.is_meta:
        return "is on the meta device: it holds no values"
    return None


def _settings_text(rule: DecayRule) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in rule.settings().items()) or "no settings"


def checked_averages(
    saved: object, names: Sequence[str], shapes: Sequence[torch.Size], layouts: Sequence[DTensorLayout | None]
) -> Mapping[str, torch.Tensor]:
    """The state's averages, each checked to load into its own: same names, global shapes, a
    floating-point dense tensor with data (not on the meta device), a DTensor on this mesh."""
    if not isinstance(saved, Mapping):
        raise AverageStateError("state has no 'averages' mapping; was it made by state_dict()?")
    for name in names:
        if name not in saved:
            raise AverageStateError(f"state has no average for {name!r}")
    tracked = set(names)
    for name in saved:
        if name not in tracked:
            raise AverageStateError(f"state has an average for {name!r}, which this average does not track")
    for name, shape, layout in zip(names, shapes, layouts, strict=True):
        value = saved[name]
        problem = _tensor_problem(value)
        if problem is None and tuple(value.shape) != tuple(shape):
            problem = f"has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if problem is None and is_dtensor(value) and layout is not None and value.device_mesh != layout.mesh:
            problem = (
                "is a DTensor on another device mesh; load it through torch.distributed.checkpoint "
                "into this average's state_dict() instead"
            )
        if problem is not None:
            raise AverageStateError(f"state's average {name!r} {problem}")
    return saved


def rule_of(
    state: Mapping[str, Any], settings: str, rule: DecayRule, rule_type: type[DecayRule], method: str
) -> DecayRule:
    """The rule an average of ``method`` (now with ``rule``) goes on with: ``rule``, or the state's
    (``settings="state"``), once the state's settings are known to build a ``rule_type`` and, under
    ``"check"``, to be ``rule``."""
    if settings == "keep":
        return rule
    saved = state.get("settings", MISSING)
    if not isinstance(saved, Mapping):
        found = "none" if saved is MISSING else f"a {type(saved).__name__}"
        raise AverageStateError(
            f"state's 'settings' must be the mapping state_dict() records, found {found}; "
            "load_state_dict(state, settings='keep') goes on with this average's"
        )
    try:
        loaded = rule_type.from_options(**saved)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise AverageStateError(
            f"state's 'settings' {dict(saved)!r} are not a {method} average's: {exc}"
        ) from None
    if settings == "check" and loaded != rule:
        raise AverageStateError(
            f"state was made with {_settings_text(loaded)}, this average has {_settings_text(rule)}; "
            "build the average with the saved settings, or pass settings='state' to take them or "
            "settings='keep' to keep this average's"
        )
    return loaded
