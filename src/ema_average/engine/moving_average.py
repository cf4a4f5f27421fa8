"""``MovingAverage``: the registry of averages by name and the engine every average is.

Its own module because it is the one class users meet: construction, ``apply``/``update``, swapping the
averages in and out, reading and saving. The storage (buckets), the kernel, DTensor layouts, parameter
slots and state checks it relies on each live in a sibling module; the averages themselves (exponential,
uniform, power) are registered in :mod:`.averages`.

This package knows nothing of files or of the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import is_
from typing import Any, ClassVar, TypeVar

import torch

from ema_average import plugins
from ema_average._platform.torch_compat import foreach_copy_
from ema_average.engine.buckets import SHAPE, Bucket, HostUpdates, describe, make_buckets
from ema_average.engine.decay_rules import DecayRule, check_unit
from ema_average.engine.dtensor_layouts import DTensorLayout, is_dtensor, local_part, whole
from ema_average.engine.kernel import checked_average_dtype, ema_update_, moved, rounding_seed
from ema_average.engine.parameters import (
    NamedParameter,
    Parameters,
    fsdp_modules,
    module_slots,
    named_tensors,
    owner_module,
)
from ema_average.engine.state import MISSING, checked_averages, checked_count, rule_of
from ema_average.errors import AverageStateError, ConfigurationError, ParameterError, PluginError

ENTRY_POINT_GROUP = "ema_average.averages"  # where other packages declare their averages, by name
Values = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
_M = TypeVar("_M", bound="type[MovingAverage]")


def _check_num_updates(num_updates: int | None) -> None:
    if num_updates is not None and (not isinstance(num_updates, int) or num_updates < 0):
        raise ConfigurationError(f"num_updates must be a non-negative integer or None, got {num_updates!r}")


def _load_declared(name: str) -> None:
    """Import the average another package declares as ``name`` and register it under that name; nothing if
    none is. One naming no moving average is a ``PluginError`` naming the entry point."""
    for entry in plugins.declared(ENTRY_POINT_GROUP):
        if entry.name != name:
            continue
        loaded = plugins.load(entry, f"the average {name!r}")
        if isinstance(loaded, type) and issubclass(loaded, MovingAverage):
            MovingAverage.register(name)(loaded)
        if name not in MovingAverage._registry:
            raise PluginError(
                f"the average {name!r} declared as {entry.value!r} is not a registered MovingAverage subclass"
            )
        return


class MovingAverage:
    """Tracks a moving average of named tensors (AllenNLP's design, registrable by name).

    A new average is one registered subclass that names its ``rule_type`` (a :class:`DecayRule`, which
    says the decay of each update and builds itself from named settings); an ``__init__`` that spells
    those settings out is optional (it takes ``rule=`` beside them, as :meth:`with_rule` builds through it). The storage, the update kernel, swapping and saving live here, once,
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
            rule_type = getattr(subclass, "rule_type", None)  # None on an abstract base
            if rule_type is not None and not rule_type.average_name:
                rule_type.average_name = name  # the rule's errors name the average as registered
            return subclass

        return add

    @classmethod
    def by_name(cls, name: str) -> type[MovingAverage]:
        """The registered implementation called ``name``; one another package declares under the entry-point
        group ``ema_average.averages`` is loaded the first time its name is asked for."""
        if name not in MovingAverage._registry:
            _load_declared(name)
        try:
            return MovingAverage._registry[name]
        except KeyError:
            known = ", ".join(cls.list_available())
            raise ConfigurationError(f"no moving average named {name!r}; available: {known}") from None

    @classmethod
    def list_available(cls) -> list[str]:
        """Registered names and those other packages declare (not loaded), the default first (as AllenNLP
        lists them)."""
        names = sorted(
            {*MovingAverage._registry, *(entry.name for entry in plugins.declared(ENTRY_POINT_GROUP))}
        )
        if cls.default_implementation in names:
            names.remove(cls.default_implementation)
            names.insert(0, cls.default_implementation)
        return names

    def __init__(
        self,
        parameters: Parameters,
        *,
        rule: DecayRule,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> None:
        """``average_dtype=torch.bfloat16`` keeps the averages in bfloat16 (half float32's memory), updated
        in float32 and stochastically rounded: opt-in, as it costs accuracy (docs/library.md measures it).
        ``None``, the default, keeps them in float32 (float64 for float64 values)."""
        self.average_dtype = checked_average_dtype(average_dtype)
        self.rule = rule
        self._fsdp_modules = fsdp_modules(parameters)
        self._reshard()  # after a forward, FSDP2's root module lists its gathered parameters, not its shards
        owner = owner_module(parameters)  # before a generator is consumed
        items = named_tensors(parameters)
        self._names = [name for name, _ in items]
        self._params: list[torch.Tensor] | None = [t for _, t in items]
        self._layouts = [DTensorLayout.of(name, t) for name, t in items]  # None for a plain tensor
        self._device = torch.device(device) if device is not None else None
        self._buckets = make_buckets(self._params, self._device, self.average_dtype)
        self._shadows: list[torch.Tensor] = [torch.empty(0)] * len(self._params)
        for bucket in self._buckets:
            for i, view in zip(bucket.indices, bucket.shadows, strict=True):
                self._shadows[i] = view
        self._host = HostUpdates() if any(b.staging for b in self._buckets) else None
        self._backups: list[torch.Tensor] | None = None
        self._slots = module_slots(owner, self._params)
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
        parameters: Parameters,
        rule: DecayRule,
        *,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> MovingAverage:
        """An average of this class with a rule built elsewhere, through the class's own constructor: every
        average takes ``rule=`` (``MovingAverage.__init__`` does; one that spells its settings out in an
        ``__init__`` of its own accepts ``rule=`` beside them)."""
        if not isinstance(rule, cls.rule_type):
            raise ConfigurationError(f"a {cls.registered_name!r} average needs a {cls.rule_type.__name__}")
        return cls(parameters, rule=rule, device=device, average_dtype=average_dtype)

    @classmethod
    def from_tensors(
        cls,
        tensors: Iterable[NamedParameter] | Mapping[str, torch.Tensor],
        *,
        rule: DecayRule | None = None,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
        **settings: float,
    ) -> MovingAverage:
        """An average started from ``tensors`` that keeps no reference to them.

        For streaming (the offline pipeline): holding the first checkpoint's tensors alive for the
        whole run would double memory. Such an average is fed through :meth:`update` only. Give the
        ``rule``, or the settings it is made from.
        """
        rule = rule or cls.make_rule(**settings)
        average = cls.with_rule(tensors, rule, device=device, average_dtype=average_dtype)
        average._params = None
        average._host = None
        for bucket in average._buckets:
            bucket.tracked, bucket.staging = [], []
        return average

    # --- the decay each update gets ---------------------------------------------------------------

    def decay_for(self, num_updates: int | None) -> float:
        """Decay of the next update, by this average's rule (``num_applied + 1`` values are in it)."""
        return self.rule.at(num_updates, self.num_applied + 1)

    # --- updating -----------------------------------------------------------------------------------

    def apply(self, num_updates: int | None = None) -> None:
        """Update the averages from the current values of the tracked parameters: all or none.

        Every value is checked (shape, dtype, device) before any average moves, so a failing call leaves
        the averages as they were. Built from a module (or its ``named_parameters()``), the average follows
        parameters the module replaces, as ``load_state_dict(..., assign=True)`` does. On a sharded model
        each rank updates the averages of its own shards: no collective, no host synchronisation. Averages
        kept in host memory of CUDA values are updated in the background.
        """
        self._require_params()
        _check_num_updates(num_updates)
        decay = self.decay_for(num_updates)
        self._settle()
        checked = self._checked_values()
        with torch.no_grad():
            for k, (bucket, values) in enumerate(zip(self._buckets, checked, strict=True)):
                self._seed(bucket, k)
                if bucket.staging and self._host is not None:
                    self._host.start(bucket, values, decay)
                    continue
                moved_values = moved(values, bucket.flat.device)
                ema_update_(bucket.shadows, moved_values, decay, flat=bucket.flat, generator=bucket.generator)
        self.num_applied += 1

    def _seed(self, bucket: Bucket, k: int) -> None:
        """Seed a bfloat16 bucket's rounding for the coming update from the update count (which the state
        saves), so a resumed average draws the bits the uninterrupted one would have."""
        if bucket.generator is not None:
            bucket.generator.manual_seed(rounding_seed(self.num_applied, k))

    def _checked_values(self) -> list[list[torch.Tensor]]:
        """Each bucket's current values, every one checked against its average before any is used."""
        self._follow_replaced()
        values = [bucket.values() for bucket in self._buckets]
        for bucket, current in zip(self._buckets, values, strict=True):
            if not bucket.fits(current):
                raise self._misfit(bucket, current)
        return values

    def _misfit(self, bucket: Bucket, values: list[torch.Tensor]) -> ParameterError:
        """Name the first value that no longer fits its average, and what changed."""
        for i, value, shape in zip(bucket.indices, values, bucket.shapes, strict=True):
            if value.shape != shape or (value.dtype, value.device) != bucket.kind:
                return ParameterError(
                    f"parameter {self._names[i]!r} is now {describe(value.shape, value.dtype, value.device)}; "
                    f"its average was made from {describe(shape, *bucket.kind)}, so none was updated. "
                    "After changing a parameter's shape, dtype or device, build a new average "
                    "(load_state_dict() carries this one's over)"
                )
        raise AssertionError("_misfit called on values that fit")

    def _follow_replaced(self) -> list[torch.Tensor]:
        """The tracked parameters, now: one that the module replaced is followed into its slot, after the
        replacement is checked to fit its average (else nothing changes and the error names it)."""
        params = self._require_params()
        if self._slots is None:
            return params
        current = [slot.get(key) for slot, key in self._slots]
        if all(map(is_, current, params)):
            return params
        changed = [i for i, (new, old) in enumerate(zip(current, params, strict=True)) if new is not old]
        places = {i: (b, j) for b in self._buckets for j, i in enumerate(b.indices)}
        for i in changed:
            self._check_replacement(i, current[i], places[i][0])
        for i in changed:
            bucket, j = places[i]
            bucket.tracked[j] = params[i] = current[i]  # type: ignore[assignment]  # checked above: a tensor
            if bucket.sharded is not None:
                bucket.sharded[j] = is_dtensor(params[i])
        return params

    def _check_replacement(self, i: int, new: object, bucket: Bucket) -> None:
        name = self._names[i]
        if not isinstance(new, torch.Tensor):
            raise ParameterError(
                f"parameter {name!r} is no longer the module's (its place holds {type(new).__name__}); "
                "the averages were left as they were"
            )
        layout = self._layouts[i]
        if (layout is None) != (not is_dtensor(new)) or (
            layout is not None and DTensorLayout.of(name, new) != layout
        ):
            raise ParameterError(
                f"parameter {name!r} was replaced by one sharded otherwise; build a new average for it "
                "(load_state_dict() carries this one's over)"
            )
        local = local_part(new)
        shape = self._shadows[i].shape
        if local.shape != shape or (local.dtype, local.device) != bucket.kind:
            raise ParameterError(
                f"parameter {name!r} was replaced by {describe(local.shape, local.dtype, local.device)}; "
                f"its average was made from {describe(shape, *bucket.kind)}: build a new average "
                "(load_state_dict() carries this one's over)"
            )

    def _settle(self) -> None:
        """Finish background updates before the averages are read, swapped, saved or updated again."""
        if self._host is not None:
            self._host.settle()

    def update(self, values: Values, num_updates: int | None = None) -> None:
        """Update the averages from ``values`` (by name, or in construction order) with this average's rule."""
        _check_num_updates(num_updates)
        self.update_with_decay(values, self.decay_for(num_updates))

    def update_with_decay(self, values: Values, decay: float) -> None:
        """Update with a decay computed elsewhere (e.g. the offline plan's gap-aware product)."""
        check_unit("decay", decay)
        self._settle()
        self._update_buckets(self._ordered(values), decay)

    def _update_buckets(self, values: list[torch.Tensor], decay: float) -> None:
        """One multi-tensor update per bucket; values move to the shadows' device if they are elsewhere."""
        with torch.no_grad():
            for k, bucket in enumerate(self._buckets):
                self._seed(bucket, k)
                picked = [values[i].detach() for i in bucket.indices]
                device, dtype = picked[0].device, picked[0].dtype
                generator = bucket.generator
                if any(v.device != device or v.dtype != dtype for v in picked):
                    for shadow, value in zip(bucket.shadows, picked, strict=True):  # rare: a mixed bucket
                        ema_update_([shadow], moved([value], shadow.device), decay, generator=generator)
                    continue
                picked = moved(picked, bucket.flat.device)
                ema_update_(bucket.shadows, picked, decay, flat=bucket.flat, generator=generator)
        self.num_applied += 1

    def _ordered(self, values: Values) -> list[torch.Tensor]:
        """Values (their local shards) in shadow order, checked against the names and shapes held here."""
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
        ordered = [local_part(v) for v in ordered]
        for name, shadow, value in zip(self._names, self._shadows, ordered, strict=True):
            if value.shape != shadow.shape:
                raise ParameterError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, the average has {tuple(shadow.shape)}"
                )
        return ordered

    # --- swapping averages in and out -------------------------------------------------------------

    def assign_average_value(self) -> None:
        """Copy the averages into the parameters (their local shards), keeping their values for :meth:`restore`."""
        params = self._follow_replaced()
        if self._backups is not None:
            raise AverageStateError("the averages are already assigned; call restore() first")
        self._settle()
        self._reshard()
        with torch.no_grad():
            local = [local_part(p) for p in params]
            self._check_shapes(local)
            self._backups = [t.detach().clone() for t in local]
            for t, shadow in zip(local, self._shadows, strict=True):
                t.copy_(shadow)

    def restore(self) -> None:
        """Put back the values saved by :meth:`assign_average_value`, bit for bit, and free the copy."""
        params = self._follow_replaced()
        if self._backups is None:
            raise AverageStateError("restore() called without assign_average_value() before it")
        with torch.no_grad():
            local = [local_part(p) for p in params]
            self._check_shapes(local)
            foreach_copy_(local, self._backups)
        self._backups = None
        self._reshard()

    def _check_shapes(self, local: list[torch.Tensor]) -> None:
        """Refuse a swap into a parameter that changed shape, before any is written."""
        if list(map(SHAPE, local)) == [s.shape for s in self._shadows]:
            return
        for name, tensor, shadow in zip(self._names, local, self._shadows, strict=True):
            if tensor.shape != shadow.shape:
                raise ParameterError(
                    f"parameter {name!r} now has shape {tuple(tensor.shape)}, its average "
                    f"{tuple(shadow.shape)}: nothing was swapped"
                )

    def _reshard(self) -> None:
        """Drop FSDP2's gathered copies (local, no communication), so the next forward gathers the shards."""
        for module in self._fsdp_modules:
            module.reshard()  # type: ignore[operator]  # an FSDPModule, typed by its nn.Module base

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
        """The current averages by name: the live float32/float64 (or ``average_dtype``) tensors, not copies.

        The average of a DTensor parameter is a DTensor of the same mesh, placements and shape around this
        rank's shard (``.to_local()`` gives the shard, ``.full_tensor()`` gathers the whole: a collective).
        """
        self._settle()
        return {
            name: shadow if layout is None else layout.wrap(shadow)
            for name, shadow, layout in zip(self._names, self._shadows, self._layouts, strict=True)
        }

    def all_finite(self) -> bool:
        """Whether every average is finite: one ``aminmax`` pass per flat buffer, no temporaries.

        NaN propagates through both reductions and Inf shows in one of them, so a single reduction
        per bucket replaces a per-tensor ``isfinite``. It reads a value back to the host (a sync on CUDA):
        call it between updates, not inside a training step's hot path. On a sharded model it checks this
        rank's shards.
        """
        self._settle()
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
        """Everything needed to resume this average later (averages, settings, update count).

        The averages are copies; those of DTensor parameters are DTensors (see :meth:`averages`), so
        ``torch.distributed.checkpoint.save`` writes them sharded, and ``dcp.load`` into the
        ``state_dict()`` of an average built at another world size (or of plain tensors, in one process)
        reshards them: then pass it to :meth:`load_state_dict`.
        """
        self._settle()
        with torch.no_grad():
            averages = {
                name: shadow.clone() if layout is None else layout.wrap(shadow.clone())
                for name, shadow, layout in zip(self._names, self._shadows, self._layouts, strict=True)
            }
        return {
            "method": self.registered_name,
            "settings": self.settings(),
            "num_applied": self.num_applied,
            "averages": averages,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, settings: str = "check") -> None:
        """Resume from :meth:`state_dict`: all of it or, on any fault, none (an ``AverageStateError`` names
        the key and the problem).

        Names and global shapes must match exactly (the first mismatch named); ``num_applied`` must be a
        whole number >= 0. ``settings`` says what to do when the state was made with other settings than
        this average's (decay 0.1 against 0.9999, say): ``"check"`` (the default) refuses it, naming both;
        ``"state"`` takes the saved ones, as torch_ema's ``load_state_dict`` takes its saved decay;
        ``"keep"`` keeps this average's, as timm and ema-pytorch do (they save none): e.g. to go on with
        another decay. Each average may be a DTensor or a whole tensor: this rank copies its own part of
        it. (A DTensor loaded into the average of a plain tensor is gathered: every rank must call this
        together.)
        """
        if settings not in ("check", "state", "keep"):
            raise ConfigurationError(f"settings must be 'check', 'state' or 'keep', got {settings!r}")
        if not isinstance(state, Mapping):
            raise AverageStateError(
                f"a state must be the mapping state_dict() returns, got a {type(state).__name__}"
            )
        if state.get("method", self.registered_name) != self.registered_name:
            raise AverageStateError(
                f"state is of a {state['method']!r} average, this one is {self.registered_name!r}"
            )
        saved = checked_averages(state.get("averages"), self._names, self._global_shapes(), self._layouts)
        num_applied = checked_count(state.get("num_applied", MISSING))
        rule = rule_of(state, settings, self.rule, self.rule_type, self.registered_name)
        self._settle()
        with torch.no_grad():
            for name, shadow, layout in zip(self._names, self._shadows, self._layouts, strict=True):
                shadow.copy_(whole(saved[name]) if layout is None else layout.local_of(saved[name]))
        self.num_applied, self.rule = num_applied, rule

    def _global_shapes(self) -> list[torch.Size]:
        """Each average's shape as the parameter has it (a DTensor's global shape, not its shard's)."""
        return [
            shadow.shape if layout is None else layout.shape
            for shadow, layout in zip(self._shadows, self._layouts, strict=True)
        ]
