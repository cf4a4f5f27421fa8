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


@dataclass(frozen=True)
class Previous:
    """An earlier output being continued: how many checkpoints it holds and the last step it took."""

    count: int
    last_step: int


def update_decays(
    steps: Sequence[int], settings: AverageSettings, previous: Previous | None = None
) -> list[float | None]:
    """The decay each checkpoint's update gets; ``None`` for a first checkpoint, which starts the average.

    The engine applies exactly these (``update_with_decay``), so the plan table shows what is done.
    """
    rule = settings.rule()
    decays: list[float | None] = []
    count, last = (previous.count, previous.last_step) if previous else (0, None)
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
class Selection:
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
    source: str  # as saved in the checkpoints
    spec: TensorSpec  # as saved
    out_dtype: torch.dtype
    averaged: bool  # False: integer/bool, taken from the latest checkpoint
    alias_of: str | None = None  # tied weight: written from this source's average

    @property
    def work_nbytes(self) -> int:
        """Memory this tensor holds while its group runs: its float32 shadow and its input bytes."""
        if not self.averaged or self.alias_of is not None:
            return 0
        return self.spec.numel * (shadow_dtype(self.spec.dtype).itemsize + self.spec.dtype.itemsize)


@dataclass
class Plan:
    steps: list[int]
    decays: list[float | None]
    weights: list[float]
    outputs: list[OutputTensor]
    groups: list[list[OutputTensor]]
    notes: list[str] = field(default_factory=list)

    @property
    def averaged(self) -> list[OutputTensor]:
        return [t for t in self.outputs if t.averaged and t.alias_of is None]


def output_tensors(
    specs: dict[str, TensorSpec], aliases: dict[str, str], selection: Selection, dtype: str
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


def group_by_budget(outputs: list[OutputTensor], budget: int) -> list[list[OutputTensor]]:
    """Consecutive groups whose working memory stays under ``budget`` (a bigger tensor stands alone).

    Tied aliases go in their twin's group, so both names are written from one average.
    """
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    home: dict[str, int] = {}
    for tensor in outputs:
        if tensor.alias_of is not None and tensor.alias_of in home:
            groups[home[tensor.alias_of]].append(tensor)
            continue
        cost = tensor.work_nbytes
        if cost and groups[-1] and used + cost > budget:  # copied tensors cost nothing: they never split
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += cost
        home[tensor.source] = len(groups) - 1
    return groups


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


def default_memory_budget() -> int:
    """A quarter of physical memory, at least 256 MiB: room for the OS, the page cache and the reads."""
    total = physical_memory()
    return 2 * 2**30 if total is None else max(256 * 2**20, total // 4)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def effective_count(weights: Sequence[float]) -> float:
    """Effective number of checkpoints (1 / sum of squared weights): 1 = one checkpoint is everything."""
    return 1.0 / math.fsum(w * w for w in weights)
