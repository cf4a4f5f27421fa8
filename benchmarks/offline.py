"""Offline averaging against its floors: every input byte read once, the output written once.

For each case (K checkpoints of one model, safetensors fp32 or bf16, or zip ``.pt``), each method runs in a
child process of its own, round-robin (one round = every case and method once, in an order that turns from
round to round, the page cache warmed first), ``--repeats`` rounds; the table gives the median, the ratio
to floor (b) of the same round for every round, and peak RSS above a bare ``python -c "import torch"``
child's. Each run waits for the machine to be idle (a shared CI box); a run that had to start on a busy
one is starred.

- floor (a): read every input byte once with T threads (T = usable cores) into reused 1 MiB buffers;
- floor (b): (a), then the output's size written from reused buffers by T threads, the disk asked to start
  on it every 8 MiB (as the writer does), and fsynced;
- ema-average: ``prepare`` + ``execute`` in a fresh child as the command runs them (with its malloc
  setting); the time is ``execute``'s, like the floors' (no interpreter start-up or imports). Every run
  writes a new file; a round's files are removed after it, and the filesystem given time to discard them;
- floor (c): (a), then three outputs' size written and fsynced (what a three-average run must write);
- ema-average, 3 decays: three averages in one pass (three outputs), against floor (c) and against one.

    python benchmarks/offline.py [--params 50e6] [--tensors 46] [--repeats 5] [--big-params 1.2e9]
    python benchmarks/offline.py --profile st-fp32-k4 [--threads 1]     # where the time goes, cProfile

Disk: 16 fp32 checkpoints of --params (K = 4 and 8 are hard links to the first ones), 4 bf16, 4 ``.pt`` and
4 fp32 of a 4x model under --workdir (7.1 GB at 50M); with --big-params, 4 bf16 checkpoints of that size
too (9.6 GB at 1.2B).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_PIECE = 1 << 20  # floor buffers: cache-sized, reused
_DECAYS_ONE = "0.999"
_DECAYS_THREE = "0.99,0.999,0.9999"
_SETTLE = 2.0  # seconds after removing a round's outputs


# --- children: each prints one JSON line ------------------------------------------------------------


def _hwm() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def read_floor(files: list[Path], threads: int) -> None:
    """Every byte of every file, once, chunk-interleaved across files as the average reads them."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    size = max(os.fstat(fd).st_size for fd in fds)

    def work(worker: int) -> None:
        view = memoryview(bytearray(_PIECE))
        for offset in range(worker * _PIECE, size, threads * _PIECE):
            for fd in fds:
                os.preadv(fd, [view], offset)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        for fd in fds:
            os.close(fd)


def write_floor(out: Path, size: int, threads: int) -> None:
    """``size`` bytes written to a new, reserved file from reused buffers, then fsynced; the disk is asked
    to start on them every 8 MiB (``sync_file_range``), as the writer does, so the fsync waits least."""
    start_writeback = _sync_file_range()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)

        def work(worker: int) -> None:
            view = memoryview(bytearray(b"\x01" * _PIECE))
            for n, offset in enumerate(range(worker * _PIECE, size, threads * _PIECE)):
                os.pwrite(fd, view[: min(_PIECE, size - offset)], offset)
                if start_writeback is not None and n % 8 == 7:
                    start_writeback(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Callable[..., int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call  # type: ignore[no-any-return]


def child_floor(args: argparse.Namespace) -> dict[str, float]:
    files = [Path(f) for f in args.files]
    start = time.perf_counter()
    read_floor(files, args.threads)
    for n in range(args.copies if args.out else 0):  # (c): one output per average of a several-average run
        write_floor(Path(args.out + (f".{n}" if n else "")), args.size, args.threads)
    return {"seconds": time.perf_counter() - start}


def child_average(args: argparse.Namespace) -> dict[str, float]:
    from ema_average._platform.process import steady_malloc

    steady_malloc()  # as the command runs
    from ema_average.offline.options import RunOptions
    from ema_average.offline.plan import AverageSettings
    from ema_average.offline.run import execute, prepare

    settings = [AverageSettings(decay=float(d)) for d in args.decays.split(",")]
    options = RunOptions(
        Path(args.folder),
        Path(args.out),
        settings=settings,
        device=args.device,
        threads=args.threads or None,
    )
    imported = _hwm()
    start = time.perf_counter()
    prepared = prepare(options)
    middle = time.perf_counter()
    execute(prepared)
    return {"seconds": time.perf_counter() - middle, "prepare": middle - start, "imported": imported}


def child_bare(_args: argparse.Namespace) -> dict[str, float]:
    import torch  # noqa: F401

    return {"seconds": 0.0}


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, float]]] = {
    "floor": child_floor,
    "average": child_average,
    "bare": child_bare,
}


def _busy(interval: float = 0.3) -> float:
    """Share of CPU time other processes used over ``interval`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    total, idle = sample()
    time.sleep(interval)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle) / max(1, total2 - total)


def wait_until_idle(limit: float = 0.1, patience: float = 60.0) -> bool:
    """On a shared machine, start a run only once others leave the cores alone (False: gave up waiting)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if _busy() < limit and _busy() < limit:
            return True
    return False


def run_child(name: str, *args: str) -> dict[str, float]:
    idle = wait_until_idle() if os.path.exists("/proc/stat") else True
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "busy": float(not idle)}


# --- data ---------------------------------------------------------------------------------------------


def make_run(folder: Path, k: int, params: int, tensors: int, dtype: str, fmt: str) -> list[Path]:
    """K checkpoints of ``params`` parameters in ``tensors`` tensors, kept on disk for later runs."""
    import torch
    from safetensors.torch import save_file

    manifest = folder / "manifest.json"
    wanted = {"k": k, "params": params, "tensors": tensors, "dtype": dtype, "fmt": fmt}
    files = [folder / f"step_{step * 1000}.{fmt}" for step in range(1, k + 1)]
    if manifest.exists() and json.loads(manifest.read_text()) == wanted and all(f.exists() for f in files):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    rows = max(1, params // tensors // 1024)
    for step, path in enumerate(files, start=1):
        g = torch.Generator().manual_seed(step)
        state = {
            f"layers.{i}.weight": torch.randn(rows, 1024, generator=g).to(getattr(torch, dtype))
            for i in range(tensors)
        }
        if fmt == "safetensors":
            save_file(state, str(path), metadata={"step": str(step * 1000)})
        else:
            torch.save({"model": state, "step": step * 1000}, path)
        del state
    manifest.write_text(json.dumps(wanted))
    return files


def subset(files: list[Path], k: int, folder: Path) -> list[Path]:
    """A folder of the first ``k`` files, as hard links (no extra disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f not in [folder / g.name for g in files[:k]]:
            f.unlink()
    for f in files[:k]:
        link = folder / f.name
        if not link.exists():
            os.link(f, link)
    return [folder / f.name for f in files[:k]]


def warm(files: list[Path]) -> None:
    read_floor(files, 1)


# --- the table ----------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    files: list[Path]
    three: bool = False  # also three decays in one pass
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    @property
    def output_size(self) -> int:
        return self.files[0].stat().st_size


def cases(args: argparse.Namespace) -> list[Case]:
    work, params, tensors = args.workdir, int(args.params), args.tensors
    fp32 = make_run(work / "st-fp32", 16, params, tensors, "float32", "safetensors")
    found = [
        Case("st-fp32-k4", subset(fp32, 4, work / "st-fp32-k4"), three=True),
        Case("st-fp32-k8", subset(fp32, 8, work / "st-fp32-k8"), three=True),
        Case("st-fp32-k16", fp32),
        Case("st-bf16-k4", make_run(work / "st-bf16", 4, params, tensors, "bfloat16", "safetensors")),
        Case("pt-fp32-k4", make_run(work / "pt-fp32", 4, params, tensors, "float32", "pt")),
        Case(
            "st-fp32-4x-k4", make_run(work / "st-fp32-4x", 4, 4 * params, tensors, "float32", "safetensors")
        ),
    ]
    if args.big_params:
        big = make_run(
            work / "st-bf16-big", 4, int(args.big_params), args.big_tensors, "bfloat16", "safetensors"
        )
        found.append(Case("st-bf16-big-k4", big))
    return [c for c in found if not args.cases or c.name in args.cases.split(",")]


def _out_dir(args: argparse.Namespace) -> Path:
    """Where outputs go: beside the inputs, or (``--out-dir /dev/shm``) in memory, which takes the disk's
    run-to-run variance out of the comparison and leaves the CPU's work."""
    return args.out_dir or args.workdir


def one_round(case: Case, args: argparse.Namespace, index: int) -> None:
    """Every method once on ``case``, each writing a new file, in an order that turns with ``index`` (no
    method always follows the same one); the files go at the end of the round."""
    threads = str(args.threads or _cores())
    files = [str(f) for f in case.files]
    outs = {m: str(_out_dir(args) / f"out-{case.name}-{m}.safetensors") for m in ("floor", "one", "three")}
    warm(case.files)
    average = (
        "average",
        "--folder",
        str(case.folder),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    )
    runs = {
        "floor (a) read": ("floor", "--threads", threads, "--files", *files),
        "floor (b) read+write+fsync": (
            "floor", "--threads", threads, "--out", outs["floor"], "--size", str(case.output_size), "--files", *files,
        ),
        "ema-average": (*average, "--out", outs["one"], "--decays", _DECAYS_ONE),
    }  # fmt: skip
    if case.three:
        runs["floor (c) read+3 writes+fsync"] = (*runs["floor (b) read+write+fsync"], "--copies", "3")
        runs["ema-average, 3 decays"] = (*average, "--out", outs["three"], "--decays", _DECAYS_THREE)
    order = list(runs.items())
    for method, child in order[index % len(order) :] + order[: index % len(order)]:
        os.sync()  # start clean: a run's fsync then flushes only its own writes
        case.results.setdefault(method, []).append(run_child(*child))
    for stale in _out_dir(args).glob(f"out-{case.name}-*.safetensors*"):
        stale.unlink()
    os.sync()
    time.sleep(_SETTLE)  # the filesystem discards the freed blocks at its next commits: not in the next run


def table(found: list[Case], bare_hwm: float, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    title = (
        f"Averaging K checkpoints, hot page cache, {args.repeats} interleaved rounds, threads "
        f"{args.threads or _cores()} ({_cores()} cores); peak RSS above bare `import torch` ({bare_hwm / 2**20:.0f} MiB)"
    )
    out = Table(title=title)
    for col in (
        "case",
        "method",
        "median s",
        "x floor (b), each round",
        "median x",
        "peak RSS MiB",
        "input MiB",
    ):
        out.add_column(
            col, justify="left" if col in ("case", "method", "x floor (b), each round") else "right"
        )
    for case in found:
        floor = [r["seconds"] for r in case.results["floor (b) read+write+fsync"]]
        one = [r["seconds"] for r in case.results["ema-average"]]
        three = case.results.pop("ema-average, 3 decays", None)
        rows = [(method, results, floor) for method, results in case.results.items()]
        if three is not None:  # three outputs written: against floor (c), and against one decay
            floor_c = [r["seconds"] for r in case.results["floor (c) read+3 writes+fsync"]]
            rows.append(("ema-average, 3 decays (x = / floor (c))", three, floor_c))
            rows.append(("ema-average, 3 decays (x = / one decay)", three, one))
        for method, results, base in rows:
            seconds = [r["seconds"] for r in results]
            ratios = [s / f for s, f in zip(seconds, base, strict=True)]
            hwm = max(r.get("hwm", 0.0) for r in results)
            rss = f"{(hwm - bare_hwm) / 2**20:.0f}" if method.startswith("ema") else "-"
            out.add_row(
                case.name,
                method,
                f"{statistics.median(seconds):.3f}",
                " ".join(
                    f"{r:.2f}" + ("*" if x.get("busy") else "") for r, x in zip(ratios, results, strict=True)
                ),
                f"{statistics.median(ratios):.2f}",
                rss,
                f"{sum(f.stat().st_size for f in case.files) / 2**20:.0f}",
            )
        out.add_section()
    console.print(out)
    console.print(
        "* the machine was busy with other work when that run started (waited 60 s for it to settle)"
    )


def profile(args: argparse.Namespace) -> None:
    """One run of a case in this process under cProfile (threads 1 unless --threads), hottest first."""
    from ema_average._platform.process import steady_malloc

    steady_malloc()
    from ema_average.offline.options import RunOptions
    from ema_average.offline.plan import AverageSettings
    from ema_average.offline.run import execute, prepare

    (case,) = [c for c in cases(args) if c.name == args.profile]
    out = args.workdir / "out-profile.safetensors"
    options = RunOptions(
        case.folder,
        out,
        settings=AverageSettings(decay=0.999),
        overwrite=True,
        threads=args.threads or 1,
        device=args.device,
    )
    warm(case.files)
    execute(prepare(options))  # once, so the profiled run meets a hot cache and a settled heap
    out.unlink()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    execute(prepare(options))
    profiler.disable()
    print(f"{case.name}: {time.perf_counter() - start:.3f} s with {options.threads} thread(s)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(16)
    out.unlink()


def torchrun_table(found: list[Case], args: argparse.Namespace) -> None:
    """The command under ``torchrun --nproc-per-node 2`` against one process, on the first case, in turn:
    execute's time as each prints it (rank 0's, agreement and commit included) and the wall time (start-up
    and rendezvous included); ratios of medians, 2 ranks / 1."""
    import re

    case = found[0]
    out = _out_dir(args) / f"out-{case.name}-ranks.safetensors"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    commands = {
        "1 process": [sys.executable, "-m", "ema_average"],
        "torchrun, 2 ranks": [*launch, "-m", "ema_average"],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    warm(case.files)
    for index in range(args.repeats):
        order = list(commands.items())
        for name, command in order[index % 2 :] + order[: index % 2]:
            wait_until_idle()
            os.sync()
            start = time.perf_counter()
            done = subprocess.run(
                [*command, str(case.folder), "-o", str(out), "--overwrite", "--decay", _DECAYS_ONE],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                check=False,
            )
            wall = time.perf_counter() - start
            found_seconds = re.search(r" in ([0-9.]+) s \(", done.stdout)
            if done.returncode != 0 or found_seconds is None:
                raise RuntimeError(f"{name} failed: {done.stderr[-3000:]}")
            times[name].append((float(found_seconds.group(1)), wall))
    out.unlink(missing_ok=True)
    one = times["1 process"]
    for name, runs in times.items():
        execute = statistics.median(t for t, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(
            f"{case.name} {name}: execute {execute:.3f} s (x {execute / statistics.median(t for t, _ in one):.2f}),"
            f" wall {wall:.2f} s (x {wall / statistics.median(w for _, w in one):.2f}); median of {len(runs)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--tensors", type=int, default=46)
    parser.add_argument("--big-params", type=float, default=0, help="also 4 bf16 checkpoints of this size")
    parser.add_argument("--big-tensors", type=int, default=290)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="workers for ema-average (0: its default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="", help="comma list of case names (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ema-average-bench"))
    parser.add_argument("--out-dir", type=Path, default=None, help="outputs here (default: --workdir)")
    parser.add_argument("--profile", default="", help="profile one case instead")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--decays", default=_DECAYS_ONE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        print(json.dumps({**result, "hwm": _hwm()}))
        return
    if args.profile:
        profile(args)
        return
    found = cases(args)
    bare = []
    for index in range(args.repeats):
        bare.append(run_child("bare")["hwm"])
        for case in found:
            one_round(case, args, index)
    table(found, statistics.median(bare), args)
    torchrun_table(found, args)


if __name__ == "__main__":
    main()
