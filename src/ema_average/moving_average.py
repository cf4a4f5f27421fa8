"""Moving averages of named tensors: the one engine behind the library and the CLI.

The public shape follows AllenNLP's ``MovingAverage`` (a registrable base with ``apply``,
``assign_average_value`` and ``restore``) so its users feel at home, with what users of torch_ema,
timm and ema-pytorch ask for on top: float32 shadows whatever the parameter dtype, one multi-tensor
update per (device, dtype) group, shadows on another device, a state dict, a swap-in context manager,
and an update that takes any tensors (``update``), not only the tracked parameters, so the offline
pipeline streams checkpoint tensors through this very code.

This module knows nothing of files or of the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from ema_average.decay_rules import (
    DecayRule,
    ExponentialRule,
    PowerRule,
    UniformRule,
    check_unit,
)
from ema_average.errors import AverageStateError, ConfigurationError, ParameterError

NamedParameter = tuple[str, torch.Tensor]
Values = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
_M = TypeVar("_M", bound="type[MovingAverage]")

__all__ = [
    "ExponentialMovingAverage",
    "MovingAverage",
    "NamedParameter",
    "PowerFunctionMovingAverage",
    "UniformMovingAverage",
    "ema_update_",
    "shadow_dtype",
]


def shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype an average of ``dtype`` values is kept in: never narrower than float32.

    A bf16 shadow at decay 0.9999 adds 1e-4 * (value - shadow), which is below bf16's resolution
    for most weights, so the average silently stops moving; float32 has the headroom, float64 stays.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


# Mean tensor size from which mixed-dtype updates go through a float32 scratch instead of mul + add.
_SCRATCH_MIN_NUMEL = 1 << 16


def ema_update_(
    shadows: list[torch.Tensor], values: list[torch.Tensor], decay: float, flat: torch.Tensor | None = None
) -> None:
    """``shadow <- decay * shadow + (1 - decay) * value`` for every pair, in as few passes as the sizes allow.

    All ``shadows`` share one device and dtype, and so do all ``values`` (on the same device). Same dtypes
    take one fused multi-tensor ``lerp``. Mixed ones (bf16 values, fp32 shadows):

    - large tensors: each value is converted into one reused scratch of the shadow dtype, then ``lerp``:
      a pass fewer than mul + add, and no per-tensor float32 temporary (CPU type promotion allocates one
      per tensor: measured 578 ms against 245 ms for 100M parameters in 25 tensors);
    - many small tensors, where per-tensor calls cost more than the arithmetic: one ``mul`` over the
      ``flat`` buffer the shadows are views of (or a multi-tensor ``mul``) and a multi-tensor ``add``.
    """
    if not shadows:
        return
    weight = 1.0 - decay
    if shadows[0].dtype == values[0].dtype:
        torch._foreach_lerp_(shadows, values, weight)
        return
    if sum(v.numel() for v in values) >= _SCRATCH_MIN_NUMEL * len(values):
        scratch = torch.empty(
            max(v.numel() for v in values), dtype=shadows[0].dtype, device=shadows[0].device
        )
        for shadow, value in zip(shadows, values, strict=True):
            converted = scratch[: value.numel()].view(value.shape)
            converted.copy_(value)
            shadow.lerp_(converted, weight)
        return
    if flat is not None:
        flat.mul_(decay)
    else:
        torch._foreach_mul_(shadows, decay)
    torch._foreach_add_(shadows, values, alpha=weight)


def _check_num_updates(num_updates: int | None) -> None:
    if num_updates is not None and (not isinstance(num_updates, int) or num_updates < 0):
        raise ConfigurationError(f"num_updates must be a non-negative integer or None, got {num_updates!r}")


def _named_tensors(parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor]) -> list[NamedParameter]:
    """Materialise and validate what the user passed, so every later error is impossible."""
    items = list(parameters.items() if isinstance(parameters, Mapping) else parameters)
    if not items:
        raise ParameterError("no parameters to average: the iterable of (name, tensor) was empty")
    seen: set[str] = set()
    for name, tensor in items:
        if name in seen:
            raise ParameterError(f"parameter name {name!r} appears twice; names must be unique")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise ParameterError(f"parameter {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise ParameterError(
                f"parameter {name!r} has dtype {tensor.dtype}; only floating-point tensors can be averaged"
            )
    return items


@dataclass
class _Bucket:
    """Shadows of one (source device, source dtype) kind, as views into one flat buffer.

    One flat buffer lets the mixed-dtype update scale every shadow with a single op instead of one per
    tensor, which is most of the cost on models of many small tensors.
    """

    flat: torch.Tensor
    indices: list[int]
    shadows: list[torch.Tensor]
    sources: list[torch.Tensor]  # the tracked tensors themselves, for apply(); emptied by from_tensors


def _make_buckets(tensors: list[torch.Tensor], device: torch.device | None) -> list[_Bucket]:
    """Copy ``tensors`` into float32-or-wider flat buffers, one per (source device and dtype)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    buckets = []
    with torch.no_grad():
        for (src_device, src_dtype), indices in by_kind.items():
            flat = torch.empty(
                sum(tensors[i].numel() for i in indices),
                dtype=shadow_dtype(src_dtype),
                device=device or src_device,
            )
            shadows, offset = [], 0
            for i in indices:
                t = tensors[i]
                view = flat[offset : offset + t.numel()].view(t.shape)
                view.copy_(t.detach())
                shadows.append(view)
                offset += t.numel()
            buckets.append(_Bucket(flat, indices, shadows, [tensors[i] for i in indices]))
    return buckets


class MovingAverage:
    """Tracks a moving average of named tensors (AllenNLP's design, registrable by name).

    A new average is one registered subclass that names its ``rule_type`` (a :class:`DecayRule`, which
    says the decay of each update and builds itself from named settings); an ``__init__`` that spells
    those settings out is optional. The storage, the update kernel, swapping and saving live here, once,
    and the offline command finds the class and its rule through the registry alone.
    """

    # A hand-written registry: allennlp's ``Registrable`` would do, but allennlp pins an old torch.
    _registry: ClassVar[dict[str, type[MovingAverage]]] = {}
    default_implementation: ClassVar[str] = "exponential"
    registered_name: ClassVar[str] = ""

    @classmethod
    def register(cls, name: str) -> Callable[[_M], _M]:
        """Class decorator: make a subclass reachable through :meth:`by_name`."""

        def add(subclass: _M) -> _M:
            if name in MovingAverage._registry and MovingAverage._registry[name] is not subclass:
                raise ConfigurationError(f"a moving average named {name!r} is already registered")
            MovingAverage._registry[name] = subclass
            subclass.registered_name = name
            return subclass

        return add

    @classmethod
    def by_name(cls, name: str) -> type[MovingAverage]:
        """The registered implementation called ``name``."""
        try:
            return MovingAverage._registry[name]
        except KeyError:
            known = ", ".join(sorted(MovingAverage._registry))
            raise ConfigurationError(f"no moving average named {name!r}; available: {known}") from None

    @classmethod
    def list_available(cls) -> list[str]:
        """Registered names, the default first (as AllenNLP lists them)."""
        names = sorted(MovingAverage._registry)
        if cls.default_implementation in names:
            names.remove(cls.default_implementation)
            names.insert(0, cls.default_implementation)
        return names

    def __init__(
        self,
        parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        *,
        rule: DecayRule,
        device: torch.device | str | None = None,
    ) -> None:
        self.rule = rule
        items = _named_tensors(parameters)
        self._names = [name for name, _ in items]
        self._params: list[torch.Tensor] | None = [t for _, t in items]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._device = torch.device(device) if device is not None else None
        self._buckets = _make_buckets(self._params, self._device)
        self._shadows: list[torch.Tensor] = [torch.empty(0)] * len(self._params)
        for bucket in self._buckets:
            for i, view in zip(bucket.indices, bucket.shadows, strict=True):
                self._shadows[i] = view
        self._backups: list[torch.Tensor] | None = None
        self.num_applied = 0

    rule_type: ClassVar[type[DecayRule]]  # each implementation's rule; its settings build it

    @classmethod
    def make_rule(cls, **options: float) -> DecayRule:
        """This average's rule from settings given by name: how the offline plan gets the very rule the
        engine applies (``MovingAverage.by_name(method).make_rule(decay=0.999)``)."""
        return cls.rule_type.from_options(**options)

    @classmethod
    def with_rule(
        cls,
        parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        rule: DecayRule,
        *,
        device: torch.device | str | None = None,
    ) -> MovingAverage:
        """An average of this class with a rule built elsewhere, whatever the class's own signature."""
        if not isinstance(rule, cls.rule_type):
            raise ConfigurationError(f"a {cls.registered_name!r} average needs a {cls.rule_type.__name__}")
        average = cls.__new__(cls)
        MovingAverage.__init__(average, parameters, rule=rule, device=device)
        return average

    @classmethod
    def from_tensors(
        cls,
        tensors: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        *,
        rule: DecayRule | None = None,
        device: torch.device | str | None = None,
        **settings: float,
    ) -> MovingAverage:
        """An average started from ``tensors`` that keeps no reference to them.

        For streaming (the offline pipeline): holding the first checkpoint's tensors alive for the
        whole run would double memory. Such an average is fed through :meth:`update` only. Give the
        ``rule``, or the settings it is made from.
        """
        average = cls.with_rule(tensors, rule or cls.make_rule(**settings), device=device)
        average._params = None
        for bucket in average._buckets:
            bucket.sources = []
        return average

    # --- the decay each update gets ---------------------------------------------------------------

    def decay_for(self, num_updates: int | None) -> float:
        """Decay of the next update, by this average's rule (``num_applied + 1`` values are in it)."""
        return self.rule.at(num_updates, self.num_applied + 1)

    # --- updating -----------------------------------------------------------------------------------

    def apply(self, num_updates: int | None = None) -> None:
        """Update the averages from the current values of the tracked parameters."""
        self._require_params()
        _check_num_updates(num_updates)
        decay = self.decay_for(num_updates)
        # Buckets were made from these very tensors, so each is one device and dtype: no checks, no
        # per-tensor Python work beyond the kernel's own (it is most of the time on many small tensors).
        with torch.no_grad():
            for bucket in self._buckets:
                sources = bucket.sources
                if sources[0].device != bucket.flat.device:
                    sources = [v.to(bucket.flat.device, non_blocking=True) for v in sources]
                ema_update_(bucket.shadows, sources, decay, flat=bucket.flat)
        self.num_applied += 1

    def update(self, values: Values, num_updates: int | None = None) -> None:
        """Update the averages from ``values`` (by name, or in construction order) with this average's rule."""
        _check_num_updates(num_updates)
        self.update_with_decay(values, self.decay_for(num_updates))

    def update_with_decay(self, values: Values, decay: float) -> None:
        """Update with a decay computed elsewhere (e.g. the offline plan's gap-aware product)."""
        check_unit("decay", decay)
        self._update_buckets(self._ordered(values), decay)

    def _update_buckets(self, values: list[torch.Tensor], decay: float) -> None:
        """One multi-tensor update per bucket; values move to the shadows' device if they are elsewhere."""
        with torch.no_grad():
            for bucket in self._buckets:
                picked = [values[i].detach() for i in bucket.indices]
                device, dtype = picked[0].device, picked[0].dtype
                if any(v.device != device or v.dtype != dtype for v in picked):
                    for shadow, value in zip(bucket.shadows, picked, strict=True):  # rare: a mixed bucket
                        ema_update_([shadow], [value.to(shadow.device, non_blocking=True)], decay)
                    continue
                if device != bucket.flat.device:
                    picked = [v.to(bucket.flat.device, non_blocking=True) for v in picked]
                ema_update_(bucket.shadows, picked, decay, flat=bucket.flat)
        self.num_applied += 1

    def _ordered(self, values: Values) -> list[torch.Tensor]:
        """Values in shadow order, checked against the names and shapes this average holds."""
        if isinstance(values, Mapping):
            missing = [n for n in self._names if n not in values]
            if missing:
                raise ParameterError(
                    f"values are missing tensor {missing[0]!r} (and {len(missing) - 1} more)"
                )
            ordered = [values[n] for n in self._names]
        else:
            ordered = list(values)
            if len(ordered) != len(self._names):
                raise ParameterError(f"expected {len(self._names)} tensors, got {len(ordered)}")
        for name, shadow, value in zip(self._names, self._shadows, ordered, strict=True):
            if value.shape != shadow.shape:
                raise ParameterError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, the average has {tuple(shadow.shape)}"
                )
        return ordered

    # --- swapping averages in and out -------------------------------------------------------------

    def assign_average_value(self) -> None:
        """Copy the averages into the parameters, keeping their current values for :meth:`restore`."""
        params = self._require_params()
        if self._backups is not None:
            raise AverageStateError("the averages are already assigned; call restore() first")
        with torch.no_grad():
            self._backups = [p.detach().clone() for p in params]
            for p, shadow in zip(params, self._shadows, strict=True):
                p.copy_(shadow)

    def restore(self) -> None:
        """Put back the values saved by :meth:`assign_average_value`, bit for bit, and free the copy."""
        params = self._require_params()
        if self._backups is None:
            raise AverageStateError("restore() called without assign_average_value() before it")
        with torch.no_grad():
            torch._foreach_copy_(params, self._backups)
        self._backups = None

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Swap the averages in for the ``with`` block (e.g. evaluation), restoring even on error."""
        self.assign_average_value()
        try:
            yield
        finally:
            self.restore()

    def _require_params(self) -> list[torch.Tensor]:
        if self._params is None:
            raise AverageStateError("this average tracks no parameters (built by from_tensors)")
        return self._params

    # --- reading and saving -----------------------------------------------------------------------

    def averages(self) -> dict[str, torch.Tensor]:
        """The current averages by name (the live float32/float64 tensors, not copies)."""
        return dict(zip(self._names, self._shadows, strict=True))

    def all_finite(self) -> bool:
        """Whether every average is finite: one ``aminmax`` pass per flat buffer, no temporaries.

        NaN propagates through both reductions and Inf shows in one of them, so a single reduction
        per bucket replaces a per-tensor ``isfinite``. It reads a value back to the host (a sync on CUDA):
        call it between updates, not inside a training step's hot path.
        """
        for bucket in self._buckets:
            if bucket.flat.numel() == 0:
                continue
            low, high = torch.aminmax(bucket.flat)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return False
        return True

    def settings(self) -> dict[str, Any]:
        """The implementation's own settings, recorded in state dicts and output metadata."""
        return self.rule.settings()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this average later (shadows, settings, update count)."""
        return {
            "method": self.registered_name,
            "settings": self.settings(),
            "num_applied": self.num_applied,
            "averages": {name: shadow.detach().clone() for name, shadow in self.averages().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; names and shapes must match exactly (first mismatch named)."""
        saved = state.get("averages")
        if not isinstance(saved, Mapping):
            raise AverageStateError("state has no 'averages' mapping; was it made by state_dict()?")
        if state.get("method", self.registered_name) != self.registered_name:
            raise AverageStateError(
                f"state is of a {state['method']!r} average, this one is {self.registered_name!r}"
            )
        for name in self._names:
            if name not in saved:
                raise AverageStateError(f"state has no average for {name!r}")
        for name in saved:
            if name not in self._index:
                raise AverageStateError(
                    f"state has an average for {name!r}, which this average does not track"
                )
        for name, shadow in zip(self._names, self._shadows, strict=True):
            if tuple(saved[name].shape) != tuple(shadow.shape):
                raise AverageStateError(
                    f"state's {name!r} has shape {tuple(saved[name].shape)}, expected {tuple(shadow.shape)}"
                )
        with torch.no_grad():
            for name, shadow in zip(self._names, self._shadows, strict=True):
                shadow.copy_(saved[name])
        self.num_applied = int(state.get("num_applied", self.num_applied))


@MovingAverage.register("exponential")
class ExponentialMovingAverage(MovingAverage):
    """Exponential moving average with TensorFlow's warm-up rule (AllenNLP's "exponential").

    ``apply()`` uses ``decay``; ``apply(num_updates=n)`` uses
    ``min(decay, (numerator + n) / (denominator + n))``.
    """

    rule_type = ExponentialRule
    rule: ExponentialRule

    def __init__(
        self,
        parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        decay: float = ExponentialRule.decay,
        numerator: float = ExponentialRule.numerator,
        denominator: float = ExponentialRule.denominator,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        rule = self.make_rule(decay=decay, numerator=numerator, denominator=denominator)
        super().__init__(parameters, rule=rule, device=device)

    @property
    def decay(self) -> float:
        return self.rule.decay

    @property
    def numerator(self) -> float:
        return self.rule.numerator

    @property
    def denominator(self) -> float:
        return self.rule.denominator


@MovingAverage.register("uniform")
class UniformMovingAverage(MovingAverage):
    """The arithmetic mean of the starting values and every update (``num_updates`` is ignored).

    What fairseq's ``average_checkpoints.py`` and OpenNMT compute, in float32, streamed.
    """

    rule_type = UniformRule

    def __init__(
        self,
        parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(parameters, rule=self.make_rule(), device=device)


@MovingAverage.register("power")
class PowerFunctionMovingAverage(MovingAverage):
    """Karras et al.'s power-function EMA (EDM2): decay ``(1 - 1/t) ** (gamma + 1)`` at step ``t``.

    Give ``gamma`` or ``sigma_rel`` (the profile's relative width; EDM2 uses 0.05 to 0.10). ``apply()``
    without ``num_updates`` counts steps itself (the first update replaces the average).
    """

    rule_type = PowerRule

    def __init__(
        self,
        parameters: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        gamma: float | None = None,
        sigma_rel: float | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        given = {k: v for k, v in (("gamma", gamma), ("sigma_rel", sigma_rel)) if v is not None}
        super().__init__(parameters, rule=self.make_rule(**given), device=device)
