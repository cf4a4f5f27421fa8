"""What an offline run will do, decided before any tensor is read: pure functions of steps and settings.

The decays shown in the plan table are the decays the pipeline hands the engine: both come from
:func:`update_decays`, so what is shown is what is done.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ema_average import options
from ema_average.checkpoints.base import TensorSpec
from ema_average.decay_rules import DecayRule
from ema_average.errors import ConfigurationError
from ema_average.moving_average import MovingAverage, shadow_dtype

OUTPUT_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(options.OUTPUT_DTYPES, (None, torch.float32, torch.bfloat16, torch.float16), strict=True)
)
SCHEDULES = options.SCHEDULES


@dataclass(frozen=True)
class AverageSettings:
    """How the average is taken: which registered average, the settings its rule is built from, and one
    update per checkpoint or per step.

    ``schedule="checkpoint"`` is the seed's rule: one update per checkpoint with ``num_updates`` = its step.
    ``schedule="step"`` is gap-aware: between checkpoints at steps a < b the per-step rule is applied
    b - a times with the later checkpoint's weights, as an online EMA would have seen them.
    A setting left at ``None`` takes the rule's own default; one the average does not use is an error.
    """

    method: str = MovingAverage.default_implementation
    decay: float | None = None
    numerator: float | None = None
    denominator: float | None = None
    schedule: str = SCHEDULES[0]
    half_life: float | None = None  # replaces decay: in steps under "step", in checkpoints under "checkpoint"
    gamma: float | None = None  # power only
    sigma_rel: float | None = None  # power only, instead of gamma

    def rule(self) -> DecayRule:
        """The decay rule these settings describe, checked, made by the registered average itself."""
        if self.schedule not in SCHEDULES:
            raise ConfigurationError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        given = {
            name: value
            for name in ("decay", "numerator", "denominator", "half_life", "gamma", "sigma_rel")
            if (value := getattr(self, name)) is not None
        }
        rule = MovingAverage.by_name(self.method).make_rule(**given)
        if self.schedule == "step" and not rule.has_gap_product:
            raise ConfigurationError(
                f"the {self.method} average weighs checkpoints equally, with no per-step rule: "
                "use --schedule checkpoint"
            )
        return rule

    def as_metadata(self) -> dict[str, str]:
        """What an output records, so that --resume can check it continues the same average."""
        recorded = {"method": self.method, "schedule": self.schedule}
        recorded.update({key: repr(float(value)) for key, value in self.rule().settings().items()})
        return recorded


# The settings a run may vary, as the command line spells them (a label names an output by them).
_SWEEP_FIELDS = {
    "method": "",
    "schedule": "",
    "decay": "decay",
    "half_life": "half-life",
    "sigma_rel": "sigma-rel",
    "gamma": "gamma",
    "numerator": "numerator",
    "denominator": "denominator",
}


def sweep_labels(settings: Sequence[AverageSettings]) -> list[str]:
    """What tells several averages of one run apart, e.g. ``decay0.999``: names their outputs and the plan's
    weight columns. One average needs no label; settings given twice are refused."""
    if len(settings) < 2:
        return [""] * len(settings)
    varying = [f for f in _SWEEP_FIELDS if len({getattr(s, f) for s in settings}) > 1]
    labels = ["-".join(_label_part(f, getattr(s, f)) for f in varying) for s in settings]
    if not varying or len(set(labels)) < len(labels):
        raise ConfigurationError("the same settings are given twice: each average needs its own")
    return labels


def _label_part(field: str, value: object) -> str:
    if isinstance(value, float | int) and not isinstance(value, bool):
        text = repr(float(value)).removesuffix(".0")  # repr round-trips: two values never share a label
        return f"{_SWEEP_FIELDS[field]}{text}"
    return f"{_SWEEP_FIELDS[field]}{value}" if value is not None else f"{_SWEEP_FIELDS[field]}default"


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
    weight in the result, and the label that names its output when a run computes several."""

    settings: AverageSettings
    decays: list[float | None]
    weights: list[float]
    label: str = ""


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
    if len(weights) < 2 or weights[0] < 0.5 or settings.method == "uniform":
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


def settings_sweep(varying: dict[str, list[float] | None], **fixed: object) -> list[AverageSettings]:
    """One ``AverageSettings`` per value of the one setting given several values (the others shared).

    ``varying`` maps setting names (``decay``, ``half_life``...) to their values, ``None`` where not given.
    """
    several = [name for name, values in varying.items() if values is not None and len(values) > 1]
    if len(several) > 1:
        flags = " and ".join("--" + name.replace("_", "-") for name in several)
        raise ConfigurationError(f"{flags} both list several values: vary one setting per run")
    base = {name: values[0] for name, values in varying.items() if values}
    if not several:
        return [AverageSettings(**fixed, **base)]  # type: ignore[arg-type]
    values = varying[several[0]]
    assert values is not None
    return [AverageSettings(**fixed, **{**base, several[0]: v}) for v in values]  # type: ignore[arg-type]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from "512MB", "4GiB", "1.5G" or "1000000" (hand-written: a 10-line job, no dependency)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(f"not a size: {text!r} (use e.g. 512MB, 4GiB, 2G)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    base = unit[:1] if unit[:1] in "kmgt" else ""
    scale = 1024 ** ("kmgt".index(base) + 1) if (binary and base) else _UNITS[base]
    value = int(number * scale)
    if value <= 0:
        raise ConfigurationError(f"size must be positive: {text!r}")
    return value


def physical_memory() -> int | None:
    """This machine's RAM in bytes, where the OS says (not on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def effective_count(weights: Sequence[float]) -> float:
    """Effective number of checkpoints (1 / sum of squared weights): 1 = one checkpoint is everything."""
    return 1.0 / math.fsum(w * w for w in weights)
