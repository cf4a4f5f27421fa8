"""The offline job split across the ranks of a ``torchrun`` launch, into one output file written by all.

``torchrun --nproc-per-node N -m ema_average CKPT_DIR -o OUT`` starts N copies of the command; each is one
rank. Every rank prepares (headers only, so every input error surfaces before anything is written) and
the ranks agree on it; rank 0 takes the output's lock, removes stale temporaries and creates each output's
temporary file (named, so every rank, on any host sharing the filesystem, can open it), reserved and with
its header; the others open it by the name rank 0's PID gives. Each rank streams its share of the plan's
chunks (a contiguous run of about 1/N of the bytes) and ``pwrite``s them at their offsets, then fsyncs;
once all agree that every rank succeeded, rank 0 commits (read back, atomic rename): all or nothing. A
peer lost after that (before it heard of the commit) leaves rank 0's run a success: the output is whole.

Agreement is one ``all_reduce`` of a flag per phase; a failure's one-line message travels from the lowest
failing rank to the others as a uint8 tensor (nothing is pickled between ranks), and every rank exits 1
with rank 0 printing it. Progress goes through the rendezvous store (``add``, no collective): each rank
publishes its bytes every so often, rank 0 reads the total, and a rank that fails sets a key that stops
the others early. A plain one-process run never imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ema_average._platform.process import ignore_sigterm
from ema_average._platform.torch_compat import default_store
from ema_average.errors import ConfigurationError, EmaAverageError
from ema_average.offline import streaming
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import Chunk
from ema_average.offline.run import (
    PreparedRun,
    Progress,
    Summary,
    claim_outputs,
    output_entries,
    peak_rss,
    run_metadata,
    stream_chunks,
)
from ema_average.offline.run import prepare as prepare_locally  # the one-process preparation, per rank
from ema_average.output import SafetensorsWriter, commit_together, temp_name

T = TypeVar("T")

_PUBLISH_EVERY = 0.25  # seconds between a rank's progress reports to the store
_FAILED = "failed"
_PROGRESS = "progress"


class RankFailure(EmaAverageError):
    """A failure on some rank, raised on every rank once they agreed on it: the failing rank's one line."""


class _Stopped(Exception):
    """Another rank failed: this one stops its share early (not a failure of its own)."""


@dataclass
class Ranks:
    """This process's place in the launch, and the few collectives the job needs (CPU tensors, gloo)."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    describe: Callable[[BaseException], str]  # a failure as its one-line message (the CLI's wording)
    store: dist.Store

    @classmethod
    def start(cls, device: str, describe: Callable[[BaseException], str]) -> Ranks:
        """Join the process group torchrun's environment describes: gloo, plus nccl for CUDA tensors."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if cuda and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):  # a bad name: prepare says so in one line
                torch.cuda.set_device(_gpu(device, local_rank))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        # The group's own store (the rendezvous store torchrun set up), under a prefix of ours.
        store = dist.PrefixStore("ema-average/", default_store())
        return cls(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            describe,
            store,
        )

    @property
    def lead(self) -> bool:
        """Rank 0: the one that speaks, holds the output's lock and commits."""
        return self.rank == 0

    def close(self, *, clean: bool) -> None:
        """Leave the group; after a clean run, together (a rank tearing gloo down while a peer is still in
        its last collective can make that peer abort, turning a committed run into a failure)."""
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to tell it
            if clean:
                dist.barrier()
            dist.destroy_process_group()

    def together(self, work: Callable[[], T]) -> T:
        """Run ``work`` here, then agree with every rank: if any failed, RankFailure on all of them.

        Ctrl-C and SIGTERM unwind without agreeing: torchrun is tearing every rank down anyway."""
        try:
            result = work()
        except Exception as exc:
            self.agree(exc)
            raise AssertionError("unreachable: agree raises on a failure") from exc
        self.agree(None)
        return result

    def agree(self, failure: BaseException | None) -> None:
        """One all_reduce: the lowest failing rank, if any, whose message then goes to every rank."""
        stopped = isinstance(failure, _Stopped)
        if failure is not None and not stopped:
            with contextlib.suppress(Exception):
                self.store.set(_FAILED, str(self.rank))
        code = self.world + 1 if failure is None else self.world if stopped else self.rank
        first = self._reduce(code, dist.ReduceOp.MIN)
        if first > self.world:
            return
        ignore_sigterm()  # every rank is leaving now: a peer's exit must not cut this one's clean-up short
        if first == self.world:  # stopped with no failure behind it: never expected, never committed
            raise RankFailure("a rank stopped without another failing; nothing was written") from failure
        message = self.describe(failure) if self.rank == first and failure is not None else ""
        raise RankFailure(self._text(message, src=first)) from failure

    def broadcast_int(self, value: int, src: int = 0) -> int:
        box = torch.tensor([value], dtype=torch.int64)
        with _peers_alive():
            dist.broadcast(box, src)
        return int(box.item())

    def total(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.SUM)

    def most(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: int, op: dist.ReduceOp.RedOpType) -> int:
        box = torch.tensor([value], dtype=torch.int64)
        with _peers_alive():
            dist.all_reduce(box, op)
        return int(box.item())

    def _text(self, text: str, src: int) -> str:
        """``text`` from rank ``src`` on every rank: its length, then its UTF-8 bytes as a uint8 tensor."""
        data = (text or "failed").encode("utf-8", "replace")
        size = self.broadcast_int(len(data) if self.rank == src else 0, src)
        box = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src else None
        if box is None:
            box = torch.zeros(size, dtype=torch.uint8)
        with _peers_alive():
            dist.broadcast(box, src)
        return bytes(box.numpy()).decode("utf-8", "replace")


@contextlib.contextmanager
def _peers_alive() -> Iterator[None]:
    """A collective that fails (gloo: a peer's connection closed) means a rank died or its host was lost:
    one line for it, instead of the backend's message."""
    try:
        yield
    except RuntimeError as exc:
        ignore_sigterm()
        raise RankFailure(
            "another rank stopped (killed, or its host lost) before the ranks agreed; see torchrun's report"
        ) from exc


def rank_options(options: RunOptions, ranks: Ranks, *, watch: bool) -> RunOptions:
    """The options as this rank runs them: refused where one file from several ranks cannot work; each
    rank on its own GPU (``cuda`` -> ``cuda:LOCAL_RANK``, shared round-robin where a host has fewer GPUs than
    ranks); the default threads shared among a host's ranks."""
    if watch:
        raise ConfigurationError("--watch runs in one process: start it without torchrun")
    if options.max_shard_size is not None:
        raise ConfigurationError(
            "--max-shard-size is not supported under torchrun (ranks write one .safetensors file): drop it, "
            "or run in one process"
        )
    device = options.device
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{_gpu(device, ranks.local_rank)}"
    threads = options.threads
    if threads is None:
        threads = max(1, streaming.default_threads(torch.device(device)) // max(1, ranks.local_world))
    return dataclasses.replace(options, device=device, threads=threads)


def prepare(options: RunOptions, ranks: Ranks, *, dry_run: bool) -> PreparedRun:
    """The one-process :func:`~ema_average.offline.run.prepare` on this rank (headers only), refusing
    outputs other than one file each."""
    prepared = prepare_locally(options, dry_run=dry_run)
    if prepared.folder is not None:
        raise ConfigurationError(
            f"-o {prepared.output}: under torchrun the ranks write one .safetensors file each; give "
            "-o OUT.safetensors, or write a folder in one process"
        )
    prepared.plan.notes.append(
        f"split over {ranks.world} ranks (torchrun): each streams its share of the chunks into one file"
    )
    return prepared


def _gpu(device: str, local_rank: int) -> int:
    """This rank's GPU: the one named (``cuda:N``), else its local rank's, round-robin over the host's GPUs."""
    index = torch.device(device).index
    return index if index is not None else local_rank % max(1, torch.cuda.device_count())


def share(chunks: Sequence[Chunk], sources: int, rank: int, world: int) -> list[Chunk]:
    """Rank ``rank``'s chunks: a contiguous run holding about 1/world of the bytes read (a chunk goes to
    the rank whose slice of the bytes holds its middle), so each rank writes a few regions in order."""
    sizes = [chunk.bytes_read(sources) for chunk in chunks]
    total = sum(sizes) or 1
    mine, before = [], 0
    for chunk, size in zip(chunks, sizes, strict=True):
        if min(world - 1, (2 * before + size) * world // (2 * total)) == rank:
            mine.append(chunk)
        before += size
    return mine


class _SharedProgress:
    """A rank's progress callback: its bytes go to the store every so often (``add``, no collective);
    rank 0 passes on the growth of every rank's total. Raises ``_Stopped`` once another rank failed."""

    def __init__(self, ranks: Ranks, report: Progress | None) -> None:
        self.ranks = ranks
        self.report = report if ranks.lead else None
        self.pending = 0
        self.shown = 0
        self.last = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.pending += nbytes
        if time.monotonic() - self.last >= _PUBLISH_EVERY:
            self.publish()

    def publish(self) -> None:
        self.last = time.monotonic()
        total = self.ranks.store.add(_PROGRESS, self.pending)
        self.pending = 0
        if self.ranks.store.check([_FAILED]):
            raise _Stopped
        self._show(total)

    def complete(self, total: int) -> None:
        """Every rank is done: rank 0's bar reaches the end."""
        self._show(total)

    def _show(self, total: int) -> None:
        if self.report is not None and total > self.shown:
            self.report(total - self.shown)
            self.shown = total


def execute(
    prepared: PreparedRun,
    ranks: Ranks,
    on_progress: Progress | None = None,
    *,
    on_committed: Callable[[], None] | None = None,
) -> Summary:
    """Every rank writes its share of every output; rank 0 commits once all succeeded: all or nothing.
    ``on_committed`` as in :func:`ema_average.offline.run.execute`, on every rank."""
    if prepared.up_to_date:
        raise ConfigurationError(
            f"{prepared.output} is up to date: no checkpoint is newer than its last step"
        )
    start = time.perf_counter()
    writers: list[SafetensorsWriter] = []
    with contextlib.ExitStack() as held:
        held.callback(_close_sources, prepared)
        try:
            ranks.together(lambda: _create(prepared, writers, held) if ranks.lead else None)
            creator = ranks.broadcast_int(os.getpid())  # rank 0's PID names the temporaries
            ranks.together(lambda: None if ranks.lead else _open_writers(prepared, writers, creator=creator))
            progress = _SharedProgress(ranks, on_progress)
            mine = share(prepared.plan.chunks, len(prepared.sources), ranks.rank, ranks.world)
            read = ranks.together(lambda: _write_share(prepared, writers, progress, mine))
            bytes_read = ranks.total(read)
            progress.complete(bytes_read)
            peers = _commit_and_tell(ranks, writers, on_committed or (lambda: None), held.close)
        except BaseException:
            for writer in writers:
                writer.abort()  # rank 0's removes the temporary; a no-op once committed
            raise
    return Summary.of(writers, prepared, bytes_read, start, ranks.most(peak_rss()) if peers else peak_rss())


def _commit_and_tell(
    ranks: Ranks,
    writers: list[SafetensorsWriter],
    on_committed: Callable[[], None],
    release: Callable[[], None],
) -> bool:
    """Rank 0 names the outputs, then every rank hears it; whether the peers are still there after.

    Every rank's share was agreed written before, so once rank 0 has named the outputs they are whole: a
    peer lost before hearing it (killed, its host gone) does not turn rank 0's run into a failure, and
    ``on_committed`` runs on rank 0 just before the renames (which Ctrl-C and SIGTERM then wait for), before
    it waits for anyone.
    """
    committed = False

    def commit() -> None:
        nonlocal committed
        if ranks.lead:
            _commit(writers, on_committed, release)
            committed = True

    try:
        ranks.together(commit)
    except RankFailure:
        if not committed:
            raise
        return False
    if not ranks.lead:
        on_committed()
    return True


def _close_sources(prepared: PreparedRun) -> None:
    for ckpt in prepared.sources:
        ckpt.close()


def _create(prepared: PreparedRun, writers: list[SafetensorsWriter], held: contextlib.ExitStack) -> None:
    """Rank 0: claim every output (folder, lock, stale temporaries), make each shared temporary file."""
    claim_outputs(prepared, held)
    _open_writers(prepared, writers, creator=None)


def _open_writers(prepared: PreparedRun, writers: list[SafetensorsWriter], *, creator: int | None) -> None:
    """Each output's writer: rank 0 (``creator`` None) makes the shared temporary; every other rank opens
    the one rank 0 (process ``creator``) made, to write its ranges into."""
    entries = output_entries(prepared.plan)
    for average, output in zip(prepared.plan.averages, prepared.outputs, strict=True):
        metadata = run_metadata(prepared, average.settings)
        join = None if creator is None else temp_name(output, creator)
        writers.append(
            SafetensorsWriter(
                output,
                entries,
                metadata,
                overwrite=prepared.may_replace,
                lock=False,
                shared=creator is None,
                join=join,
            )
        )


def _write_share(
    prepared: PreparedRun, writers: list[SafetensorsWriter], progress: _SharedProgress, mine: list[Chunk]
) -> int:
    read = stream_chunks(prepared, writers, progress, mine)
    progress.publish()
    for writer in writers:
        writer.flush()
    return read


def _commit(
    writers: list[SafetensorsWriter], before_naming: Callable[[], None], release: Callable[[], None]
) -> None:
    """Rank 0: name every output (see ``commit_together``); ``release`` (locks and sources) once named."""
    for writer in writers:
        writer.written_elsewhere()
    commit_together(writers, before_naming, release)
