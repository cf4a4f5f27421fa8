"""The offline job's inner loop, at the memory-bandwidth limit: chunks of tensor bytes, each folded over
every source while it sits in cache.

The plan cuts the tensors into chunks (:func:`ema_average.offline.plan.chunk_layout`). Each worker thread takes a
whole chunk: reads it from every source in turn into its own staging buffer (``pread`` releases the GIL),
folds each into the chunk's shadows with the engine's update (one flat update per source and average),
checks the result for NaN/Inf, converts it to the output dtype and writes it at its place in every output.
A chunk's shadows stay in cache while every source streams through them, so DRAM sees each input byte
once and each output byte once; T workers on T cores overlap one's reads with another's arithmetic and
writes. Memory is T sets of chunk buffers, whatever the model size or the number of checkpoints.

Every layout reads into the worker's buffers (``pread`` for safetensors and torch zip files), so nothing
of a checkpoint stays resident after its chunk. On CUDA the shadows live on the device: each worker reads into
two pinned buffers in turn and copies them over on a stream of its own, so the next read overlaps the last
copy and the arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from ema_average.checkpoints import Checkpoint
from ema_average.engine.averages import ema_update_
from ema_average.engine.fits import fits, largest_beyond, range_message
from ema_average.errors import NonFiniteError, OutputRangeError
from ema_average.offline.plan import Chunk

Progress = Callable[[int], None]  # bytes just processed

# Elements per chunk on the CPU. Measured on 2 cores (docs/benchmarks.md, Offline): at 64K elements two
# workers spend longer handing the GIL to each other around every read and kernel than reading (0.33 s
# against 0.15 s at 1M for 4 x 200 MB fp32); past 2M the shadows fall out of the last-level cache. A 1M
# chunk is 4 MiB of float32 shadow: it stays in L3, and DRAM still sees each input byte once.
_CPU_CHUNK_NUMEL = 1 << 20
# On an accelerator a chunk is one host-to-device copy: large enough to reach the link's bandwidth.
_DEVICE_CHUNK_NUMEL = 1 << 22
_MAX_THREADS = 8  # past this, a hot page cache is already at memory bandwidth


def chunk_numel(device: torch.device) -> int:
    """Elements per chunk on this kind of device (results never depend on it)."""
    return _CPU_CHUNK_NUMEL if device.type == "cpu" else _DEVICE_CHUNK_NUMEL


def reads_ranges(checkpoint: Checkpoint) -> bool:
    """Whether reading part of a tensor costs only that part (a layout's own ``read_range_into``);
    chunks keep tensors whole where any source cannot."""
    return type(checkpoint).read_range_into is not Checkpoint.read_range_into


def default_threads(device: torch.device) -> int:
    """One worker per usable core (each does its own reads, arithmetic and writes), at most a few."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_THREADS if device.type == "cpu" else 4))


class RangeSink(Protocol):
    """Where an average's chunks go: elements ``start ..`` of output tensor ``name``, from any thread."""

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None: ...


@dataclass
class Fold:
    """One average computed in the pass: the decay each source's update gets (the plan's), and its output.

    With ``weights`` it is a plain weighted sum instead, ``sum_k weights[k] * value_k`` (post-hoc EMA's
    coefficients, which may be negative: no chain of decays in [0, 1] gives them), and ``decays`` is unused.
    """

    decays: Sequence[float | None]
    sink: RangeSink
    weights: Sequence[float] | None = None


class _Source:
    """One source as the workers see it: used by one thread at a time (layouts open files lazily and are
    not promised to be thread-safe)."""

    def __init__(self, checkpoint: Checkpoint, step: int) -> None:
        self.checkpoint = checkpoint
        self.step = step
        self.lock = threading.Lock()
        specs = checkpoint.specs()
        self.numel = {name: spec.numel for name, spec in specs.items()}
        self.shapes = {name: spec.shape for name, spec in specs.items()}

    def read(self, chunk: Chunk, staging: torch.Tensor) -> torch.Tensor:
        """The chunk's elements from this source, read into ``staging`` (whole tensors by ``read_into``,
        pieces of split ones by ``read_range_into``)."""
        with self.lock:
            for piece in chunk.pieces:
                out = staging[piece.offset : piece.offset + piece.count]
                if piece.start == 0 and piece.count == self.numel[piece.input_name]:
                    self.checkpoint.read_into(piece.input_name, out.view(self.shapes[piece.input_name]))
                else:
                    self.checkpoint.read_range_into(piece.input_name, piece.start, out)
        return staging[: chunk.numel]

    def nonfinite(self, chunk: Chunk, staging: torch.Tensor) -> str | None:
        """The first tensor of the chunk holding NaN or Inf in this source, if any."""
        values = self.read(chunk, staging)
        for piece in chunk.pieces:
            if not bool(torch.isfinite(values[piece.offset : piece.offset + piece.count]).all()):
                return piece.input_name
        return None


@dataclass(frozen=True)
class _Sizes:
    """Bytes of each buffer a worker needs for the largest chunk of each role."""

    staging: int
    shadow: int
    out: int

    @classmethod
    def of(cls, chunks: Sequence[Chunk]) -> _Sizes:
        averaged = [c for c in chunks if c.averaged]
        return cls(
            staging=max((c.numel * max(c.first_dtype.itemsize, c.dtype.itemsize) for c in chunks), default=0),
            shadow=max((c.numel * c.shadow_dtype.itemsize for c in averaged), default=0),
            out=max((c.numel * c.out_dtype.itemsize for c in averaged), default=0),
        )


def _view(buffer: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    return buffer[: numel * dtype.itemsize].view(dtype)


class _Worker:
    """One thread's buffers, allocated once and reused for every chunk: staging for reads, the chunk's
    shadows, a scratch for conversions, the output chunk. On an accelerator the shadows live there: two
    host staging buffers (pinned on CUDA) are filled in turn and copied over on the worker's own stream."""

    def __init__(self, sizes: _Sizes, averages: int, device: torch.device) -> None:
        self.device = device
        self.on_host = device.type == "cpu"
        pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if pin else None
        self.host = [_empty(sizes.staging, pin=pin) for _ in range(1 if self.on_host else 2)]
        self.events: list[torch.cuda.Event | None] = [None] * len(self.host)
        self.values = None if self.on_host else _empty(sizes.staging, device=device)
        self.scratch = _empty(sizes.shadow, device=device)
        self.shadows = [_empty(sizes.shadow, device=device) for _ in range(averages)]
        self.out = _empty(sizes.out, device=device)
        self.out_host = None if self.on_host else _empty(max(sizes.out, sizes.shadow), pin=pin)

    def context(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def staging(self, k: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Host buffer for source ``k``'s read; on CUDA, once the copy that last read it is done."""
        slot = k % len(self.host)
        event = self.events[slot]
        if event is not None:
            event.synchronize()
            self.events[slot] = None
        return _view(self.host[slot], dtype, numel)

    def to_device(self, k: int, values: torch.Tensor) -> torch.Tensor:
        if self.on_host:
            return values
        assert self.values is not None
        moved = _view(self.values, values.dtype, values.numel())
        moved.copy_(values, non_blocking=self.stream is not None)
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[k % len(self.host)] = event
        return moved

    def to_host(self, values: torch.Tensor) -> torch.Tensor:
        """The finished output chunk on the host, ready to write (waits for the device)."""
        if self.on_host:
            return values
        assert self.out_host is not None
        host = _view(self.out_host, values.dtype, values.numel())
        host.copy_(values, non_blocking=self.stream is not None)
        if self.stream is not None:
            self.stream.synchronize()
        return host


def _empty(nbytes: int, *, device: torch.device | None = None, pin: bool = False) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)


class ChunkStream:
    """Streams every chunk over every source into the averages' outputs, on a few worker threads."""

    def __init__(
        self,
        sources: Sequence[Checkpoint],
        steps: Sequence[int],
        latest: Checkpoint,
        folds: Sequence[Fold],
        *,
        device: torch.device,
        threads: int,
        check_finite: bool,
    ) -> None:
        self.sources = [_Source(c, s) for c, s in zip(sources, steps, strict=True)]
        self.latest = next((s for s in self.sources if s.checkpoint is latest), None) or _Source(latest, 0)
        self.folds = list(folds)
        self.device = device
        self.threads = max(1, threads)
        self.check_finite = check_finite

    def run(self, chunks: Sequence[Chunk], progress: Progress) -> int:
        """Every chunk, in order of completion checks; returns the bytes read. The first failing chunk (in
        chunk order) raises, after the chunks in flight have finished; nothing is written after that."""
        sizes = _Sizes.of(chunks)
        workers: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for _ in range(self.threads):
            workers.put(_Worker(sizes, len(self.folds), self.device))

        def job(chunk: Chunk) -> int:
            worker = workers.get()
            try:
                with worker.context():
                    return self._process(chunk, worker)
            finally:
                workers.put(worker)

        with _kernels_on_one_thread(self.device):
            if self.threads == 1:
                total = 0
                for chunk in chunks:
                    total += job(chunk)
                    progress(chunk.bytes_read(len(self.sources)))
                return total
            return self._run_pool(chunks, job, progress)

    def _run_pool(self, chunks: Sequence[Chunk], job: Callable[[Chunk], int], progress: Progress) -> int:
        total = 0
        window: deque[tuple[Chunk, Future[int]]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ema-average") as pool:
            try:
                for chunk in chunks:
                    window.append((chunk, pool.submit(job, chunk)))
                    if len(window) >= 2 * self.threads:  # enough queued to keep every worker busy
                        total += self._collect(window.popleft(), progress)
                while window:
                    total += self._collect(window.popleft(), progress)
            except BaseException:
                for _, future in window:
                    future.cancel()
                raise  # leaving the pool waits for the chunks already running
        return total

    def _collect(self, item: tuple[Chunk, Future[int]], progress: Progress) -> int:
        chunk, future = item
        read = future.result()
        progress(chunk.bytes_read(len(self.sources)))
        return read

    def _process(self, chunk: Chunk, worker: _Worker) -> int:
        """One chunk: every source folded into every average's shadows while they sit in cache, the
        result checked, rounded to the output dtype and written. Returns the bytes read."""
        if not chunk.averaged:
            return self._copy(chunk, worker)
        shadows = [_view(buffer, chunk.shadow_dtype, chunk.numel) for buffer in worker.shadows]
        for k, source in enumerate(self.sources):
            if k == 0 and self._starts_in_place(chunk.first_dtype, chunk.shadow_dtype, worker):
                _read_in_place(source, chunk, shadows)
            else:
                self._fold(k, self._values(k, source, chunk, worker), shadows)
        self._check_finite(chunk, shadows, worker)
        for fold, shadow in zip(self.folds, shadows, strict=True):
            _write(fold.sink, chunk, worker.to_host(self._rounded(chunk, shadow, worker)))
        return chunk.bytes_read(len(self.sources))

    def _values(self, k: int, source: _Source, chunk: Chunk, worker: _Worker) -> torch.Tensor:
        """Source ``k``'s values of the chunk where the shadows are: read into a host staging buffer,
        staged to the device, and (past the first source) widened to the shadows' dtype once here rather
        than by each average's update."""
        numel, wide = chunk.numel, chunk.shadow_dtype
        values = worker.to_device(k, source.read(chunk, worker.staging(k, _read_dtype(chunk, k), numel)))
        if k and values.dtype != wide:
            values = _view(worker.scratch, wide, numel).copy_(values)
        return values

    def _fold(self, k: int, values: torch.Tensor, shadows: list[torch.Tensor]) -> None:
        """Source ``k``'s values into every average: copied where the average starts with this source
        (its decay is None), else one update with the engine's kernel and the plan's decay."""
        for fold, shadow in zip(self.folds, shadows, strict=True):
            if fold.weights is not None:
                _accumulate(shadow, values, fold.weights[k], first=k == 0)
                continue
            decay = fold.decays[k]
            if decay is None:
                shadow.copy_(values)
            else:
                ema_update_([shadow], [values], decay)

    def _check_finite(self, chunk: Chunk, shadows: list[torch.Tensor], worker: _Worker) -> None:
        """Unless --allow-nonfinite: the finished shadows hold no NaN or Inf (one cheap pass each, in
        cache); where one does, the chunk is read again to name the source and tensor that brought it."""
        if self.check_finite and not all(_finite(shadow) for shadow in shadows):
            raise self._nonfinite(chunk, worker)

    def _rounded(self, chunk: Chunk, shadow: torch.Tensor, worker: _Worker) -> torch.Tensor:
        """The shadow in the output dtype (the worker's output buffer where it differs), checked against
        that dtype's range first: a finite float32 average may still be beyond what bf16, fp16 or float8
        can hold (float8_e4m3fn would saturate it to 448, which no check of the rounded values would see)."""
        if chunk.out_dtype == chunk.shadow_dtype:
            return shadow
        if self.check_finite and not fits(shadow, chunk.out_dtype):  # the shadow is finite: checked before
            raise out_of_range(chunk, shadow)
        return _view(worker.out, chunk.out_dtype, chunk.numel).copy_(shadow)

    def _starts_in_place(self, dtype: torch.dtype, wide: torch.dtype, worker: _Worker) -> bool:
        """Whether the first source can be read straight into the shadows: it starts every average (its
        decay is None), is read on the host, and is saved in the shadows' dtype."""
        return (
            worker.on_host
            and dtype == wide
            and all(fold.decays[0] is None and fold.weights is None for fold in self.folds)
        )

    def _copy(self, chunk: Chunk, worker: _Worker) -> int:
        """A chunk of integer tensors: read from the latest checkpoint, written to every output as it is."""
        values = self.latest.read(chunk, _view(worker.host[0], chunk.dtype, chunk.numel))
        for fold in self.folds:
            _write(fold.sink, chunk, values)
        return chunk.bytes_read(1)

    def _nonfinite(self, chunk: Chunk, worker: _Worker) -> NonFiniteError:
        """Name the first source and tensor that brought NaN/Inf into this chunk: looked for only after the
        cheap check of the finished chunk failed, by reading the chunk again."""
        for k, source in enumerate(self.sources):
            name = source.nonfinite(chunk, _view(worker.host[0], _read_dtype(chunk, k), chunk.numel))
            if name is not None:
                return NonFiniteError(
                    source.checkpoint.path,
                    f"tensor {name!r} holds NaN or Inf (step {source.step}); refused. "
                    "--allow-nonfinite averages it anyway",
                )
        return NonFiniteError(
            self.sources[-1].checkpoint.path,
            "the average overflowed to Inf; refused. --allow-nonfinite keeps it anyway",
        )


def _read_dtype(chunk: Chunk, k: int) -> torch.dtype:
    """The dtype source ``k`` is saved in: the checkpoints', but an earlier average being resumed (the
    first source) keeps its own."""
    return chunk.first_dtype if k == 0 else chunk.dtype


def _accumulate(shadow: torch.Tensor, values: torch.Tensor, weight: float, *, first: bool) -> None:
    """One term of a weighted sum, in the shadow's dtype: the first source's values are widened exactly
    before they are scaled (a float16 product would round), later ones arrive widened."""
    if first:
        shadow.copy_(values).mul_(weight)
    else:
        shadow.add_(values, alpha=weight)


def _read_in_place(source: _Source, chunk: Chunk, shadows: list[torch.Tensor]) -> None:
    """The first source read straight into the first shadow (its values start every average: no staging
    buffer, no copy from it), then copied to the other averages' shadows."""
    source.read(chunk, shadows[0])
    for shadow in shadows[1:]:
        shadow.copy_(shadows[0])


def out_of_range(chunk: Chunk, shadow: torch.Tensor) -> OutputRangeError:
    """Name the first tensor of a finite chunk that the output dtype cannot hold, and by how much."""
    for piece in chunk.pieces:
        largest = largest_beyond(shadow[piece.offset : piece.offset + piece.count], chunk.out_dtype)
        if largest is not None:
            return OutputRangeError(
                f"{range_message(piece.names[0], largest, chunk.out_dtype)}. --dtype float32 keeps it; "
                "--allow-nonfinite writes it anyway"
            )
    raise AssertionError("out_of_range called on a chunk that fits")  # the caller checked the whole chunk


def _finite(shadow: torch.Tensor) -> bool:
    """NaN propagates through both reductions and Inf shows in one: one ``aminmax`` pass, in cache."""
    low, high = torch.aminmax(shadow)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _write(sink: RangeSink, chunk: Chunk, values: torch.Tensor) -> None:
    for piece in chunk.pieces:
        part = values[piece.offset : piece.offset + piece.count]
        for name in piece.names:
            sink.write_range(name, piece.start, part)


@contextlib.contextmanager
def _kernels_on_one_thread(device: torch.device) -> Iterator[None]:
    """Each worker's kernels run on its own core: torch's intra-op threads would split every chunk across
    cores (out of the worker's cache), oversubscribe them, and stall at every kernel's barrier whenever
    another process holds a core (measured: 2 ms instead of 20 us per chunk). Restored afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
