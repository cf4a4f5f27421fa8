"""The offline job: a run's checkpoints, streamed through the engine, into safetensors.

discover -> plan -> for each tensor group: for each checkpoint: read -> update; write the group -> commit.
Knows nothing of the command line: progress goes out through a callback.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ema_average.checkpoints import Checkpoint, Run, find_run
from ema_average.checkpoints.discover import StepsFrom
from ema_average.errors import (
    CheckpointError,
    ConfigurationError,
    DeviceError,
    NoCheckpointsError,
    NonFiniteError,
    OutputError,
)
from ema_average.moving_average import MovingAverage
from ema_average.plan import (
    AverageSettings,
    CheckpointSelection,
    OutputTensor,
    Plan,
    Selection,
    default_memory_budget,
    effective_weights,
    first_dominates_note,
    group_by_budget,
    output_tensors,
    physical_memory,
    update_decays,
)
from ema_average.resume import Resumed, check_resumable, left_out, open_resumed, output_metadata
from ema_average.writer import (
    OutputLock,
    SafetensorsWriter,
    ShardedWriter,
    TensorEntry,
    name_problem,
    remove_stale_temporaries,
)

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
    allow_nonfinite: bool = False  # average NaN/Inf values instead of refusing the checkpoint holding them


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
    left_out: list[str] = field(default_factory=list)  # checkpoints older than a resumed output's last step

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


def default_output(checkpoint_dir: Path, *, folder: bool = False) -> Path:
    """Beside the run's folder, never inside it, where a later run would find it as an input."""
    run = checkpoint_dir.resolve()
    return run.parent / (f"{run.name}-ema" if folder else f"{run.name}-ema.safetensors")


def prepare(options: AverageOptions, *, dry_run: bool = False, only: set[Path] | None = None) -> PreparedRun:
    """Find the run, plan the work and check device and output: every input error surfaces here.

    A dry run reports an existing output as a note instead of refusing, so the plan can still be seen.
    ``only`` limits the run to those candidate checkpoints (used by :func:`ema_average.watch.watch`).
    """
    options.settings.rule()  # bad settings fail before anything is read
    if options.resume is not None and options.checkpoints.thins:
        raise ConfigurationError("--last and --every cannot be combined with --resume or --watch")
    device = resolve_device(options.device)
    output = _output_path(options)
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
    resumed, older = None, []
    if options.resume is not None:
        resumed = open_resumed(options.resume, options.settings)
        older = left_out(resumed, [(c.path.name, c.step or 0) for c in checkpoints])
        run.notices += older
        checkpoints = [c for c in checkpoints if (c.step or 0) > resumed.previous.last_step]
    _check_output_is_not_an_input(output, run.units)
    budget = options.memory_budget or default_memory_budget()
    plan = make_plan(run, checkpoints, resumed, options, budget)
    _check_names(plan.outputs, checkpoints[0] if checkpoints else run.checkpoints[-1])
    _check_memory(plan, checkpoints[0] if checkpoints else run.checkpoints[-1])
    continuing = options.resume is not None and output.resolve() == options.resume.resolve()
    if output.exists() and not (options.overwrite or continuing):
        if not dry_run:
            raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
        plan.notes.append(f"{output} already exists: a real run needs --overwrite")
    may_replace = options.overwrite or continuing
    return PreparedRun(options, run, checkpoints, plan, output, device, budget, resumed, may_replace, older)


def _output_path(options: AverageOptions) -> Path:
    """The output: a .safetensors file, or a folder of shards with ``--max-shard-size``."""
    folder = options.max_shard_size is not None
    output = options.output or options.resume or default_output(options.checkpoint_dir, folder=folder)
    if folder and output.suffix == ".safetensors":
        raise ConfigurationError(
            f"--max-shard-size writes a folder of shards and an index: give -o FOLDER, not {output.name}"
        )
    if folder and options.resume is not None:
        raise ConfigurationError("--resume continues a single .safetensors file; drop --max-shard-size")
    if not folder and output.is_dir():
        raise OutputError(f"{output}: is a folder; give a file name ending .safetensors")
    return output


def _check_output_is_not_an_input(output: Path, units: list[Path]) -> None:
    """Writing over a checkpoint (``-o`` naming one, with ``--overwrite``) would destroy the user's data.

    Every candidate counts, including those discovery skipped (copies such as checkpoint_last.pt).
    """
    target = output.resolve()
    for path in units:
        unit = path.resolve()
        if target == unit or unit in target.parents or target in unit.parents:
            raise OutputError(
                f"{output}: is (or is inside, or holds) the checkpoint {path}; write the average somewhere else"
            )


def _check_names(outputs: list[OutputTensor], first: Checkpoint) -> None:
    """Names safetensors cannot store are refused now, not found out after the work."""
    for t in outputs:
        problem = name_problem(t.name)
        if problem is not None:
            raise CheckpointError(
                first.path, f"tensor {t.name!r} cannot be written to safetensors: {problem}"
            )


def _check_memory(plan: Plan, first: Checkpoint) -> None:
    """A tensor whose working memory exceeds the machine's RAM cannot be averaged here at all: refused now,
    rather than failing an allocation midway (a sparse file of a few KB on disk can claim terabytes)."""

    def need(t: OutputTensor) -> int:
        return max(t.work_nbytes, t.spec.nbytes)  # copied tensors are read whole

    largest = max(plan.outputs, key=need)
    total = physical_memory()
    if total is not None and need(largest) > total:
        raise CheckpointError(
            first.path,
            f"tensor {largest.source!r} ({list(largest.spec.shape)}) needs {need(largest)} bytes of "
            f"working memory, more than this machine's {total}",
        )


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
        check_resumable(resumed, outputs, notes)
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
    if not prepared.output.parent.is_dir():
        raise OutputError(f"{prepared.output.parent}: output folder does not exist")
    with OutputLock(prepared.output):
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
    metadata = _metadata(prepared)
    if options.max_shard_size:
        return ShardedWriter(
            prepared.output,
            entries,
            metadata,
            overwrite=prepared.may_replace,
            max_shard_size=options.max_shard_size,
        )
    return SafetensorsWriter(prepared.output, entries, metadata, overwrite=prepared.may_replace)


def _metadata(prepared: PreparedRun) -> dict[str, str]:
    resumed = prepared.resumed
    steps = (resumed.steps if resumed else []) + [c.step or 0 for c in prepared.checkpoints]
    files = (resumed.files if resumed else []) + [c.path.name for c in prepared.checkpoints]
    return output_metadata(prepared.options.settings, prepared.options.dtype, steps, files)


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
    check = not prepared.options.allow_nonfinite
    settings = prepared.options.settings
    rule = settings.rule()
    averages: dict[str, torch.Tensor] = {}
    read = 0
    if to_average:
        staging = _Staging(to_average, device)
        group_bytes = sum(t.spec.nbytes for t in to_average)
        average: MovingAverage | None = None
        for i, source in enumerate(sources):
            slot = i % len(staging.buffers)
            values = _read(source, to_average, staging, slot)
            if average is None:
                average = MovingAverage.by_name(settings.method).from_tensors(
                    values, rule=rule, device=device
                )
            else:
                decay = plan.decays[i]
                assert decay is not None
                average.update_with_decay(values, decay)
            staging.mark_in_use(slot, device)
            del values
            source.close()  # a mapped file's touched pages leave memory; thousands of files never stay open
            read += group_bytes
            progress(group_bytes)
        assert average is not None
        if check and not average.all_finite():  # NaN and Inf never wash out of an average: one check suffices
            raise _nonfinite(sources, plan.steps, to_average)
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


def _nonfinite(sources: list[Checkpoint], steps: list[int], tensors: list[OutputTensor]) -> NonFiniteError:
    """Name the first source and tensor that brought NaN/Inf in: looked for only after the cheap check of
    the finished group failed, by reading the group again."""
    for source, step in zip(sources, steps, strict=True):
        for t in tensors:
            if not bool(torch.isfinite(source.read(t.source)).all()):
                source.close()
                return NonFiniteError(
                    source.path,
                    f"tensor {t.source!r} holds NaN or Inf (step {step}); refused. --allow-nonfinite averages it anyway",
                )
        source.close()
    return NonFiniteError(
        sources[-1].path, "the average overflowed to Inf; refused. --allow-nonfinite keeps it anyway"
    )


def _read(
    ckpt: Checkpoint, tensors: list[OutputTensor], staging: _Staging, slot: int
) -> dict[str, torch.Tensor]:
    """One source's tensors of a group, keyed by saved name: read fresh where the source says so (mapped
    files give views of their mapping; an earlier average keeps its own dtype), else into the staging."""
    if ckpt.zero_copy:
        return {t.source: ckpt.read(t.source) for t in tensors}
    views = staging.views(slot)
    return {t.source: ckpt.read_into(t.source, view) for t, view in zip(tensors, views, strict=True)}


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
