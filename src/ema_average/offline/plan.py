"""What an offline run will do, decided before any tensor is read: pure functions of steps and settings.

The decays shown in the plan table are the decays the pipeline hands the engine: both come from
:func:`update_decays`, so what is shown is what is done.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ema_average.checkpoints.base import TensorSpec
from ema_average.engine.averages import MovingAverage, shadow_dtype
from ema_average.engine.decay_rules import DecayRule, flag_of
from ema_average.errors import ConfigurationError
from ema_average.offline import choices

OUTPUT_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(choices.OUTPUT_DTYPES, (None, torch.float32, torch.bfloat16, torch.float16), strict=True)
)
SCHEDULES = choices.SCHEDULES


@dataclass(frozen=True, init=False)
class AverageSettings:
    """How the average is taken: which registered average, the settings its rule is built from, and one
    update per checkpoint or per step.

    ``schedule="checkpoint"`` is the seed's rule: one update per checkpoint with ``num_updates`` = its step.
    ``schedule="step"`` is gap-aware: between checkpoints at steps a < b the per-step rule is applied
    b - a times with the later checkpoint's weights, as an online EMA would have seen them.
    The settings are a mapping by name (``AverageSettings("power", sigma_rel=0.1)``), checked against the
    settings the average's rule declares (:meth:`DecayRule.declared`); one left out (or ``None``) takes
    the rule's own default, one the average does not declare is an error.
    """

    method: str
    schedule: str
    values: tuple[tuple[str, float], ...]  # those given, sorted by name: equal settings compare equal

    def __init__(
        self,
        method: str = MovingAverage.default_implementation,
        *,
        schedule: str = SCHEDULES[0],
        values: Mapping[str, float | None] | Iterable[tuple[str, float | None]] = (),
        **given: float | None,
    ) -> None:
        merged = {**dict(values), **given}  # a mapping, or the pairs ``values`` holds (dataclasses.replace)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "values", tuple(sorted((k, v) for k, v in merged.items() if v is not None)))

    def get(self, name: str) -> float | None:
        """The value given for setting ``name``, or None where the rule's default applies."""
        return dict(self.values).get(name)

    def rule_type(self) -> type[DecayRule]:
        """The registered average's rule class: its declared settings, before any value is checked."""
        return MovingAverage.by_name(self.method).rule_type

    def rule(self) -> DecayRule:
        """The decay rule these settings describe, checked, made by the registered average itself."""
        if self.schedule not in SCHEDULES:
            raise ConfigurationError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        rule = MovingAverage.by_name(self.method).make_rule(**dict(self.values))
        if self.schedule == "step" and not rule.has_gap_product:
            why = "weighs checkpoints equally, with" if rule.weighs_equally else "has"
            raise ConfigurationError(
                f"the {self.method} average {why} no per-step rule: use --schedule checkpoint"
            )
        return rule

    def as_metadata(self) -> dict[str, str]:
        """What an output records, so that --resume can check it continues the same average."""
        recorded = {"method": self.method, "schedule": self.schedule}
        recorded.update({key: repr(float(value)) for key, value in self.rule().settings().items()})
        return recorded


def _varying(settings: Sequence[AverageSettings]) -> list[str]:
    """What differs between several averages: ``method``, ``schedule``, then setting names, first seen first."""
    names = dict.fromkeys(name for s in settings for name, _ in s.values)
    return [
        *(f for f in ("method", "schedule") if len({getattr(s, f) for s in settings}) > 1),
        *(name for name in names if len({s.get(name) for s in settings}) > 1),
    ]


def one_value_hint(settings: Sequence[AverageSettings]) -> str:
    """What to give instead of several averages, e.g. "give one value of --decay" (from the settings that
    vary, so a new average's own settings are named too)."""
    varying = [name if name in ("method", "schedule") else flag_of(name) for name in _varying(settings)]
    return f"give one value of {' and '.join(varying) or 'each setting'}"


def sweep_labels(settings: Sequence[AverageSettings]) -> list[str]:
    """What tells several averages of one run apart, e.g. ``decay0.999``: names their outputs and the plan's
    weight columns. One average needs no label; settings given twice are refused."""
    if len(settings) < 2:
        return [""] * len(settings)
    varying = _varying(settings)
    labels = ["-".join(_label_part(f, _value_of(s, f)) for f in varying) for s in settings]
    if not varying or len(set(labels)) < len(labels):
        raise ConfigurationError("the same settings are given twice: each average needs its own")
    return labels


def _value_of(settings: AverageSettings, name: str) -> object:
    return getattr(settings, name) if name in ("method", "schedule") else settings.get(name)


def _label_part(name: str, value: object) -> str:
    """``decay0.999``, ``half-life500``; the method and schedule by their value alone."""
    prefix = "" if name in ("method", "schedule") else flag_of(name).removeprefix("--")
    if isinstance(value, float | int) and not isinstance(value, bool):
        text = repr(float(value)).removesuffix(".0")  # repr round-trips: two values never share a label
        return f"{prefix}{text}"
    return f"{prefix}{value}" if value is not None else f"{prefix}default"


@dataclass(frozen=True)
class ResumedProgress:
    """An earlier output being continued: how many checkpoints it holds and the last step it took."""

    count: int
    last_step: int


def update_decays(
    steps: Sequence[int], settings: AverageSettings, progress: ResumedProgress | None = None
) -> list[float | None]:
    """The decay each checkpoint's update gets; ``None`` for a first checkpoint, which starts the average.

    The engine applies exactly these (``update_with_decay``), so the plan table shows what is done.
    """
    rule = settings.rule()
    decays: list[float | None] = []
    count, last = (progress.count, progress.last_step) if progress else (0, None)
    for step in steps:
        if last is None:
            decays.append(None)
        elif settings.schedule == "step":
            decays.append(rule.between(last, step))
        else:
            decays.append(rule.at(step, count))
        count, last = count + 1, step
    return decays


@dataclass(frozen=True)
class CheckpointSelection:
    """Which of a run's checkpoints to use (--from-step, --to-step, --every, --last)."""

    from_step: int | None = None
    to_step: int | None = None
    every: int | None = None
    last: int | None = None

    def indices(self, steps: Sequence[int]) -> list[int]:
        """Step range first, then every k-th counted back from the newest (so the newest is always kept),
        then the last n."""
        chosen = [
            i
            for i, s in enumerate(steps)
            if (self.from_step is None or s >= self.from_step) and (self.to_step is None or s <= self.to_step)
        ]
        if self.every is not None:
            if self.every < 1:
                raise ConfigurationError(f"--every must be at least 1, got {self.every}")
            chosen = [i for n, i in enumerate(reversed(chosen)) if n % self.every == 0][::-1]
        if self.last is not None:
            if self.last < 1:
                raise ConfigurationError(f"--last must be at least 1, got {self.last}")
            chosen = chosen[-self.last :]
        return chosen

    @property
    def thins(self) -> bool:
        """Whether it drops checkpoints inside the range (which a resumed average cannot undo)."""
        return self.every is not None or self.last is not None


def effective_weights(decays: Sequence[float | None]) -> list[float]:
    """Each checkpoint's share of the final average (they sum to 1), from the decays in order.

    The first entry starts the average (its decay is ``None``): a first checkpoint, or a resumed output.
    """
    weights = [1.0]
    for decay in decays[1:]:
        assert decay is not None
        weights = [w * decay for w in weights] + [1.0 - decay]
    return weights


@dataclass(frozen=True)
class TensorSelection:
    """Which tensors are averaged and under which names they are written."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strip_prefix: str = ""

    def keeps(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def output_name(self, name: str) -> str:
        return name.removeprefix(self.strip_prefix) if self.strip_prefix else name


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: where its value comes from and how it is stored."""

    name: str  # as written
    input_name: str  # as saved in the checkpoints
    spec: TensorSpec  # as saved
    out_dtype: torch.dtype
    averaged: bool  # False: integer/bool, taken from the latest checkpoint
    alias_of: str | None = None  # tied weight: written from this source's average


@dataclass(frozen=True)
class PlannedAverage:
    """One average the run computes: its settings, the decay each source's update gets, each source's
    weight in the result, and the label that names its output when a run computes several.

    ``sums``: the weights are the coefficients of a plain weighted sum of the sources (post-hoc EMA, whose
    coefficients may be negative), streamed as such rather than as the chain of ``decays``; ``metadata``
    is what its output records besides the settings (how the sum was solved)."""

    settings: AverageSettings
    decays: list[float | None]
    weights: list[float]
    label: str = ""
    sums: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    steps: list[int]
    averages: list[PlannedAverage]
    outputs: list[OutputTensor]
    chunks: list[Chunk]
    notes: list[str] = field(default_factory=list)

    @property
    def decays(self) -> list[float | None]:
        """The first (usually only) average's decays."""
        return self.averages[0].decays

    @property
    def weights(self) -> list[float]:
        return self.averages[0].weights

    @property
    def averaged(self) -> list[OutputTensor]:
        return [t for t in self.outputs if t.averaged and t.alias_of is None]


def output_tensors(
    specs: dict[str, TensorSpec], aliases: dict[str, str], selection: TensorSelection, dtype: str
) -> list[OutputTensor]:
    """The output's tensors, floating ones averaged, others copied from the latest checkpoint."""
    if dtype not in OUTPUT_DTYPES:
        raise ConfigurationError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    chosen = OUTPUT_DTYPES[dtype]
    outputs: list[OutputTensor] = []
    seen: dict[str, str] = {}
    for source, spec in specs.items():
        if not selection.keeps(source):
            continue
        name = selection.output_name(source)
        if name in seen:
            raise ConfigurationError(f"--strip-prefix makes {seen[name]!r} and {source!r} both {name!r}")
        seen[name] = source
        averaged = spec.is_floating
        out_dtype = chosen if (averaged and chosen is not None) else spec.dtype
        alias = aliases.get(source)
        if alias is not None and not selection.keeps(alias):
            alias = None  # its twin is excluded: average this one on its own
        outputs.append(OutputTensor(name, source, spec, out_dtype, averaged, alias))
    if not outputs:
        raise ConfigurationError("no tensors left to write after --include/--exclude")
    return outputs


@dataclass(frozen=True)
class Piece:
    """Elements ``start .. start + count`` of one saved tensor (flattened), at ``offset`` in its chunk."""

    input_name: str  # as saved: read from every source under this name
    names: tuple[str, ...]  # written under these output names (a tied twin adds one)
    start: int
    count: int
    offset: int


@dataclass(frozen=True)
class Chunk:
    """Consecutive elements of tensors of one kind, small enough to stay in cache while every source is
    folded in: one read per piece, one flat update per source and average, one write per piece.

    ``first_dtype`` is the first source's dtype (an earlier average being resumed keeps its own), ``dtype``
    the checkpoints'; the shadow is float32 or wider. Copied tensors (``averaged`` False) are read from the
    latest checkpoint and written as they are.
    """

    pieces: tuple[Piece, ...]
    first_dtype: torch.dtype
    dtype: torch.dtype
    out_dtype: torch.dtype
    averaged: bool

    @property
    def numel(self) -> int:
        last = self.pieces[-1]
        return last.offset + last.count

    @property
    def shadow_dtype(self) -> torch.dtype:
        return shadow_dtype(self.first_dtype)

    def bytes_read(self, sources: int) -> int:
        """Bytes this chunk reads: from every source if averaged (the first in its own dtype), else once."""
        if not self.averaged:
            return self.numel * self.dtype.itemsize
        return self.numel * (self.first_dtype.itemsize + (sources - 1) * self.dtype.itemsize)


def chunk_layout(
    outputs: list[OutputTensor], first_specs: dict[str, TensorSpec], chunk_numel: int, *, split: bool = True
) -> list[Chunk]:
    """The output's non-empty tensors cut into chunks of at most ``chunk_numel`` elements, one kind each.

    Tensors of one kind (dtypes of the first source, of the checkpoints, of the output; averaged or
    copied) are laid end to end, in saved order, and cut every ``chunk_numel`` elements, so a chunk may
    hold the tail of one tensor and the head of the next. Each element's arithmetic is the same whatever
    the cut, so results do not depend on ``chunk_numel``. ``split=False`` keeps every tensor whole (a
    larger one is a chunk of its own): for sources that can only read whole tensors. Tied twins ride on
    the tensor they alias; ``first_specs`` gives the first source's dtypes where they differ.
    """
    if chunk_numel < 1:
        raise ConfigurationError(f"chunks must hold at least one element, got {chunk_numel}")
    twins: dict[str, list[str]] = {}
    for t in outputs:
        if t.averaged and t.alias_of is not None:
            twins.setdefault(t.alias_of, []).append(t.name)
    kinds: dict[
        tuple[torch.dtype, torch.dtype, torch.dtype, bool], list[tuple[OutputTensor, tuple[str, ...]]]
    ]
    kinds = {}
    for t in outputs:
        if t.spec.numel == 0 or (t.averaged and t.alias_of is not None):
            continue
        first = first_specs.get(t.input_name, t.spec).dtype if t.averaged else t.spec.dtype
        names = (t.name, *twins.get(t.input_name, ())) if t.averaged else (t.name,)
        kinds.setdefault((first, t.spec.dtype, t.out_dtype, t.averaged), []).append((t, names))
    chunks: list[Chunk] = []
    for (first, dtype, out_dtype, averaged), tensors in kinds.items():
        for pieces in _cut(tensors, chunk_numel, split):
            chunks.append(Chunk(tuple(pieces), first, dtype, out_dtype, averaged))
    return chunks


def _cut(
    tensors: list[tuple[OutputTensor, tuple[str, ...]]], chunk_numel: int, split: bool
) -> list[list[Piece]]:
    chunks: list[list[Piece]] = [[]]
    used = 0
    for t, names in tensors:
        numel = t.spec.numel
        if not split and used and used + numel > chunk_numel:
            chunks.append([])
            used = 0
        start = 0
        while start < numel:
            count = min(numel - start, chunk_numel - used) if split else numel
            chunks[-1].append(Piece(t.input_name, names, start, count, used))
            start += count
            used += count
            if used >= chunk_numel:
                chunks.append([])
                used = 0
    return [c for c in chunks if c]


def first_dominates_note(
    steps: Sequence[int], weights: Sequence[float], settings: AverageSettings
) -> str | None:
    """One line when the first checkpoint is most of the result, with what to change."""
    if len(weights) < 2 or weights[0] < 0.5 or settings.rule_type().weighs_equally:
        return None
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    gap = sorted(gaps)[len(gaps) // 2]
    suggestion = 0.01 ** (1.0 / (len(steps) - 1))  # decay^(K-1) = 1%: the first checkpoint keeps ~1%
    advice = (
        "--schedule step applies the decay once per training step, as an online EMA would"
        if settings.schedule == "checkpoint"
        else "a shorter --half-life or lower --decay weighs later checkpoints more"
    )
    return (
        f"the first checkpoint (step {steps[0]}) carries {weights[0]:.1%} of the average "
        f"(checkpoints ~{gap} steps apart, schedule {settings.schedule}). {advice}; "
        f"or lower --decay to about {suggestion:.3g} to give the first checkpoint ~1%."
    )


def parse_values(flag: str, text: str) -> list[float]:
    """Numbers from a comma list ("0.999,0.9999"): one average per value, in one pass."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            raise ConfigurationError(
                f"{flag}: {item.strip()!r} is not a number (give e.g. 0.999,0.9999)"
            ) from None
    return values


def settings_sweep(varying: Mapping[str, Sequence[float] | None], **fixed: object) -> list[AverageSettings]:
    """One ``AverageSettings`` per value of the one setting given several values (the others shared).

    ``varying`` maps setting names (``decay``, ``half_life``...) to their values, ``None`` where not given;
    ``fixed`` holds ``method`` and ``schedule``. Only a setting the rule declares ``several`` takes a list.
    """
    given = {name: list(values) for name, values in varying.items() if values}
    several = [name for name, values in given.items() if len(values) > 1]
    if len(several) > 1:
        flags = " and ".join(flag_of(name) for name in several)
        raise ConfigurationError(f"{flags} both list several values: vary one setting per run")
    base = {name: values[0] for name, values in given.items()}
    if not several:
        return [AverageSettings(**fixed, values=base)]  # type: ignore[arg-type]  # fixed: method, schedule
    name = several[0]
    _check_takes_a_list(str(fixed.get("method", MovingAverage.default_implementation)), name)
    return [AverageSettings(**fixed, values={**base, name: v}) for v in given[name]]  # type: ignore[arg-type]  # as above


def _check_takes_a_list(method: str, name: str) -> None:
    """A comma list only where the rule declares it gives one average per value (not --numerator)."""
    setting = MovingAverage.by_name(method).rule_type.setting(name)
    if setting is not None and not setting.several:
        raise ConfigurationError(f"{setting.flag} takes one value, not a list")


def effective_count(weights: Sequence[float]) -> float:
    """Effective number of checkpoints (1 / sum of squared weights): 1 = one checkpoint is everything."""
    return 1.0 / math.fsum(w * w for w in weights)
