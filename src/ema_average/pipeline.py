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
from ema_average.checkpoints import Checkpoint, Run, find_run
from ema_average.checkpoints.discover import StepsFrom
from ema_average.errors import ConfigurationError, DeviceError, OutputError
from ema_average.moving_average import MovingAverage
from ema_average.plan import (
    AverageSettings,
    OutputTensor,
    Plan,
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


@dataclass
class PreparedRun:
    """A run found and planned, checked against device and output, before anything is written."""

    options: AverageOptions
    run: Run
    plan: Plan
    output: Path
    device: torch.device
    budget: int

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return self.run.checkpoints

    @property
    def total_bytes(self) -> int:
        """Bytes the run will read: every averaged tensor of every checkpoint, other tensors once."""
        averaged = sum(t.spec.nbytes for t in self.plan.averaged)
        copied = sum(t.spec.nbytes for t in self.plan.outputs if not t.averaged)
        return averaged * len(self.checkpoints) + copied


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


def prepare(options: AverageOptions) -> PreparedRun:
    """Find the run, plan the work and check device and output: every input error surfaces here."""
    check_settings(options.settings)
    device = resolve_device(options.device)
    run = find_run(
        options.checkpoint_dir,
        state_dict_key=options.state_dict_key,
        trust_pickle=options.trust_pickle,
        steps_from=options.steps_from,
    )
    plan = make_plan(run, options)
    output = options.output or default_output(options.checkpoint_dir)
    if output.exists() and not options.overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; give a file name ending .safetensors")
    return PreparedRun(options, run, plan, output, device, options.memory_budget or default_memory_budget())


def make_plan(run: Run, options: AverageOptions) -> Plan:
    first = run.checkpoints[0]
    steps = [c.step for c in run.checkpoints if c.step is not None]
    decays = update_decays(steps, options.settings)
    weights = effective_weights(decays)
    outputs = output_tensors(first.specs(), first.aliases(), options.selection, options.dtype)
    budget = options.memory_budget or default_memory_budget()
    notes = list(run.notices)
    for ckpt in run.checkpoints:
        notes += [f"{ckpt.path.name}: {note}" for note in ckpt.notes]
    tied = [t for t in outputs if t.alias_of is not None]
    if tied:
        pairs = ", ".join(f"{t.source} = {t.alias_of}" for t in tied[:3])
        notes.append(f"tied weights averaged once and written under both names: {pairs}")
    dominated = first_dominates_note(steps, weights, options.settings)
    if dominated:
        notes.append(dominated)
    return Plan(steps, decays, weights, outputs, group_by_budget(outputs, budget), notes)


def average_checkpoints(options: AverageOptions, on_progress: Progress | None = None) -> Summary:
    """The whole offline job: prepare, then execute."""
    return execute(prepare(options), on_progress)


def execute(prepared: PreparedRun, on_progress: Progress | None = None) -> Summary:
    """Stream every group through the engine into the output; on any failure, nothing is left behind."""
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
        for ckpt in prepared.checkpoints:
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
            overwrite=options.overwrite,
            max_shard_size=options.max_shard_size,
        )
    return SafetensorsWriter(prepared.output, entries, metadata, overwrite=options.overwrite)


def output_metadata(prepared: PreparedRun) -> dict[str, str]:
    """What the output records of how it was made (safetensors metadata values are strings)."""
    plan, options = prepared.plan, prepared.options
    return {
        "format": "pt",
        "ema_average_version": __version__,
        **options.settings.as_metadata(),
        "dtype": options.dtype,
        "steps": json.dumps(plan.steps),
        "last_step": str(plan.steps[-1]),
        "sources": json.dumps([c.path.name for c in prepared.checkpoints]),
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
    """Average one group over every checkpoint, write it, free it; returns bytes read."""
    checkpoints, plan, device = prepared.checkpoints, prepared.plan, prepared.device
    to_average = [t for t in group if t.averaged and t.alias_of is None]
    averages: dict[str, torch.Tensor] = {}
    read = 0
    if to_average:
        staging = _Staging(to_average, device)
        first = _read(checkpoints[0], to_average, staging, 0)
        average = MovingAverage.by_name(prepared.options.settings.method).from_tensors(first, device=device)
        del first
        _release(checkpoints[0])
        group_bytes = sum(t.spec.nbytes for t in to_average)
        read += group_bytes
        progress(group_bytes)
        for i, ckpt in enumerate(checkpoints[1:], start=1):
            slot = i % len(staging.buffers)
            values = _read(ckpt, to_average, staging, slot)
            decay = plan.decays[i]
            assert decay is not None
            average.update_with_decay(values, decay)
            staging.mark_in_use(slot, device)
            del values
            _release(ckpt)
            read += group_bytes
            progress(group_bytes)
        averages = average.averages()
    last = checkpoints[-1]
    for t in group:
        if t.averaged:
            value = averages[t.alias_of or t.source]
            writer.write(t.name, value.to(t.out_dtype))
        else:
            writer.write(t.name, last.read(t.source))
            read += t.spec.nbytes
            progress(t.spec.nbytes)
    return read


def _read(
    ckpt: Checkpoint, tensors: list[OutputTensor], staging: _Staging, slot: int
) -> dict[str, torch.Tensor]:
    """The group's tensors of one checkpoint: mapped views where the file is mapped, else staged reads."""
    if getattr(ckpt, "zero_copy", False):
        return {t.source: ckpt.read(t.source) for t in tensors}
    views = staging.views(slot)
    return {t.source: ckpt.read_into(t.source, view) for t, view in zip(tensors, views, strict=True)}


def _release(ckpt: Checkpoint) -> None:
    """Unmap a mapped checkpoint after its pass, so its touched pages leave this process's memory."""
    if getattr(ckpt, "zero_copy", False):
        ckpt.close()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def check_settings(settings: AverageSettings) -> None:
    """Reject settings the engine would reject, before discovery reads anything."""
    if not 0.0 <= settings.decay <= 1.0:
        raise ConfigurationError(f"--decay must be in [0, 1], got {settings.decay}")
    if settings.denominator <= 0 or not 0 <= settings.numerator <= settings.denominator:
        raise ConfigurationError("need 0 <= --numerator <= --denominator and --denominator > 0")
