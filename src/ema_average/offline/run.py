"""The offline job: a run's checkpoints, streamed through the engine, into safetensors.

discover -> plan -> stream chunks of tensor bytes, each folded over every checkpoint while in cache, into
one output per average -> commit. Knows nothing of the command line: progress goes out through a callback.
Where the outputs go and the checks on them before any work are in :mod:`ema_average.offline.output_plan`.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ema_average.checkpoints import Checkpoint, Run, find_run
from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.errors import (
    ConfigurationError,
    DeviceError,
    NoCheckpointsError,
    OutputError,
)
from ema_average.offline import streaming
from ema_average.offline.options import RunOptions
from ema_average.offline.output_plan import (
    check_names,
    check_not_an_input,
    check_sizes,
    output_folder,
    output_paths,
)
from ema_average.offline.output_plan import default_output as default_output  # re-exported: watch, tests
from ema_average.offline.output_plan import labelled as labelled  # re-exported: tests
from ema_average.offline.plan import (
    AverageSettings,
    Chunk,
    Plan,
    PlannedAverage,
    chunk_layout,
    effective_weights,
    first_dominates_note,
    one_value_hint,
    output_tensors,
    sweep_labels,
    update_decays,
)
from ema_average.offline.resume import Resumed, check_resumable, left_out, open_resumed, output_metadata
from ema_average.output import (
    OutputLock,
    SafetensorsWriter,
    ShardedWriter,
    TensorEntry,
    commit_together,
    remove_stale_temporaries,
)
from ema_average.output.folder_plan import OutputFolder, SideFile

Progress = Callable[[int], None]  # bytes just processed


@dataclass
class PreparedRun:
    """A run found and planned, checked against device and outputs, before anything is written.

    ``sources`` are what the averages are built from in order: the resumed output first, if any, then the
    checkpoints. Each of ``plan.averages`` (decays and weights run alongside the sources) is written to
    the output at the same place in ``outputs``.
    """

    options: RunOptions
    run: Run
    checkpoints: list[Checkpoint]
    plan: Plan
    outputs: list[Path]
    device: torch.device
    threads: int
    resumed: Resumed | None = None
    may_replace: bool = False  # --overwrite, or refreshing the very output being resumed
    left_out: list[str] = field(default_factory=list)  # checkpoints older than a resumed output's last step
    folder: OutputFolder | None = None  # what a folder output holds (weights name, side files); None: a file

    @property
    def output(self) -> Path:
        """The first (usually only) output."""
        return self.outputs[0]

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
        return sum(chunk.bytes_read(len(self.sources)) for chunk in self.plan.chunks)

    @property
    def chunk_bytes(self) -> int:
        """The largest chunk's input bytes from one source (what the plan reports)."""
        return max((c.numel * c.dtype.itemsize for c in self.plan.chunks), default=0)


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

    @classmethod
    def of(
        cls,
        writers: Sequence[SafetensorsWriter | ShardedWriter],
        prepared: PreparedRun,
        bytes_read: int,
        start: float,
        peak: int,
    ) -> Summary:
        """A finished run's summary, the same for one process and for torchrun's rank 0."""
        return cls(
            [path for writer in writers for path in writer.paths],
            len(prepared.plan.outputs),
            bytes_read,
            sum(writer.size for writer in writers),
            time.perf_counter() - start,
            peak,
        )


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


def prepare(options: RunOptions, *, dry_run: bool = False, only: set[Path] | None = None) -> PreparedRun:
    """Find the run, plan the work and check device and outputs: every input error surfaces here.

    A dry run reports an existing output as a note instead of refusing, so the plan can still be seen.
    ``only`` limits the run to those candidate checkpoints (used by :func:`ema_average.offline.watch.watch`).
    """
    settings = options.all_settings
    if not settings:
        raise ConfigurationError("no average to compute: give at least one setting")
    for each in settings:
        each.rule()  # bad settings fail before anything is read
    labels = sweep_labels(settings)
    if len(settings) > 1 and options.resume is not None:
        raise ConfigurationError(f"--resume and --watch continue one average: {one_value_hint(settings)}")
    if options.resume is not None and options.checkpoints.thins:
        raise ConfigurationError("--last and --every cannot be combined with --resume or --watch")
    if options.threads is not None and options.threads < 1:
        raise ConfigurationError(f"--threads must be at least 1, got {options.threads}")
    device = resolve_device(options.device)
    outputs = output_paths(options, labels)
    run = find_run(
        options.checkpoint_dir,
        state_dict_key=options.state_dict_key,
        trust_pickle=options.trust_pickle,
        steps_from=options.steps_from,
        only=only,
        submodel=options.submodel,
        step_every=options.step_every,
        steps=options.steps,
        globs=options.globs,
        keeps=options.selection.keeps,
        strip_prefix=options.selection.strip_prefix,
    )
    chosen = set(options.checkpoints.indices([c.step or 0 for c in run.checkpoints]))
    checkpoints = [c for i, c in enumerate(run.checkpoints) if i in chosen]
    if not checkpoints:
        raise NoCheckpointsError(run.root, "no checkpoints left after --from-step/--to-step/--every/--last")
    resumed, older = None, []
    if options.resume is not None:
        resumed = open_resumed(options.resume, settings[0])
        older = left_out(resumed, [(c.path.name, c.step or 0) for c in checkpoints])
        run.notices += older
        checkpoints = [c for c in checkpoints if (c.step or 0) > resumed.progress.last_step]
    for output in outputs:
        check_not_an_input(output, run.units)
    threads = options.threads or streaming.default_threads(device)
    plan = make_plan(run, checkpoints, resumed, options, labels, device)
    first = checkpoints[0] if checkpoints else run.checkpoints[-1]
    check_names(plan.outputs, first)
    check_sizes(plan, first, outputs[0], threads)
    continuing = options.resume is not None and outputs[0].resolve() == options.resume.resolve()
    for output in outputs:
        if output.exists() and not (options.overwrite or continuing):
            if not dry_run:
                raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
            plan.notes.append(f"{output} already exists: a real run needs --overwrite")
    may_replace = options.overwrite or continuing
    folder = output_folder(outputs, checkpoints)
    return PreparedRun(
        options, run, checkpoints, plan, outputs, device, threads, resumed, may_replace, older, folder
    )


def make_plan(
    run: Run,
    checkpoints: list[Checkpoint],
    resumed: Resumed | None,
    options: RunOptions,
    labels: list[str],
    device: torch.device,
) -> Plan:
    notes = list(run.notices)
    for ckpt in checkpoints:
        notes += [f"{ckpt.path.name}: {note}" for note in ckpt.notes]
    first = checkpoints[0] if checkpoints else run.checkpoints[-1]
    selection = replace(options.selection, strip_prefix="")  # stripped on reading (find_run)
    outputs = output_tensors(first.specs(), first.aliases(), selection, options.dtype)
    steps = [c.step or 0 for c in checkpoints]
    first_specs = {}
    if resumed is not None:
        check_resumable(resumed, outputs, notes)
        first_specs = resumed.average.specs()
    averages = []
    for settings, label in zip(options.all_settings, labels, strict=True):
        decays = update_decays(steps, settings, resumed.progress if resumed else None)
        if resumed is not None:
            decays = [None, *decays]
        weights = effective_weights(decays)
        dominated = first_dominates_note(steps, weights, settings) if resumed is None else None
        if dominated:
            notes.append(f"{label}: {dominated}" if label else dominated)
        averages.append(PlannedAverage(settings, decays, weights, label))
    if resumed is not None:
        steps = [resumed.progress.last_step, *steps]
    tied = [t for t in outputs if t.alias_of is not None]
    if tied:
        pairs = ", ".join(f"{t.input_name} = {t.alias_of}" for t in tied[:3])
        notes.append(f"tied weights averaged once and written under both names: {pairs}")
    sources = ([resumed.average] if resumed else []) + (checkpoints or [first])
    split = all(streaming.reads_ranges(s) for s in sources)
    numel = options.chunk_numel or streaming.chunk_numel(device)
    chunks = chunk_layout(outputs, first_specs, numel, split=split)
    if not split:
        notes.append(
            "a source reads only whole tensors: chunks keep tensors whole (memory grows with the largest)"
        )
    return Plan(steps, averages, outputs, chunks, notes)


def average_checkpoints(options: RunOptions, on_progress: Progress | None = None) -> Summary:
    """The whole offline job: prepare, then execute."""
    return execute(prepare(options), on_progress)


def execute(
    prepared: PreparedRun,
    on_progress: Progress | None = None,
    *,
    on_committed: Callable[[], None] | None = None,
) -> Summary:
    """Stream every chunk through the engine into every output; on any failure, no output is left behind.
    ``on_committed`` is called once every output is written whole, just before the first is named (the
    command stops taking Ctrl-C as a cancel there): from then on the run names them all.

    Each output is committed atomically, and only once every output has been written whole, fsynced and
    read back: a failure in the work or at that check (a disk that fills at fsync) leaves none. Only the
    renames that then name them, one per output, are not one step together: Ctrl-C and SIGTERM wait until
    the last is done, and a rename that fails says which outputs are new (see ``commit_together``).
    """
    if prepared.up_to_date:
        raise ConfigurationError(
            f"{prepared.output} is up to date: no checkpoint is newer than its last step"
        )
    start = time.perf_counter()
    writers: list[SafetensorsWriter | ShardedWriter] = []
    with contextlib.ExitStack() as locks:
        claim_outputs(prepared, locks)
        try:
            side_files = prepared.folder.read_side_files() if prepared.folder else {}  # once for all outputs
            for average, output in zip(prepared.plan.averages, prepared.outputs, strict=True):
                writers.append(_open_writer(prepared, average, output, side_files))
            bytes_read = stream_chunks(prepared, writers, on_progress or (lambda _n: None))
            commit_together(writers, before_naming=on_committed, after_naming=locks.close)
        except BaseException:
            for writer in writers:
                writer.abort()  # a no-op for one already committed
            raise
        finally:
            for ckpt in prepared.sources:
                ckpt.close()
    return Summary.of(writers, prepared, bytes_read, start, peak_rss())


def stream_chunks(
    prepared: PreparedRun,
    writers: Sequence[SafetensorsWriter | ShardedWriter],
    progress: Progress,
    chunks: Sequence[Chunk] | None = None,
) -> int:
    """Every chunk of every tensor (or only ``chunks``: a rank's share under torchrun), over every source,
    into every output; returns the bytes read."""
    plan = prepared.plan
    for t in plan.outputs:  # empty tensors have no chunk
        if t.spec.numel == 0:
            for writer in writers:
                writer.write(t.name, torch.empty(t.spec.shape, dtype=t.out_dtype))
    folds = [
        streaming.Fold(average.decays, writer, average.weights if average.sums else None)
        for average, writer in zip(plan.averages, writers, strict=True)
    ]
    stream = streaming.ChunkStream(
        prepared.sources,
        plan.steps,
        prepared.checkpoints[-1],
        folds,
        device=prepared.device,
        threads=prepared.threads,
        check_finite=not prepared.options.allow_nonfinite,
    )
    return stream.run(plan.chunks if chunks is None else chunks, progress)


def claim_outputs(prepared: PreparedRun, held: contextlib.ExitStack) -> None:
    """Before anything is written: every output's folder exists, each output is locked against another
    run until ``held`` closes, and temporaries that killed runs left beside them are removed."""
    folders = {output.parent for output in prepared.outputs}
    for folder in folders:
        if not folder.is_dir():
            raise OutputError(f"{folder}: output folder does not exist")
    for output in prepared.outputs:
        held.enter_context(OutputLock(output))
    for folder in folders:
        remove_stale_temporaries(folder)


def output_entries(plan: Plan) -> list[TensorEntry]:
    """Every output tensor as a written header lists it: its name, shape and output dtype."""
    return [TensorEntry(t.name, TensorSpec(t.spec.shape, t.out_dtype)) for t in plan.outputs]


def _open_writer(
    prepared: PreparedRun, average: PlannedAverage, output: Path, side_files: dict[str, SideFile]
) -> SafetensorsWriter | ShardedWriter:
    options = prepared.options
    entries = output_entries(prepared.plan)
    metadata = {**run_metadata(prepared, average.settings), **average.metadata}
    folder = prepared.folder
    if folder is None:
        return SafetensorsWriter(output, entries, metadata, overwrite=prepared.may_replace)
    return folder.open_writer(
        output,
        entries,
        metadata,
        overwrite=prepared.may_replace,
        max_shard_size=options.max_shard_size,
        side_files=side_files,
    )


def run_metadata(prepared: PreparedRun, settings: AverageSettings) -> dict[str, str]:
    resumed = prepared.resumed
    steps = (resumed.steps if resumed else []) + [c.step or 0 for c in prepared.checkpoints]
    files = (resumed.files if resumed else []) + [c.path.name for c in prepared.checkpoints]
    count = (resumed.progress.count if resumed else 0) + len(prepared.checkpoints)
    return output_metadata(settings, prepared.options.dtype, steps, files, count)


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
