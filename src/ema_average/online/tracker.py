"""The averages of one model while it trains, and the bookkeeping both callbacks need around them.

One tracker keeps one or several EMAs (``decay=[0.999, 0.9999]``), each an engine instance under its own
name, all updated at the same optimizer steps from the same parameters. Whatever else wants to act at each
update (post-hoc snapshots every N steps) is ``beside``, called by :meth:`EmaTracker.step` at every optimizer
step with the training weights in the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch

from ema_average.engine.averages import ExponentialMovingAverage, local_part
from ema_average.engine.decay_rules import ExponentialRule
from ema_average.engine.kernel import checked_average_dtype
from ema_average.engine.parameters import fsdp_modules
from ema_average.errors import AverageStateError, ConfigurationError
from ema_average.online.models import (
    averaged_tensors,
    laid_out_as,
    refuse_unsupported,
    unwrap_model,
)
from ema_average.online.records import Pending, checked_record, checked_settings, finite, record_of

__all__ = [
    "AT_END_CHOICES",
    "BUFFER_CHOICES",
    "DEFAULT_NAME",
    "EVALUATE_CHOICES",
    "EmaTracker",
    "default_names",
]

# What validation and test run on: the averages (swapped in), the training weights, or both (the raw
# weights' metrics logged under their own names).
EVALUATE_CHOICES = ("ema", "raw", "both")
# What the model holds when training ends: the training weights (the default: the model is what the
# optimizer made, as without the callback) or the (first) EMA.
AT_END_CHOICES = ("raw", "ema")
# Floating-point buffers the model saves (batch-norm statistics): averaged like the parameters (the
# default, as timm and Lightning's EMAWeightAveraging), or the model's own copied into the EMA.
BUFFER_CHOICES = ("average", "copy")
DEFAULT_NAME = "ema"  # the first (or only) EMA's name: the .ckpt key, the HF folder, --submodel ema

# The tracker whose averages are in a model now: a second tracker of the same model never swaps its own in
# on top (its restore would put the first one's averages back as the training weights).
_SWAPPED: weakref.WeakKeyDictionary[torch.nn.Module, EmaTracker] = weakref.WeakKeyDictionary()
# The trackers following a model, to refuse two that would save under one name in the same run.
_FOLLOWING: weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet[EmaTracker]] = (
    weakref.WeakKeyDictionary()
)


def default_names(decays: Sequence[float]) -> list[str]:
    """``ema`` for the first decay, ``ema_<decay>`` for each other one."""
    return [DEFAULT_NAME] + [f"{DEFAULT_NAME}_{decay!r}" for decay in decays[1:]]


@dataclass
class _Slot:
    """One EMA: its name, its rule, the engine once built, and a saved record waiting for it."""

    name: str
    rule: ExponentialRule
    average: ExponentialMovingAverage | None = None
    pending: Pending | None = None


class EmaTracker:
    """The averages of one model while it trains.

    The engines are built once the trainer has placed the model (on its device, inside its wrappers): a
    state read from a checkpoint before that is kept and loaded into them then.
    """

    def __init__(
        self,
        decay: float | Sequence[float],
        numerator: float,
        denominator: float,
        *,
        device: torch.device | str | None,
        every: int,
        evaluate: str,
        names: Sequence[str] | None = None,
        at_end: str = "raw",
        buffers: str = "average",
        start_step: int = 0,
        should_update: Callable[[int], bool] | None = None,
        dtensor_refusal: str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> None:
        decays = _decays(decay)
        rules = [
            ExponentialMovingAverage.make_rule(decay=d, numerator=numerator, denominator=denominator)
            for d in decays
        ]  # bad settings fail here, before training starts
        self.slots = [_Slot(n, r) for n, r in zip(_names(names, decays), rules, strict=True)]  # type: ignore[arg-type]  # ExponentialRules (make_rule is typed for any rule)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"every must be a whole number of optimizer steps >= 1, got {every!r}")
        if evaluate not in EVALUATE_CHOICES:
            raise ConfigurationError(
                f"evaluate must be one of {', '.join(EVALUATE_CHOICES)}, got {evaluate!r}"
            )
        if at_end not in AT_END_CHOICES:
            raise ConfigurationError(f"at_end must be one of {', '.join(AT_END_CHOICES)}, got {at_end!r}")
        self.at_end = at_end
        if buffers not in BUFFER_CHOICES:
            raise ConfigurationError(f"buffers must be one of {', '.join(BUFFER_CHOICES)}, got {buffers!r}")
        self.buffers = buffers
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigurationError(f"start_step must be a whole number of steps >= 0, got {start_step!r}")
        if should_update is not None and not callable(should_update):
            raise ConfigurationError(
                f"should_update must be a function of the global step, got {should_update!r}"
            )
        self.start_step = start_step
        self.should_update = should_update
        self.device = device
        self.average_dtype = checked_average_dtype(average_dtype)  # refused before training starts
        self.every = every
        self.evaluate = evaluate
        self.dtensor_refusal = dtensor_refusal
        self.model: torch.nn.Module | None = None
        self.tracked: list[tuple[str, torch.Tensor]] = []  # the parameters (and buffers) averaged, by name
        self.last_step = 0  # the global step of the last update (or of the start)
        self.swapped: _Slot | None = None  # whose averages are in the model, the training weights kept aside
        self._fsdp: list[torch.nn.Module] = []  # FSDP2 modules, resharded around a swap
        # called at every optimizer step, the training weights in the model (post-hoc snapshots)
        self.beside: Callable[[int], None] | None = None

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]

    @property
    def average(self) -> ExponentialMovingAverage | None:
        """The first EMA's engine: the one evaluated and saved under ``ema``."""
        return self.slots[0].average

    def averages(self) -> dict[str, ExponentialMovingAverage]:
        """Every EMA's engine by name, once built."""
        return {slot.name: slot.average for slot in self.slots if slot.average is not None}

    def _slot(self, name: str | None) -> _Slot:
        for slot in self.slots:
            if name is None or slot.name == name:
                return slot
        raise ConfigurationError(f"no EMA is named {name!r}; this callback keeps {', '.join(self.names)}")

    # --- building ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the averages (a new run): the next :meth:`start` builds them anew."""
        self.swap_out()
        for slot in self.slots:
            slot.average = None

    def start(
        self, model: torch.nn.Module, global_step: int, *, training: bool, owner: object = None
    ) -> None:
        """The averages of ``model``, with any state read from a checkpoint loaded into them.

        Built anew for another model, or when training starts from an earlier step than the last update (a
        new run with a callback used before): continuing an average from a later step would skip every
        update up to it. An evaluation on its own (a new trainer, step 0) uses the averages as they are.
        ``owner`` (the trainer's run) is how two callbacks of one run that would save under one name are
        told apart from a callback of an earlier run.
        """
        model = unwrap_model(model)
        went_back = training and global_step < self.last_step
        if self.average is None or self.model is not model or went_back:
            refuse_unsupported(model, self.dtensor_refusal)
            self.swap_out()  # never leave the averages in a model this tracker stops following
            self.tracked = averaged_tensors(model, self.buffers)
            for slot in self.slots:
                slot.average = self._engine(slot)
            self.model = model
            self._fsdp = fsdp_modules(model)
            self.last_step = global_step
        self._follow(model, owner)
        for slot in self.slots:
            if slot.pending is not None:
                pending, slot.pending = slot.pending, None
                self._load(slot, pending, global_step, training=training)

    def _engine(self, slot: _Slot) -> ExponentialMovingAverage:
        return ExponentialMovingAverage.with_rule(  # type: ignore[return-value]  # of the class it is called on
            self.tracked, slot.rule, device=self.device, average_dtype=self.average_dtype
        )

    def _follow(self, model: torch.nn.Module, owner: object) -> None:
        """Refuse a second callback of the same run that would save its EMA under a name this one uses."""
        self.owner = owner
        following = _FOLLOWING.setdefault(model, weakref.WeakSet())
        for other in list(following):
            clash = set(other.names) & set(self.names)
            if other is not self and owner is not None and getattr(other, "owner", None) is owner and clash:
                raise ConfigurationError(
                    f"two EMA callbacks of this run would save under {sorted(clash)[0]!r}: give one of them "
                    "its own names=[...], or keep both in one EMACallback(decay=[...])"
                )
        following.add(self)

    # --- updating ---------------------------------------------------------------------------------

    def step(self, global_step: int) -> bool:
        """Update after an optimizer step: once per global step, every ``every`` steps; whether it did.

        ``every == 1`` is ``apply(num_updates=global_step)``, the library's own loop. With gaps, the update
        takes the product of the skipped steps' decays (the offline ``--schedule step`` rule), so the
        average stays that of every step's weights as nearly as the values seen allow.
        """
        if self.average is None:
            return False
        other = _SWAPPED.get(self.model) if self.model is not None else None
        if other is not None and other is not self and other.swapped is not None:
            # another callback swapped its EMA in for an evaluation after this step: update from the
            # training weights, then put its EMA back
            name = other.swapped.name
            other.swap_out()
            try:
                return self._step(global_step)
            finally:
                other.swap_in(name, evaluating=False)
        return self._step(global_step)

    def _step(self, global_step: int) -> bool:
        if self.beside is not None:
            self.beside(global_step)
        if global_step <= self.last_step or global_step % self.every:
            return False
        if global_step <= self.start_step:  # not started: the EMA follows the weights (timm's rule)
            self._restart(global_step)
            return False
        if self.should_update is not None and not self.should_update(global_step):
            return False  # skipped: the next update takes the skipped steps' decays (the gap rule)
        return self._update(global_step)

    def _restart(self, global_step: int) -> None:
        """Every EMA anew from the current weights, as at the start of training at ``global_step``."""
        self.swap_out()
        for slot in self.slots:
            slot.average = self._engine(slot)
        self.last_step = global_step

    def ema_model(self, name: str | None = None) -> torch.nn.Module | None:
        """A copy of the model holding an EMA (the first by default), for inference beside training.

        A whole copy of the model: memory for it is the caller's choice (the callbacks keep none).
        """
        slot = self._slot(name)
        if slot.average is None or self.model is None:
            return None
        self.swap_out()
        copy = deepcopy(self.model)
        averages = slot.average.averages()
        with torch.no_grad():
            for key, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
                if key in averages:
                    local_part(tensor).copy_(local_part(averages[key]))
        return copy

    def _update(self, global_step: int) -> bool:
        for slot in self.slots:
            assert slot.average is not None
            if global_step - self.last_step == 1:
                slot.average.apply(num_updates=global_step)
            else:
                values = [p for _, p in self.tracked]
                slot.average.update_with_decay(values, slot.rule.between(self.last_step, global_step))
        self.last_step = global_step
        return True

    # --- evaluation -------------------------------------------------------------------------------

    def swap_in(self, name: str | None = None, *, evaluating: bool = True) -> bool:
        """Put an EMA (the first by default) into the model, the training weights kept; whether it did.

        Not while another tracker's averages are in the same model: restoring after it would put them back
        as the training weights.
        """
        slot = self._slot(name)
        if slot.average is None or (evaluating and self.evaluate == "raw") or self.swapped is not None:
            return False
        assert self.model is not None
        holder = _SWAPPED.get(self.model)
        if holder is not None and holder is not self and holder.swapped is not None:
            return False
        self._reshard()
        slot.average.assign_average_value()
        self.swapped = slot
        _SWAPPED[self.model] = self
        return True

    def swap_out(self) -> None:
        """Put the training weights back, bit for bit, if an EMA is in."""
        if self.swapped is not None:
            assert self.swapped.average is not None
            self.swapped.average.restore()
            self.swapped = None
            if self.model is not None and _SWAPPED.get(self.model) is self:
                del _SWAPPED[self.model]
            self._reshard()

    def put_in(self, values: Mapping[str, torch.Tensor] | None = None) -> None:
        """Copy the first EMA (or ``values``, averages read from a file) into the model for good, no backup
        kept: what the model holds when training ends with ``at_end="ema"``."""
        self.swap_out()
        average = self.average
        if average is None:
            return
        source = average.averages() if values is None else values
        missing = [name for name, _ in self.tracked if name not in source]
        if missing:
            raise AverageStateError(f"no EMA of parameter {missing[0]!r} to put into the model")
        with torch.no_grad():
            for name, param in self.tracked:
                local_part(param).copy_(local_part(source[name]))
        self._reshard()

    @contextmanager
    def average_parameters(self, name: str | None = None) -> Iterator[None]:
        """Any of the EMAs swapped in for the ``with`` block (e.g. your own evaluation), restored after."""
        self.swap_out()
        if not self.swap_in(name, evaluating=False):
            raise AverageStateError(
                "no EMA to swap in: training has not started, or another EMA callback's is in the model"
            )
        try:
            yield
        finally:
            self.swap_out()

    def _reshard(self) -> None:
        """Drop FSDP2's gathered weights (local, no communication), as the engine does for a model given whole.

        The averages cover the trainable parameters only, so the engine is given them by name and does not
        know the modules: after a forward FSDP2's root keeps its gathered weights, and a forward after a swap
        would run on them rather than on the shards just swapped.
        """
        for module in self._fsdp:
            module.reshard()  # type: ignore[operator]  # an FSDPModule, typed by its nn.Module base

    # --- saving and resuming ----------------------------------------------------------------------

    def state(self, name: str | None = None) -> dict[str, Any]:
        """One EMA's record (the first's by default): what resuming needs beside its averages."""
        slot = self._slot(name)
        return {} if slot.average is None else record_of(slot.average, self.last_step)

    def load(self, state: object, averages: object, where: str, name: str | None = None) -> None:
        """Resume one EMA (the first by default) from a saved record and averages, at the next :meth:`start`.

        The record is checked now, as ``load_state_dict`` checks a state (one line naming ``where``).
        """
        self._slot(name).pending = checked_record(state, averages, where)

    def _load(self, slot: _Slot, pending: Pending, global_step: int, *, training: bool) -> None:
        """Load a checked record into one EMA: all of it, or a one-line refusal naming the file."""
        average, where = slot.average, pending.where
        assert average is not None
        if training and pending.last_step > global_step:
            raise AverageStateError(
                f"{where}: the EMA callback's last update is at step {pending.last_step}, after the "
                f"trainer's step {global_step} restored from the same checkpoint: the record is not this "
                "checkpoint's (continuing it would skip every update up to that step)"
            )
        live = average.averages()
        saved_averages = pending.averages
        absent = [n for n in live if n not in saved_averages]
        if absent:
            raise AverageStateError(
                f"{where}: holds no EMA of parameter {absent[0]!r} ({len(absent)} missing); "
                "was it saved from another model?"
            )
        checked_settings(average, slot.rule, pending)
        chosen = {}
        for name, tensor in live.items():
            saved = saved_averages[name]
            if isinstance(saved, torch.Tensor) and saved.is_floating_point() and not finite(saved):
                raise AverageStateError(
                    f"{where}: the saved EMA of parameter {name!r} holds NaN or infinite values; "
                    "continuing it would carry them into every later save"
                )
            chosen[name] = laid_out_as(tensor, saved)
        state = {
            "method": pending.method,
            "settings": pending.settings,
            "num_applied": pending.num_applied,
            "averages": chosen,
        }
        try:
            average.load_state_dict(state, settings="state")  # the settings checked just above
        except AverageStateError as exc:
            raise AverageStateError(f"{where}: {exc}") from None
        self.last_step = pending.last_step


def _decays(decay: float | Sequence[float]) -> list[float]:
    """One decay or several (a list or tuple, at least one)."""
    if isinstance(decay, list | tuple):
        if not decay:
            raise ConfigurationError("decay must be a number or a non-empty list of numbers, got []")
        return list(decay)
    return [decay]  # type: ignore[list-item]  # not a list or tuple: one decay


def _names(names: Sequence[str] | None, decays: Sequence[float]) -> list[str]:
    """Each EMA's name: given, one per decay, distinct, usable as a folder and a checkpoint key."""
    if names is None:
        chosen = default_names(decays)
    elif isinstance(names, str) or len(names) != len(decays):
        raise ConfigurationError(
            f"names must be a list with one name per decay ({len(decays)}), got {names!r}"
        )
    else:
        chosen = list(names)
    for name in chosen:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ConfigurationError(
                f"an EMA's name must be a folder name (no '/', not hidden), got {name!r}"
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigurationError(f"each EMA needs its own name, got {chosen!r}; pass names=[...]")
    return chosen
