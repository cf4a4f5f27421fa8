"""Moving averages of named tensors: the one engine behind the library and the CLI.

The public shape follows AllenNLP's ``MovingAverage`` (a registrable base with ``apply``,
``assign_average_value`` and ``restore``) so its users feel at home, with what users of torch_ema,
timm and ema-pytorch ask for on top: float32 shadows whatever the parameter dtype, one multi-tensor
update per (device, dtype) group, shadows on another device, a state dict, a swap-in context manager,
and an update that takes any tensors (``update``), not only the tracked parameters, so the offline
pipeline streams checkpoint tensors through this very code.

Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallel) are averaged shard by shard: each
rank keeps float32 averages of its local shards only, updated with no collective, and hands them back as
DTensors of the parameters' mesh and placements (``averages``, ``state_dict``), which
``torch.distributed.checkpoint`` saves sharded and reloads at another world size.

This module knows nothing of files or of the command line.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from operator import attrgetter, is_
from typing import Any, ClassVar, TypeAlias, TypeVar

import torch

from ema_average._torch_compat import (
    dtensor_off_mesh_device,
    flatten_dense,
    loaded_dtensor_class,
    local_tensor,
    local_tensors,
    parameter_slots,
)
from ema_average.decay_rules import (
    DecayRule,
    ExponentialRule,
    PowerRule,
    UniformRule,
    check_unit,
)
from ema_average.errors import AverageStateError, ConfigurationError, OutputRangeError, ParameterError

NamedParameter = tuple[str, torch.Tensor]
Values = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
# What an average is built from: (name, tensor) pairs, a mapping, or a module (its named_parameters, and
# for FSDP2 the modules to reshard around a swap).
Parameters: TypeAlias = Iterable[NamedParameter] | Mapping[str, torch.Tensor] | torch.nn.Module
_M = TypeVar("_M", bound="type[MovingAverage]")

__all__ = [
    "ExponentialMovingAverage",
    "MovingAverage",
    "NamedParameter",
    "Parameters",
    "PowerFunctionMovingAverage",
    "UniformMovingAverage",
    "check_fits",
    "ema_update_",
    "is_dtensor",
    "local_part",
    "shadow_dtype",
]


def shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype an average of ``dtype`` values is kept in: never narrower than float32.

    A bf16 shadow at decay 0.9999 adds 1e-4 * (value - shadow), which is below bf16's resolution
    for most weights, so the average silently stops moving; float32 has the headroom, float64 stays.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements of narrower values converted per pass before their lerp: a 4 MiB float32 scratch (or the largest
# tensor, if larger), whatever the model's size.
_CONVERT_NUMEL = 1 << 20


def ema_update_(
    shadows: list[torch.Tensor], values: list[torch.Tensor], decay: float, flat: torch.Tensor | None = None
) -> None:
    """``shadow <- decay * shadow + (1 - decay) * value`` for every pair: always ``lerp``, never mul + add.

    All ``shadows`` share one device and dtype, and so do all ``values`` (on the same device). Same dtypes
    take one fused multi-tensor ``lerp``. Narrower values (bf16/fp16 weights, float32 averages) are first
    converted, exactly, into a reused scratch of the shadows' dtype, a window of consecutive tensors at a
    time (one multi-tensor copy), then lerped: the arithmetic the offline command does (it converts each
    checkpoint's values, then lerps), so the two give the same bits for the same values and decay. ``flat``
    is the buffer the shadows are consecutive views of, in order: each window is then one ``lerp`` over its
    slice instead of one per tensor (most of the cost on many small tensors). No float32 copy of the model
    is made (CPU type promotion of a mixed-dtype ``lerp`` would allocate one per tensor).
    """
    if not shadows:
        return
    weight = 1.0 - decay
    if shadows[0].dtype == values[0].dtype:
        torch._foreach_lerp_(shadows, values, weight)
        return
    numels = [s.numel() for s in shadows]
    size = min(sum(numels), max(_CONVERT_NUMEL, *numels))
    scratch = torch.empty(size, dtype=shadows[0].dtype, device=shadows[0].device)
    first = offset = 0
    for end in _window_ends(numels, size):
        span = sum(numels[first:end])
        if end - first == 1:
            scratch[:span].view(shadows[first].shape).copy_(values[first])
        else:  # one concatenation in C++ and one conversion, not a copy and a view per tensor
            scratch[:span].copy_(flatten_dense(values[first:end]))
        if flat is not None:
            flat[offset : offset + span].lerp_(scratch[:span], weight)
        else:
            converted = _views(scratch, [s.shape for s in shadows[first:end]])
            torch._foreach_lerp_(shadows[first:end], converted, weight)
        first, offset = end, offset + span


def _window_ends(numels: list[int], size: int) -> Iterator[int]:
    """Ends of consecutive runs of tensors whose sizes add up to at most ``size`` (each one fits alone)."""
    total = 0
    for i, numel in enumerate(numels):
        if total and total + numel > size:
            yield i
            total = 0
        total += numel
    yield len(numels)


def check_fits(name: str, values: torch.Tensor, rounded: torch.Tensor) -> None:
    """Refuse ``rounded`` (``values`` converted to a narrower dtype) if rounding turned a finite value into
    Inf: float16 holds at most 65504, so a finite 7e4 would be written as Inf. Values already NaN or Inf
    are not this check's business. One ``aminmax`` over what is written when it fits; raises
    ``OutputRangeError`` naming the tensor, the dtype and the largest value that does not fit.
    """
    if rounded.numel() == 0 or not rounded.is_floating_point():
        return
    low, high = torch.aminmax(rounded)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    overflowed = torch.isinf(rounded) & torch.isfinite(values)
    if not bool(overflowed.any()):
        return
    largest = float(values[overflowed].abs().max())
    dtype = rounded.dtype
    raise OutputRangeError(
        f"tensor {name!r} averages to {largest:.4g}, beyond what {str(dtype).removeprefix('torch.')} holds "
        f"({torch.finfo(dtype).max:g}): it would be written as Inf; refused. Write float32 to keep it"
    )


# --- sharded tensors ------------------------------------------------------------------------------


_DTENSOR: list[type[torch.Tensor]] = []  # DTensor's class, once its module is loaded


def _dtensor_class() -> type[torch.Tensor] | None:
    """DTensor's class if its module is loaded, else None.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so the engine never imports it
    itself: plain models (and the offline command) do not pay its 0.7 s import.
    """
    if not _DTENSOR:
        cls = loaded_dtensor_class()
        if cls is not None:
            _DTENSOR.append(cls)
    return _DTENSOR[0] if _DTENSOR else None


def is_dtensor(tensor: torch.Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard, any other tensor itself.

    It is what ``to_local()`` returns without autograd, minus the fresh view torch 2.13 adds for a
    Parameter (microseconds per tensor, every step). Read it at each use, never keep it: FSDP2 gives a
    sharded parameter a new local tensor at lazy init, ``model.to()`` or ``load_state_dict``.
    """
    return local_tensor(tensor) if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class _Layout:
    """How a DTensor parameter is spread over ranks, so its average goes back out as a like DTensor.

    The global shape and stride are kept, never inferred from the local shard: FSDP2 shards dim 0
    unevenly (7 rows on 3 ranks are 3, 3 and 1) and a rank may hold none.
    """

    mesh: Any  # DeviceMesh
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> _Layout | None:
        if not is_dtensor(tensor):
            return None
        placements = tuple(tensor.placements)  # type: ignore[attr-defined]
        if any(p.is_partial() for p in placements):
            raise ParameterError(
                f"parameter {name!r} is a partial DTensor (pending a reduction): its local part is not a "
                "shard of the parameter, so it cannot be averaged"
            )
        return cls(tensor.device_mesh, placements, tensor.shape, tensor.stride())  # type: ignore[attr-defined]

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """A DTensor of this layout around ``local`` (shared, not copied), which stays on its device.

        ``DTensor.from_local`` would move averages kept in host memory onto a CUDA mesh's device;
        there the DTensor is built directly, as FSDP2 builds its CPU-offloaded parameters.
        """
        cls = _dtensor_class()
        assert cls is not None
        with torch.no_grad():
            if local.device.type == self.mesh.device_type:
                return cls.from_local(  # type: ignore[attr-defined]
                    local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
                )
            return dtensor_off_mesh_device(cls, local, self.mesh, self.placements, self.shape, self.stride)

    def local_of(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a saved average: a DTensor's own (redistributed if laid out otherwise) or
        the slice of a whole tensor that this layout puts here (no communication)."""
        if is_dtensor(value):
            if value.device_mesh != self.mesh:  # type: ignore[attr-defined]
                raise AverageStateError(
                    "a saved average is a DTensor on another device mesh; load it through "
                    "torch.distributed.checkpoint into this average's state_dict() instead"
                )
            if tuple(value.placements) != self.placements:  # type: ignore[attr-defined]
                value = value.redistribute(self.mesh, self.placements)  # type: ignore[attr-defined]
            return local_part(value)
        from torch.distributed.tensor import distribute_tensor

        return local_part(distribute_tensor(value, self.mesh, self.placements, src_data_rank=None))


def _check_num_updates(num_updates: int | None) -> None:
    if num_updates is not None and (not isinstance(num_updates, int) or num_updates < 0):
        raise ConfigurationError(f"num_updates must be a non-negative integer or None, got {num_updates!r}")


def _named_tensors(parameters: Parameters) -> list[NamedParameter]:
    """Materialise and validate what the user passed, so every later error is impossible."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
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


def _fsdp_modules(parameters: Parameters) -> list[torch.nn.Module]:
    """The FSDP2 modules of a model given whole, which a swap reshards.

    FSDP2 keeps the root module's gathered parameters after a forward (backward needs them next), so
    averages swapped into the shards would not reach the next forward, nor the training weights put back.
    """
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if cls is None or not isinstance(parameters, torch.nn.Module):
        return []
    return [m for m in parameters.modules() if isinstance(m, cls)]


# Where a module keeps a tracked parameter: its owner's ``_parameters`` dict and the key in it.
_Slot: TypeAlias = tuple[dict[str, Any], str]


def _owner_module(parameters: Parameters) -> torch.nn.Module | None:
    """The module whose parameters these are, when it can be known: the module itself, or the one whose
    ``named_parameters()`` generator was passed (not yet started). Anything else (a list, a dict, a filtered
    generator) names no module."""
    if isinstance(parameters, torch.nn.Module):
        return parameters
    if getattr(parameters, "gi_code", None) is torch.nn.Module.named_parameters.__code__:
        owner = parameters.gi_frame.f_locals.get("self") if parameters.gi_frame else None  # type: ignore[attr-defined]
        return owner if isinstance(owner, torch.nn.Module) else None
    return None


def _module_slots(owner: torch.nn.Module | None, params: list[torch.Tensor]) -> list[_Slot] | None:
    """Each tracked parameter's slot in ``owner``, to follow a parameter the module replaces
    (``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``); None if not all are found.

    Not under FSDP2, which swaps its sharded and gathered parameters in these slots at every forward.
    """
    if owner is None or _fsdp_modules(owner):
        return None
    where: dict[int, _Slot] = {}
    for module in owner.modules():
        own = parameter_slots(module)
        for key, param in own.items():
            if param is not None:
                where.setdefault(id(param), (own, key))
    slots = [where.get(id(p)) for p in params]
    return None if any(slot is None for slot in slots) else slots  # type: ignore[return-value]


_SHAPE = attrgetter("shape")
_KIND = attrgetter("dtype", "device")


@dataclass
class _Bucket:
    """Shadows of one (source device, source dtype) kind, as views into one flat buffer.

    One flat buffer lets the mixed-dtype update scale every shadow with a single op instead of one per
    tensor, which is most of the cost on models of many small tensors. A DTensor's kind is its local
    shard's, and its shadow is shaped like that shard: each rank holds and updates its own part only.
    """

    flat: torch.Tensor
    indices: list[int]
    shadows: list[torch.Tensor]
    tracked: list[torch.Tensor]  # the tracked tensors themselves, for apply(); emptied by from_tensors
    kind: tuple[torch.dtype, torch.device]  # what every value must still be at each apply()
    sharded: list[bool] | None = (
        None  # which tracked tensors are DTensors, if any: their shards are read at each use
    )
    staging: list[torch.Tensor] = field(default_factory=list)  # pinned views (CUDA values, host averages)
    shapes: list[torch.Size] = field(init=False)  # the shadows', read once

    def __post_init__(self) -> None:
        self.shapes = [s.shape for s in self.shadows]

    def values(self) -> list[torch.Tensor]:
        """The tracked tensors' current values on this rank (a plain attribute read per DTensor: on many
        small tensors, a function call each would cost as much as their update)."""
        if self.sharded is None:
            return self.tracked
        return local_tensors(self.tracked, self.sharded)

    def fits(self, values: list[torch.Tensor]) -> bool:
        """Whether every value still has its average's shape and the bucket's dtype and device.

        A parameter whose ``.data`` was replaced (another shape, ``.half()``, ``.to(device)``) would make
        the multi-tensor update fail midway, or broadcast silently: checked for all before any is touched,
        in C-level passes (about 0.7 us a tensor).
        """
        return list(map(_SHAPE, values)) == self.shapes and set(map(_KIND, values)) <= {self.kind}


def _make_buckets(tensors: list[torch.Tensor], device: torch.device | None) -> list[_Bucket]:
    """Copy ``tensors`` (their local shards) into float32-or-wider flat buffers, one per local device and dtype."""
    local = [local_part(t) for t in tensors]
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(local):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    buckets = []
    with torch.no_grad():
        for (src_device, src_dtype), indices in by_kind.items():
            flat = torch.empty(
                sum(local[i].numel() for i in indices),
                dtype=shadow_dtype(src_dtype),
                device=device or src_device,
            )
            shadows = _views(flat, [local[i].shape for i in indices])
            for view, i in zip(shadows, indices, strict=True):
                view.copy_(local[i].detach())
            sources = [tensors[i] for i in indices]
            sharded = [is_dtensor(t) for t in sources]
            kind = (src_dtype, src_device)
            bucket = _Bucket(flat, indices, shadows, sources, kind, sharded if any(sharded) else None)
            if src_device.type == "cuda" and flat.device.type == "cpu":
                staging = torch.empty(flat.numel(), dtype=src_dtype, pin_memory=True)
                bucket.staging = _views(staging, [local[i].shape for i in indices])
            buckets.append(bucket)
    return buckets


def _views(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Consecutive tensors over ``flat``'s memory with these shapes.

    Detached, so autograd does not know them as views: an in-place update of a view pays for view
    tracking on every call (0.1 us a tensor, a fifth of a 5,000-tensor update on one CPU core).
    """
    views, offset = [], 0
    for shape in shapes:
        numel = shape.numel()
        views.append(flat[offset : offset + numel].view(shape).detach())
        offset += numel
    return views


def _moved(values: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``values`` on ``device``. Non-blocking only towards CUDA: a non-blocking copy to the host returns
    before its bytes arrive, and the CPU update that reads them next does not wait for the stream."""
    if values[0].device == device:
        return values
    non_blocking = device.type == "cuda"
    return [v.to(device, non_blocking=non_blocking) for v in values]


class _HostUpdates:
    """Averages kept in host memory of values on a CUDA device, updated off the training's critical path.

    ``apply()`` queues one copy of the values into pinned buffers on a side stream and returns; a worker
    thread waits for that copy and folds it into the averages while the GPU runs the next forward. The
    training stream waits (on the GPU, not the host) for the copy before its next kernels, so the next
    optimizer step cannot change a value mid-copy. Made only for CUDA values: CPU-only runs never touch it.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ema-host-update")
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pending: list[Future[None]] = []

    def start(self, bucket: _Bucket, values: list[torch.Tensor], decay: float) -> None:
        """Queue one update of ``bucket`` (call :meth:`settle` first: the pinned buffers are reused)."""
        device = values[0].device
        side = self.streams.get(device) or self.streams.setdefault(device, torch.cuda.Stream(device))
        training = torch.cuda.current_stream(device)
        side.wait_stream(training)  # copy the values as this step left them
        with torch.cuda.stream(side):
            torch._foreach_copy_(bucket.staging, values, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        training.wait_event(copied)
        self.pending.append(self.worker.submit(self._fold, bucket, copied, decay))

    @staticmethod
    def _fold(bucket: _Bucket, copied: torch.cuda.Event, decay: float) -> None:
        copied.synchronize()
        ema_update_(bucket.shadows, bucket.staging, decay, flat=bucket.flat)

    def settle(self) -> None:
        """Wait for queued updates (raising their errors): before the averages are read or updated again."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


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
        names = sorted({*MovingAverage._registry, *(entry.name for entry in _declared_averages())})
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
    ) -> None:
        self.rule = rule
        self._fsdp_modules = _fsdp_modules(parameters)
        self._reshard()  # after a forward, FSDP2's root module lists its gathered parameters, not its shards
        owner = _owner_module(parameters)  # before a generator is consumed
        items = _named_tensors(parameters)
        self._names = [name for name, _ in items]
        self._params: list[torch.Tensor] | None = [t for _, t in items]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._layouts = [_Layout.of(name, t) for name, t in items]  # None for a plain tensor
        self._device = torch.device(device) if device is not None else None
        self._buckets = _make_buckets(self._params, self._device)
        self._shadows: list[torch.Tensor] = [torch.empty(0)] * len(self._params)
        for bucket in self._buckets:
            for i, view in zip(bucket.indices, bucket.shadows, strict=True):
                self._shadows[i] = view
        self._host = _HostUpdates() if any(b.staging for b in self._buckets) else None
        self._backups: list[torch.Tensor] | None = None
        self._slots = _module_slots(owner, self._params)
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
            for bucket, values in zip(self._buckets, checked, strict=True):
                if bucket.staging and self._host is not None:
                    self._host.start(bucket, values, decay)
                    continue
                ema_update_(bucket.shadows, _moved(values, bucket.flat.device), decay, flat=bucket.flat)
        self.num_applied += 1

    def _checked_values(self) -> list[list[torch.Tensor]]:
        """Each bucket's current values, every one checked against its average before any is used."""
        self._follow_replaced()
        values = [bucket.values() for bucket in self._buckets]
        for bucket, current in zip(self._buckets, values, strict=True):
            if not bucket.fits(current):
                raise self._misfit(bucket, current)
        return values

    def _misfit(self, bucket: _Bucket, values: list[torch.Tensor]) -> ParameterError:
        """Name the first value that no longer fits its average, and what changed."""
        for i, value, shape in zip(bucket.indices, values, bucket.shapes, strict=True):
            if value.shape != shape or (value.dtype, value.device) != bucket.kind:
                return ParameterError(
                    f"parameter {self._names[i]!r} is now {_describe(value.shape, value.dtype, value.device)}; "
                    f"its average was made from {_describe(shape, *bucket.kind)}, so none was updated. "
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
            bucket.tracked[j] = params[i] = current[i]  # type: ignore[assignment]
            if bucket.sharded is not None:
                bucket.sharded[j] = is_dtensor(params[i])
        return params

    def _check_replacement(self, i: int, new: object, bucket: _Bucket) -> None:
        name = self._names[i]
        if not isinstance(new, torch.Tensor):
            raise ParameterError(
                f"parameter {name!r} is no longer the module's (its place holds {type(new).__name__}); "
                "the averages were left as they were"
            )
        layout = self._layouts[i]
        if (layout is None) != (not is_dtensor(new)) or (
            layout is not None and _Layout.of(name, new) != layout
        ):
            raise ParameterError(
                f"parameter {name!r} was replaced by one sharded otherwise; build a new average for it "
                "(load_state_dict() carries this one's over)"
            )
        local = local_part(new)
        shape = self._shadows[i].shape
        if local.shape != shape or (local.dtype, local.device) != bucket.kind:
            raise ParameterError(
                f"parameter {name!r} was replaced by {_describe(local.shape, local.dtype, local.device)}; "
                f"its average was made from {_describe(shape, *bucket.kind)}: build a new average "
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
            for bucket in self._buckets:
                picked = [values[i].detach() for i in bucket.indices]
                device, dtype = picked[0].device, picked[0].dtype
                if any(v.device != device or v.dtype != dtype for v in picked):
                    for shadow, value in zip(bucket.shadows, picked, strict=True):  # rare: a mixed bucket
                        ema_update_([shadow], _moved([value], shadow.device), decay)
                    continue
                ema_update_(bucket.shadows, _moved(picked, bucket.flat.device), decay, flat=bucket.flat)
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
            torch._foreach_copy_(local, self._backups)
        self._backups = None
        self._reshard()

    def _check_shapes(self, local: list[torch.Tensor]) -> None:
        """Refuse a swap into a parameter that changed shape, before any is written."""
        if list(map(_SHAPE, local)) == [s.shape for s in self._shadows]:
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
            module.reshard()  # type: ignore[operator]

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
        """The current averages by name: the live float32/float64 tensors, not copies.

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
        saved = self._checked_averages(state.get("averages"))
        num_applied = _checked_count(state.get("num_applied", _MISSING))
        rule = self._rule_of(state, settings)
        self._settle()
        with torch.no_grad():
            for name, shadow, layout in zip(self._names, self._shadows, self._layouts, strict=True):
                shadow.copy_(_whole(saved[name]) if layout is None else layout.local_of(saved[name]))
        self.num_applied, self.rule = num_applied, rule

    def _checked_averages(self, saved: object) -> Mapping[str, torch.Tensor]:
        """The state's averages, each checked to load into its own: same names, global shapes, a
        floating-point dense tensor with data (not on the meta device), a DTensor on this mesh."""
        if not isinstance(saved, Mapping):
            raise AverageStateError("state has no 'averages' mapping; was it made by state_dict()?")
        for name in self._names:
            if name not in saved:
                raise AverageStateError(f"state has no average for {name!r}")
        for name in saved:
            if name not in self._index:
                raise AverageStateError(
                    f"state has an average for {name!r}, which this average does not track"
                )
        for name, shape, layout in zip(self._names, self._global_shapes(), self._layouts, strict=True):
            value = saved[name]
            problem = _tensor_problem(value)
            if problem is None and tuple(value.shape) != tuple(shape):
                problem = f"has shape {tuple(value.shape)}, expected {tuple(shape)}"
            if (
                problem is None
                and is_dtensor(value)
                and layout is not None
                and value.device_mesh != layout.mesh
            ):  # type: ignore[attr-defined]
                problem = (
                    "is a DTensor on another device mesh; load it through torch.distributed.checkpoint "
                    "into this average's state_dict() instead"
                )
            if problem is not None:
                raise AverageStateError(f"state's average {name!r} {problem}")
        return saved  # type: ignore[return-value]

    def _rule_of(self, state: Mapping[str, Any], settings: str) -> DecayRule:
        """The rule the average goes on with: this one's, or the state's (``settings="state"``), once the
        state's settings are known to build a rule of this average and, under ``"check"``, to be this one's."""
        if settings == "keep":
            return self.rule
        saved = state.get("settings", _MISSING)
        if not isinstance(saved, Mapping):
            found = "none" if saved is _MISSING else f"a {type(saved).__name__}"
            raise AverageStateError(
                f"state's 'settings' must be the mapping state_dict() records, found {found}; "
                "load_state_dict(state, settings='keep') goes on with this average's"
            )
        try:
            rule = self.rule_type.from_options(**saved)
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise AverageStateError(
                f"state's 'settings' {dict(saved)!r} are not a {self.registered_name} average's: {exc}"
            ) from None
        if settings == "check" and rule != self.rule:
            raise AverageStateError(
                f"state was made with {_settings_text(rule)}, this average has {_settings_text(self.rule)}; "
                "build the average with the saved settings, or pass settings='state' to take them or "
                "settings='keep' to keep this average's"
            )
        return rule

    def _global_shapes(self) -> list[torch.Size]:
        """Each average's shape as the parameter has it (a DTensor's global shape, not its shard's)."""
        return [
            shadow.shape if layout is None else layout.shape
            for shadow, layout in zip(self._shadows, self._layouts, strict=True)
        ]


_MISSING = object()
_MAX_COUNT = 2**63 - 1  # a counter is an int64 wherever it is saved


def _checked_count(value: object) -> int:
    """A saved ``num_applied``: a whole number in [0, 2**63) (not a bool, float, NaN or list)."""
    if value is _MISSING:
        raise AverageStateError("state has no 'num_applied' (the number of updates in the averages)")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= _MAX_COUNT:
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


def _describe(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> str:
    return f"{tuple(shape)} {str(dtype).removeprefix('torch.')} on {device}"


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A saved average as one whole tensor (a DTensor is gathered from its ranks: a collective)."""
    return value.full_tensor() if is_dtensor(value) else value  # type: ignore[attr-defined]


ENTRY_POINT_GROUP = "ema_average.averages"  # where other packages declare their averages, by name


def _declared_averages() -> tuple[metadata.EntryPoint, ...]:
    """The averages installed packages declare: ``name = "module:Class"`` (or just the module that
    registers it) under ``[project.entry-points."ema_average.averages"]``."""
    return tuple(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_declared(name: str) -> None:
    """Import the average declared as ``name`` and register it under that name; nothing if none is.

    A declaration that fails to load, or names no moving average, is a one-line error naming the package's
    entry point, never a traceback from another package's import.
    """
    for entry in _declared_averages():
        if entry.name != name:
            continue
        try:
            loaded = entry.load()
        except Exception as exc:
            raise ConfigurationError(
                f"the average {name!r} declared as {entry.value!r} does not load: {type(exc).__name__}: {exc}"
            ) from None
        if isinstance(loaded, type) and issubclass(loaded, MovingAverage):
            MovingAverage.register(name)(loaded)
        if name not in MovingAverage._registry:
            raise ConfigurationError(
                f"the average {name!r} declared as {entry.value!r} is not a registered MovingAverage subclass"
            )
        return


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
        parameters: Parameters,
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
        parameters: Parameters,
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
        parameters: Parameters,
        gamma: float | None = None,
        sigma_rel: float | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        given = {k: v for k, v in (("gamma", gamma), ("sigma_rel", sigma_rel)) if v is not None}
        super().__init__(parameters, rule=self.make_rule(**given), device=device)
