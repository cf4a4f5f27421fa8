"""The offline job: a run's checkpoints, streamed through the engine, into safetensors.

discover -> plan -> for each tensor group: for each checkpoint: read -> update; write the group -> commit.
Knows nothing of the command line: progress goes out through a callback.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ema_average._version import __version__
from ema_average.checkpoints import Checkpoint, Run, SafetensorsCheckpoint, find_run
from ema_average.checkpoints.discover import StepsFrom
from ema_average.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    DeviceError,
    NoCheckpointsError,
    OutputError,
)
from ema_average.moving_average import MovingAverage
from ema_average.plan import (
    AverageSettings,
    CheckpointSelection,
    OutputTensor,
    Plan,
    Previous,
    Selection,
    default_memory_budget,
    effective_weights,
    first_dominates_note,
    group_by_budget,
    output_tensors,
    update_decays,
)
from ema_average.writer import SafetensorsWriter, ShardedWriter, TensorEntry, remove_stale_temporaries

Progress = Callable[[int], None]  # bytes just processed

_ALIGN = 64  # staging views start on 64-byte boundaries, so every dtype view is aligned


@dataclass
class AverageOptions:
    """Everything an offline run needs; the CLI fills it from its flags."""

    checkpoint_dir: Path
    output: Path | None = None
    device: str = "cpu"
    settings: AverageSettings = field(default_factory=AverageSettings)
    dtype: str = "as-input"
    overwrite: bool = False
    memory_budget: int | None = None
    max_shard_size: int | None = None
    selection: Selection = field(default_factory=Selection)
    state_dict_key: str | None = None
    steps_from: StepsFrom = "auto"
    trust_pickle: bool = False
    checkpoints: CheckpointSelection = field(default_factory=CheckpointSelection)
    resume: Path | None = None  # continue this earlier output with the checkpoints newer than it


@dataclass
class Resumed:
    """An earlier output being continued: its file (read by output names), what it holds, how it was made."""

    average: SafetensorsCheckpoint
    previous: Previous
    steps: list[int]
    sources: list[str]


@dataclass
class PreparedRun:
    """A run found and planned, checked against device and output, before anything is written.

    ``sources`` are what the average is built from in order: the resumed output first, if any, then the
    checkpoints. ``plan.decays`` and ``plan.weights`` run alongside them.
    """

    options: AverageOptions
    run: Run
    checkpoints: list[Checkpoint]
    plan: Plan
    output: Path
    device: torch.device
    budget: int
    resumed: Resumed | None = None
    may_replace: bool = False  # --overwrite, or refreshing the very output being resumed

    @property
    def sources(self) -> list[Checkpoint]:
        return ([self.resumed.average] if self.resumed else []) + self.checkpoints

    @property
    def up_to_date(self) -> bool:
        """Resuming, and no checkpoint is newer than the output: nothing to do."""
        return not self.checkpoints

    @property
    def total_bytes(self) -> int:
        """Bytes the run will read: every averaged tensor of every source, other tensors once."""
        averaged = sum(t.spec.nbytes for t in self.plan.averaged)
        copied = sum(t.spec.nbytes for t in self.plan.outputs if not t.averaged)
        return averaged * len(self.sources) + copied


@dataclass
class Summary:
    outputs: list[Path]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int

    @property
    def throughput(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else float("inf")


def resolve_device(spec: str) -> torch.device:
    """The device, checked to exist now, before any work is done."""
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"--device {spec!r} is not a device name (use cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {spec}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"--device {spec}: unsupported device type {device.type!r}")
    return device


def default_output(checkpoint_dir: Path) -> Path:
    """Beside the run's folder, never inside it, where a later run would find it as an input."""
    folder = checkpoint_dir.resolve()
    return folder.parent / f"{folder.name}-ema.safetensors"


def prepare(options: AverageOptions, *, dry_run: bool = False, only: set[Path] | None = None) -> PreparedRun:
    """Find the run, plan the work and check device and output: every input error surfaces here.

    A dry run reports an existing output as a note instead of refusing, so the plan can still be seen.
    ``only`` limits the run to those candidate checkpoints (used by :func:`ema_average.watch.watch`).
    """
    options.settings.rule()  # bad settings fail before anything is read
    if options.resume is not None and options.checkpoints.thins:
        raise ConfigurationError("--last and --every cannot be combined with --resume or --watch")
    device = resolve_device(options.device)
    run = find_run(
        options.checkpoint_dir,
        state_dict_key=options.state_dict_key,
        trust_pickle=options.trust_pickle,
        steps_from=options.steps_from,
        only=only,
    )
    chosen = set(options.checkpoints.indices([c.step or 0 for c in run.checkpoints]))
    checkpoints = [c for i, c in enumerate(run.checkpoints) if i in chosen]
    if not checkpoints:
        raise NoCheckpointsError(run.root, "no checkpoints left after --from-step/--to-step/--every/--last")
    resumed = None
    if options.resume is not None:
        resumed = open_resumed(options.resume, options.settings)
        checkpoints = [c for c in checkpoints if (c.step or 0) > resumed.previous.last_step]
    output = options.output or options.resume or default_output(options.checkpoint_dir)
    budget = options.memory_budget or default_memory_budget()
    plan = make_plan(run, checkpoints, resumed, options, budget)
    continuing = options.resume is not None and output.resolve() == options.resume.resolve()
    if output.exists() and not (options.overwrite or continuing):
        if not dry_run:
            raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
        plan.notes.append(f"{output} already exists: a real run needs --overwrite")
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; give a file name ending .safetensors")
    may_replace = options.overwrite or continuing
    return PreparedRun(options, run, checkpoints, plan, output, device, budget, resumed, may_replace)


def open_resumed(path: Path, settings: AverageSettings) -> Resumed:
    """An earlier output to continue, checked to be one of ours made with these very settings."""
    try:
        average = SafetensorsCheckpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(path, f"cannot be resumed: {exc.problem}") from exc
    meta = average.metadata
    if not average.written_by_this_tool or "last_step" not in meta:
        raise CheckpointMismatchError(path, "was not written by ema-average, so it cannot be resumed")
    for key, wanted in settings.as_metadata().items():
        recorded = meta.get(key)
        if recorded != wanted:
            raise CheckpointMismatchError(
                path, f"was made with {key} {recorded}, not {wanted}: resume with the same settings"
            )
    steps = [int(s) for s in json.loads(meta.get("steps", "[]"))]
    sources = [str(s) for s in json.loads(meta.get("sources", "[]"))]
    return Resumed(average, Previous(len(steps), int(meta["last_step"])), steps, sources)


def make_plan(
    run: Run, checkpoints: list[Checkpoint], resumed: Resumed | None, options: AverageOptions, budget: int
) -> Plan:
    notes = list(run.notices)
    for ckpt in checkpoints:
        notes += [f"{ckpt.path.name}: {note}" for note in ckpt.notes]
    first = checkpoints[0] if checkpoints else run.checkpoints[-1]
    outputs = output_tensors(first.specs(), first.aliases(), options.selection, options.dtype)
    steps = [c.step or 0 for c in checkpoints]
    decays = update_decays(steps, options.settings, resumed.previous if resumed else None)
    if resumed is not None:
        _check_resumable(resumed, outputs, notes)
        steps = [resumed.previous.last_step, *steps]
        decays = [None, *decays]
    weights = effective_weights(decays)
    tied = [t for t in outputs if t.alias_of is not None]
    if tied:
        pairs = ", ".join(f"{t.source} = {t.alias_of}" for t in tied[:3])
        notes.append(f"tied weights averaged once and written under both names: {pairs}")
    dominated = first_dominates_note(steps, weights, options.settings) if resumed is None else None
    if dominated:
        notes.append(dominated)
    return Plan(steps, decays, weights, outputs, group_by_budget(outputs, budget), notes)


def _check_resumable(resumed: Resumed, outputs: list[OutputTensor], notes: list[str]) -> None:
    """The earlier output must hold every averaged tensor, same shape; say when it was rounded."""
    specs = resumed.average.specs()
    for t in outputs:
        if not t.averaged or t.alias_of is not None:
            continue
        held = specs.get(t.name)
        if held is None or held.shape != t.spec.shape:
            problem = "has no tensor" if held is None else f"has shape {list(held.shape)} for"
            raise CheckpointMismatchError(resumed.average.path, f"{problem} {t.name!r}; it cannot be resumed")
    rounded = sorted({str(s.dtype).removeprefix("torch.") for s in specs.values() if s.dtype in _ROUNDED})
    if rounded:
        notes.append(
            f"{resumed.average.path.name} holds {'/'.join(rounded)} averages: the result equals one run over all "
            "checkpoints up to that rounding (write with --dtype float32 for bit-exact resumes)"
        )


_ROUNDED = (torch.bfloat16, torch.float16)


def average_checkpoints(options: AverageOptions, on_progress: Progress | None = None) -> Summary:
    """The whole offline job: prepare, then execute."""
    return execute(prepare(options), on_progress)


def execute(prepared: PreparedRun, on_progress: Progress | None = None) -> Summary:
    """Stream every group through the engine into the output; on any failure, nothing is left behind."""
    if prepared.up_to_date:
        raise ConfigurationError(
            f"{prepared.output} is up to date: no checkpoint is newer than its last step"
        )
    start = time.perf_counter()
    plan = prepared.plan
    progress = on_progress or (lambda _n: None)
    remove_stale_temporaries(prepared.output.parent)
    writer = _open_writer(prepared)
    bytes_read = 0
    try:
        for group in plan.groups:
            bytes_read += _run_group(prepared, group, writer, progress)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        for ckpt in prepared.sources:
            ckpt.close()
    outputs = writer.paths if isinstance(writer, ShardedWriter) else [writer.path]
    return Summary(
        outputs, len(plan.outputs), bytes_read, writer.size, time.perf_counter() - start, _peak_rss()
    )


def _open_writer(prepared: PreparedRun) -> SafetensorsWriter | ShardedWriter:
    options, plan = prepared.options, prepared.plan
    entries = [TensorEntry(t.name, t.spec.shape, t.out_dtype) for t in plan.outputs]
    metadata = output_metadata(prepared)
    if options.max_shard_size:
        return ShardedWriter(
            prepared.output,
            entries,
            metadata,
            overwrite=prepared.may_replace,
            max_shard_size=options.max_shard_size,
        )
    return SafetensorsWriter(prepared.output, entries, metadata, overwrite=prepared.may_replace)


def output_metadata(prepared: PreparedRun) -> dict[str, str]:
    """What the output records of how it was made (safetensors metadata values are strings)."""
    plan, options = prepared.plan, prepared.options
    return {
        "format": "pt",
        "ema_average_version": __version__,
        **options.settings.as_metadata(),
        "dtype": options.dtype,
        "steps": json.dumps(
            (prepared.resumed.steps if prepared.resumed else []) + [c.step for c in prepared.checkpoints]
        ),
        "last_step": str(plan.steps[-1]),
        "sources": json.dumps(
            (prepared.resumed.sources if prepared.resumed else [])
            + [c.path.name for c in prepared.checkpoints]
        ),
    }


class _Staging:
    """Reused host buffers that checkpoint tensors are read into: one on CPU, two pinned on CUDA.

    With two, the next checkpoint is read into one while the device still copies from the other.
    """

    def __init__(self, tensors: list[OutputTensor], device: torch.device) -> None:
        self.offsets: list[int] = []
        size = 0
        for t in tensors:
            self.offsets.append(size)
            size += -(-t.spec.nbytes // _ALIGN) * _ALIGN
        pin = device.type == "cuda"
        count = 2 if pin else 1
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
        self.events: list[torch.cuda.Event | None] = [None] * count
        self.tensors = tensors

    def views(self, slot: int) -> list[torch.Tensor]:
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the device has finished copying out of this buffer
        buffer = self.buffers[slot]
        return [
            buffer[offset : offset + t.spec.nbytes].view(t.spec.dtype).view(t.spec.shape)
            for offset, t in zip(self.offsets, self.tensors, strict=True)
        ]

    def mark_in_use(self, slot: int, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.events[slot] = event


def _run_group(
    prepared: PreparedRun,
    group: list[OutputTensor],
    writer: SafetensorsWriter | ShardedWriter,
    progress: Progress,
) -> int:
    """Average one group over every source, write it, free it; returns bytes read."""
    sources, plan, device = prepared.sources, prepared.plan, prepared.device
    to_average = [t for t in group if t.averaged and t.alias_of is None]
    averages: dict[str, torch.Tensor] = {}
    read = 0
    if to_average:
        staging = _Staging(to_average, device)
        group_bytes = sum(t.spec.nbytes for t in to_average)
        first = _read(sources[0], to_average, staging, 0, by_output_name=prepared.resumed is not None)
        average = MovingAverage.by_name(prepared.options.settings.method).from_tensors(first, device=device)
        del first
        _release(sources[0])
        read += group_bytes
        progress(group_bytes)
        for i, source in enumerate(sources[1:], start=1):
            slot = i % len(staging.buffers)
            values = _read(source, to_average, staging, slot)
            decay = plan.decays[i]
            assert decay is not None
            average.update_with_decay(values, decay)
            staging.mark_in_use(slot, device)
            del values
            _release(source)
            read += group_bytes
            progress(group_bytes)
        averages = average.averages()
    latest = prepared.checkpoints[-1]
    for t in group:
        if t.averaged:
            writer.write(t.name, averages[t.alias_of or t.source].to(t.out_dtype))
        else:
            writer.write(t.name, latest.read(t.source))
            read += t.spec.nbytes
            progress(t.spec.nbytes)
    return read


def _read(
    ckpt: Checkpoint,
    tensors: list[OutputTensor],
    staging: _Staging,
    slot: int,
    *,
    by_output_name: bool = False,
) -> dict[str, torch.Tensor]:
    """One source's tensors of a group, keyed by saved name: mapped views where the file is mapped, else
    staged reads. A resumed output is read once, by the names it was written under and in the dtype it
    was written in (which need not be the checkpoints'), so into fresh tensors rather than the staging."""
    if by_output_name:
        return {t.source: ckpt.read(t.name) for t in tensors}
    if ckpt.zero_copy:
        return {t.source: ckpt.read(t.source) for t in tensors}
    views = staging.views(slot)
    return {t.source: ckpt.read_into(t.source, view) for t, view in zip(tensors, views, strict=True)}


def _release(ckpt: Checkpoint) -> None:
    """Close a source after its pass: a mapped file's touched pages leave this process's memory, and a
    run of thousands of checkpoints never holds thousands of open files. The next pass reopens it."""
    ckpt.close()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
