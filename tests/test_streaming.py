"""Chunked streaming: results exactly the engine's, whatever the chunks, threads or number of averages."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ema_average.checkpoints import Checkpoint, SafetensorsCheckpoint, TensorSpec
from ema_average.engine.averages import MovingAverage
from ema_average.errors import ConfigurationError, NonFiniteError, OutputError
from ema_average.offline import streaming
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import (
    AverageSettings,
    CheckpointSelection,
    OutputTensor,
    TensorSelection,
    chunk_layout,
    output_tensors,
)
from ema_average.offline.run import average_checkpoints, labelled, prepare
from ema_average.output import SafetensorsWriter
from ema_average.output import file as output_file
from helpers import assert_weighted_sum

STEPS = [100, 250, 400, 1000]
SETTINGS = {
    "checkpoint": AverageSettings(decay=0.9),
    "step": AverageSettings(decay=0.999, schedule="step"),
    "uniform": AverageSettings("uniform"),
    "power": AverageSettings("power", sigma_rel=0.1, schedule="step"),
}
# (chunk elements, threads): the default, chunks that cut every tensor at odd places, several workers
LAYOUTS = [(None, 1), (7, 1), (7, 3), (64, 2), (1000, 2)]


def state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors larger than the small chunks, smaller ones sharing a chunk, an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3000, generator=g).to(dtype),
        "b.bias": torch.randn(7, generator=g).to(dtype),
        "c.weight": torch.randn(50, 40, generator=g).to(dtype),
        "count": torch.arange(1000, dtype=torch.int64) + seed,
    }


def write_run(folder: Path, dtype: torch.dtype = torch.float32, steps: list[int] = STEPS) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    states = []
    for step in steps:
        states.append(state(step, dtype))
        save_file(states[-1], str(folder / f"step_{step}.safetensors"), metadata={"step": str(step)})
    return states


def average(run: Path, out: Path, settings=SETTINGS["checkpoint"], **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    average_checkpoints(RunOptions(run, out, settings=settings, overwrite=True, **kwargs))
    return out.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_results_do_not_depend_on_chunks_or_threads(tmp_path: Path, dtype: torch.dtype, method: str) -> None:
    write_run(tmp_path / "run", dtype)
    outputs = {
        layout: average(
            tmp_path / "run", tmp_path / "o.safetensors", SETTINGS[method], chunk_numel=c, threads=t
        )
        for layout in LAYOUTS
        for c, t in [layout]
    }
    assert len(set(outputs.values())) == 1, "every layout must give the same bytes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_bit_identical_to_the_engine_over_whole_tensors(
    tmp_path: Path, dtype: torch.dtype, method: str
) -> None:
    """What the pipeline computed before chunking: ``from_tensors`` over the first checkpoint, then
    ``update_with_decay`` with the plan's decay per checkpoint, per whole tensor. Same bits, for fp32/fp64
    (lerp) and for bf16 tensors of at least 64K elements (convert into a float32 scratch, then lerp); small
    bf16 tensors up to one bf16 rounding."""
    steps = STEPS[:3]
    run = tmp_path / "run"
    run.mkdir()
    states = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        states.append(
            {"w": torch.randn(70_000, generator=g).to(dtype), "v": torch.randn(300, generator=g).to(dtype)}
        )
        save_file(states[-1], str(run / f"step_{step}.safetensors"), metadata={"step": str(step)})
    settings = SETTINGS[method]
    options = RunOptions(run, tmp_path / "o.safetensors", settings=settings, chunk_numel=4096, threads=2)
    decays = prepare(options).plan.decays
    average_checkpoints(options)
    out = load_file(str(tmp_path / "o.safetensors"))
    for name in ("w", "v"):
        engine = MovingAverage.by_name(settings.method).from_tensors(
            {name: states[0][name]}, rule=settings.rule()
        )
        for values, decay in zip(states[1:], decays[1:], strict=True):
            engine.update_with_decay({name: values[name]}, decay)
        expected = engine.averages()[name].to(dtype)
        if dtype == torch.bfloat16 and name == "v":
            # The engine folds small mixed-dtype tensors in with mul + add, the stream with lerp: their
            # float32 averages differ in the last bits, so the bf16 outputs by at most one rounding step.
            torch.testing.assert_close(out[name], expected, rtol=2**-7, atol=1e-6)
        else:
            assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_every_method_matches_the_float64_oracle(tmp_path: Path, dtype: torch.dtype, method: str) -> None:
    """The average is the plan's weights applied to the checkpoints, summed in float64."""
    states = write_run(tmp_path / "run", dtype)
    options = RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=SETTINGS[method])
    options.dtype = "float32" if dtype != torch.float64 else "as-input"
    options.chunk_numel, options.threads = 64, 3
    weights = prepare(options).plan.weights
    average_checkpoints(options)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert_weighted_sum(out, states, weights)
    assert torch.equal(out["count"], states[-1]["count"])  # integers: the latest checkpoint's


def test_stored_expectation(tmp_path: Path) -> None:
    """Constant checkpoints 1, 2, 4 at decay 0.5 (steps far past the warm-up): 0.5 * (0.5 * 1 + 0.5 * 2)
    + 0.5 * 4 = 2.75, exact in every float type, across chunk boundaries."""
    run = tmp_path / "run"
    run.mkdir()
    for step, value in zip((1000, 2000, 3000), (1.0, 2.0, 4.0), strict=True):
        save_file(
            {"w": torch.full((5000,), value)},
            str(run / f"s_{step}.safetensors"),
            metadata={"step": str(step)},
        )
    average(run, tmp_path / "o.safetensors", AverageSettings(decay=0.5), chunk_numel=999, threads=2)
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["w"], torch.full((5000,), 2.75))


def test_mixed_dtypes_and_resume_through_chunks(tmp_path: Path) -> None:
    """bf16 and fp32 tensors in one model, resumed from a float32 output: one run's bits."""
    run = tmp_path / "run"
    run.mkdir()
    for step in STEPS:
        g = torch.Generator().manual_seed(step)
        tensors = {"h": torch.randn(900, generator=g).bfloat16(), "f": torch.randn(500, generator=g)}
        save_file(tensors, str(run / f"step_{step}.safetensors"), metadata={"step": str(step)})
    settings = AverageSettings(decay=0.99, schedule="step")
    one = average(run, tmp_path / "one.safetensors", settings, dtype="float32", chunk_numel=128, threads=3)
    early = tmp_path / "early"
    early.mkdir()
    for step in STEPS[:2]:
        (early / f"step_{step}.safetensors").write_bytes((run / f"step_{step}.safetensors").read_bytes())
    average(early, tmp_path / "live.safetensors", settings, dtype="float32")
    prepared = prepare(
        RunOptions(
            run, settings=settings, dtype="float32", resume=tmp_path / "live.safetensors", chunk_numel=77
        )
    )
    assert {c.first_dtype for c in prepared.plan.chunks} == {torch.float32}  # the output's own dtype
    average_checkpoints(prepared.options)
    live = load_file(str(tmp_path / "live.safetensors"))
    assert all(torch.equal(load_file(str(tmp_path / "one.safetensors"))[n], live[n]) for n in live)
    assert one == (tmp_path / "one.safetensors").read_bytes()


def test_tied_weights_split_across_chunks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step in STEPS:
        embed = torch.randn(100, 16, generator=torch.Generator().manual_seed(step))
        torch.save(
            {"model": {"embed.weight": embed, "head.weight": embed}, "step": step}, run / f"c_{step}.pt"
        )
    split = average(run, tmp_path / "o.safetensors", chunk_numel=300, threads=2)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(out["head.weight"], out["embed.weight"])
    assert average(run, tmp_path / "o.safetensors") == split


def test_mapped_torch_files_match_safetensors(tmp_path: Path) -> None:
    """Zip torch files are read through their mapped views, chunk by chunk: the same bits."""
    states = write_run(tmp_path / "st")
    (tmp_path / "pt").mkdir()
    for step, tensors in zip(STEPS, states, strict=True):
        torch.save({"model": tensors, "step": step}, tmp_path / "pt" / f"c_{step}.pt")
    from_st = average(tmp_path / "st", tmp_path / "a.safetensors", chunk_numel=100, threads=2)
    average(tmp_path / "pt", tmp_path / "b.safetensors", chunk_numel=100, threads=2)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert from_st and all(torch.equal(a[n], b[n]) for n in a)


# --- many averages in one pass ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sweep",
    [
        [AverageSettings(decay=d) for d in (0.9, 0.99, 0.999)],
        [AverageSettings(half_life=h, schedule="step") for h in (50.0, 500.0)],
        [AverageSettings("power", sigma_rel=s, schedule="step") for s in (0.05, 0.1)],
    ],
    ids=["decay", "half-life", "sigma-rel"],
)
@pytest.mark.parametrize(
    ("dtype", "steps"),
    [(torch.bfloat16, STEPS), (torch.float32, STEPS), (torch.float32, STEPS[:1])],
    ids=["bf16", "fp32", "one-checkpoint"],  # staged start; first read straight into a shadow; no update
)
def test_each_of_several_averages_equals_its_own_run(
    tmp_path: Path, sweep: list[AverageSettings], dtype: torch.dtype, steps: list[int]
) -> None:
    write_run(tmp_path / "run", dtype, steps)
    out = tmp_path / "ema.safetensors"
    prepared = prepare(RunOptions(tmp_path / "run", out, settings=sweep, chunk_numel=500, threads=2))
    labels = [a.label for a in prepared.plan.averages]
    assert prepared.outputs == [labelled(out, label) for label in labels]
    summary = average_checkpoints(prepared.options)
    assert summary.outputs == prepared.outputs
    for settings, path in zip(sweep, prepared.outputs, strict=True):
        alone = average(tmp_path / "run", tmp_path / "alone.safetensors", settings)
        assert path.read_bytes() == alone, path.name  # metadata included: each records its own settings
        with safe_open(str(path), "pt") as f:
            assert settings.as_metadata().items() <= f.metadata().items()
    assert len({p.read_bytes() for p in prepared.outputs}) == len(sweep)


def test_several_averages_are_named_for_their_setting(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    sweep = [AverageSettings(decay=0.999), AverageSettings(decay=0.9999)]
    assert prepare(RunOptions(tmp_path / "run", settings=sweep)).outputs == [
        tmp_path / "run-ema-decay0.999.safetensors",
        tmp_path / "run-ema-decay0.9999.safetensors",
    ]
    folders = prepare(RunOptions(tmp_path / "run", settings=sweep, max_shard_size=10**6)).outputs
    assert [p.name for p in folders] == ["run-ema-decay0.999", "run-ema-decay0.9999"]


def test_several_averages_cannot_be_resumed(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    average(tmp_path / "run", tmp_path / "o.safetensors")
    sweep = [AverageSettings(decay=0.9), AverageSettings(decay=0.99)]
    with pytest.raises(ConfigurationError, match="--resume and --watch continue one average"):
        prepare(RunOptions(tmp_path / "run", settings=sweep, resume=tmp_path / "o.safetensors"))


def test_a_failed_run_of_several_leaves_no_output(tmp_path: Path) -> None:
    states = write_run(tmp_path / "run")
    states[2]["a.weight"][2500] = float("nan")
    save_file(
        states[2], str(tmp_path / "run" / f"step_{STEPS[2]}.safetensors"), metadata={"step": str(STEPS[2])}
    )
    sweep = [AverageSettings(decay=0.9), AverageSettings(decay=0.99)]
    with pytest.raises(NonFiniteError):
        average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=sweep))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("output", ["o.safetensors", "o"], ids=["files", "folders"])
def test_a_disk_failure_at_the_last_outputs_commit_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    # The last output's read-back fails (what a disk that lost writes does): the first, already fsynced and
    # checked, must not have been named either, and an earlier output of the same name stays as it was.
    write_run(tmp_path / "run")
    sweep = [AverageSettings(decay=0.9), AverageSettings(decay=0.5)]
    shards = None if output.endswith(".safetensors") else 20_000  # folders: several shards and an index
    options = RunOptions(tmp_path / "run", tmp_path / output, settings=sweep, max_shard_size=shards)
    first = prepare(options).outputs[0]
    earlier = CheckpointSelection(last=2)  # an earlier output by that name, unlike what this run writes
    average_checkpoints(
        RunOptions(tmp_path / "run", first, settings=sweep[0], max_shard_size=shards, checkpoints=earlier)
    )
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    verify = output_file._verify_written

    def lost_writes(readable: str, path: Path, *args: object) -> None:
        if "decay0.5" in str(path):
            raise OutputError(f"{path}: reads back other than written")
        verify(readable, path, *args)

    monkeypatch.setattr(output_file, "_verify_written", lost_writes)
    with pytest.raises(OutputError, match=r"decay0\.5"):
        average_checkpoints(dataclasses.replace(options, overwrite=True))
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


# --- NaN/Inf, per chunk -----------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "threads"), [(None, 1), (64, 3)])
def test_nonfinite_is_named_in_a_split_tensor(tmp_path: Path, chunk: int | None, threads: int) -> None:
    states = write_run(tmp_path / "run")
    states[2]["a.weight"][2500] = float("inf")
    save_file(
        states[2], str(tmp_path / "run" / f"step_{STEPS[2]}.safetensors"), metadata={"step": str(STEPS[2])}
    )
    with pytest.raises(
        NonFiniteError, match=r"step_400\.safetensors: tensor 'a\.weight' holds NaN or Inf \(step 400\)"
    ):
        average(tmp_path / "run", tmp_path / "o.safetensors", chunk_numel=chunk, threads=threads)
    assert not (tmp_path / "o.safetensors").exists()


def test_an_average_that_overflows_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step, value in ((1000, 3e38), (2000, -3e38)):
        save_file(
            {"w": torch.full((10,), value)}, str(run / f"s_{step}.safetensors"), metadata={"step": str(step)}
        )
    with pytest.raises(NonFiniteError, match=r"s_2000\.safetensors: the average overflowed to Inf"):
        average(run, tmp_path / "o.safetensors", AverageSettings(decay=0.5))


# --- the streaming machinery --------------------------------------------------------------------------


class Wrapped(Checkpoint):
    """Another checkpoint's tensors, read whole through it (the base class's range reads read whole)."""

    def __init__(self, inner: Checkpoint, step: int) -> None:
        super().__init__(inner.path)
        self.inner, self.step = inner, step

    def specs(self) -> dict[str, TensorSpec]:
        return self.inner.specs()

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(name)


class Guarded(Wrapped):
    """A checkpoint that counts the times two threads used it at once (its inner one's range reads)."""

    def __init__(self, inner: Checkpoint, step: int, meeting: Meeting | None = None) -> None:
        super().__init__(inner, step)
        self.active, self.overlaps = 0, 0
        self.lock = threading.Lock()
        self.meeting = meeting

    def _enter(self) -> None:
        with self.lock:
            self.active += 1
            self.overlaps += self.active > 1
        if self.meeting is not None:
            self.meeting.hold(self)

    def _leave(self) -> None:
        with self.lock:
            self.active -= 1

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._enter()
        try:
            return self.inner.read_into(name, out)
        finally:
            self._leave()

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        self._enter()
        try:
            return self.inner.read_range_into(name, start, out)
        finally:
            self._leave()


class Meeting:
    """Makes two threads want one source at once, every run: the first thread to read ``source`` waits
    inside that read until a second thread reads it too (the guard failed) or waits for the stream's lock
    on it (:class:`CountedLock`, the guard holding). No clock decides; ``patience`` only ends a hang."""

    def __init__(self, source: Guarded, patience: float = 120.0) -> None:
        self.source = source
        self.patience = patience
        self.state = threading.Condition()
        self.held = False
        self.waiting = 0  # threads waiting for the stream's lock on ``source``
        self.met = False

    def hold(self, source: Guarded) -> None:
        """Called inside each read of a source: the first read of ``source`` waits for the second thread."""
        with self.state:
            if source is not self.source:
                return
            if self.held:  # a second thread inside the read: the overlap, counted by the source
                self.met = True
                self.state.notify_all()
                return
            self.held = True
            if not self.state.wait_for(lambda: self.met or self.waiting > 0, self.patience):
                raise AssertionError("no second thread came for the source: the threads never overlapped")
            self.met = True

    def lock_for(self, checkpoint: Checkpoint) -> CountedLock | None:
        return CountedLock(self) if checkpoint is self.source else None


class CountedLock:
    """The stream's per-source lock, telling the meeting when a thread waits for it."""

    def __init__(self, meeting: Meeting) -> None:
        self.meeting = meeting
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            with self.meeting.state:
                self.meeting.waiting += 1
                self.meeting.state.notify_all()
            self.lock.acquire()
            with self.meeting.state:
                self.meeting.waiting -= 1

    def __exit__(self, *_: object) -> None:
        self.lock.release()


class Collect:
    """A sink keeping what it is given."""

    def __init__(self, outputs: list[OutputTensor]) -> None:
        self.tensors = {t.name: torch.full((t.spec.numel,), -1, dtype=t.out_dtype) for t in outputs}

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        self.tensors[name][start : start + tensor.numel()] = tensor


def stream(sources: list[Checkpoint], numel: int, threads: int, *, split: bool = True) -> Collect:
    outputs = output_tensors(sources[0].specs(), {}, TensorSelection(), "as-input")
    chunks = chunk_layout(outputs, {}, numel, split=split)
    sink = Collect(outputs)
    fold = streaming.Fold([None, *[0.5] * (len(sources) - 1)], sink)
    steps = [c.step or 0 for c in sources]
    run = streaming.ChunkStream(
        sources, steps, sources[-1], [fold], device=torch.device("cpu"), threads=threads, check_finite=True
    )
    run.run(chunks, lambda _n: None)
    return sink


def test_a_source_is_read_by_one_thread_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two threads are made to want the second source at once (Meeting): the test sees them meet there,
    # so a missing guard shows as an overlap every run instead of passing when the threads never overlap.
    write_run(tmp_path / "run")
    files = [tmp_path / "run" / f"step_{s}.safetensors" for s in STEPS]
    sources = [Guarded(SafetensorsCheckpoint(f), s) for f, s in zip(files, STEPS, strict=True)]
    meeting = Meeting(sources[1])
    for source in sources:
        source.meeting = meeting

    class WatchedSource(streaming._Source):
        def __init__(self, checkpoint: Checkpoint, step: int) -> None:
            super().__init__(checkpoint, step)
            self.lock = meeting.lock_for(checkpoint) or self.lock

    monkeypatch.setattr(streaming, "_Source", WatchedSource)
    stream(sources, 37, threads=4)
    assert meeting.met
    assert [s.overlaps for s in sources] == [0, 0, 0, 0]


class WholeOnly(Wrapped):
    """A layout that can only read whole tensors (the base class's read_range_into), counting its reads."""

    def __init__(self, inner: Checkpoint, step: int) -> None:
        super().__init__(inner, step)
        self.reads = 0

    def read(self, name: str) -> torch.Tensor:
        self.reads += 1
        return super().read(name)


def test_whole_tensor_layouts_keep_tensors_whole(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    files = [tmp_path / "run" / f"step_{s}.safetensors" for s in STEPS]
    whole = [WholeOnly(SafetensorsCheckpoint(f), s) for f, s in zip(files, STEPS, strict=True)]
    assert not streaming.reads_ranges(whole[0]) and streaming.reads_ranges(SafetensorsCheckpoint(files[0]))
    kept = stream(whole, 37, threads=2, split=False)
    assert whole[0].reads == 3 and whole[-1].reads == 4  # each tensor once (the latest: the integers too)
    split = stream([SafetensorsCheckpoint(f) for f in files], 37, threads=2)
    assert all(torch.equal(kept.tensors[n], split.tensors[n]) for n in kept.tensors)


def test_staged_device_path_gives_the_same_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path (host staging, copy over, fold there, copy back), run with the CPU as the
    'device': what CUDA does minus its streams and pinned memory."""
    write_run(tmp_path / "run", torch.bfloat16)
    direct = average(tmp_path / "run", tmp_path / "o.safetensors", chunk_numel=100, threads=2)

    class Staged(streaming._Worker):
        def __init__(self, sizes, averages: int, device: torch.device) -> None:  # type: ignore[no-untyped-def]
            super().__init__(sizes, averages, device)
            self.on_host = False
            self.host = [streaming._empty(sizes.staging) for _ in range(2)]
            self.events = [None, None]
            self.values = streaming._empty(sizes.staging)
            self.out_host = streaming._empty(max(sizes.out, sizes.shadow))

    monkeypatch.setattr(streaming, "_Worker", Staged)
    assert average(tmp_path / "run", tmp_path / "o.safetensors", chunk_numel=100, threads=2) == direct


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_devices_present_match_the_oracle(tmp_path: Path, device: str) -> None:
    """On every device this machine has (CUDA: pinned buffers, a stream per worker), the oracle's result."""
    if device not in DEVICES:
        pytest.skip("no CUDA device here")
    states = write_run(tmp_path / "run", torch.bfloat16)
    options = RunOptions(tmp_path / "run", tmp_path / "o.safetensors", device=device, dtype="float32")
    options.chunk_numel, options.threads = 1000, 2
    weights = prepare(options).plan.weights
    average_checkpoints(options)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert_weighted_sum(out, states, weights)


def test_writer_takes_pieces_from_threads(tmp_path: Path) -> None:
    from ema_average.checkpoints.safetensors_format import TensorEntry, TensorSpec

    writer = SafetensorsWriter(
        tmp_path / "o.safetensors", [TensorEntry("w", TensorSpec((100,), torch.float32))], {}, overwrite=False
    )
    values = torch.arange(100.0)
    threads = [
        threading.Thread(target=writer.write_range, args=("w", s, values[s : s + 10]))
        for s in range(0, 100, 10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.commit()
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["w"], values)
