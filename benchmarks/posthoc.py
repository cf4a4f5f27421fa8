"""What post-hoc EMA costs: ten targets reconstructed in one pass against ten single-target runs, and the
snapshots' cost per training step.

    python benchmarks/posthoc.py [--size-mb 64] [--snapshots 10] [--targets 10] [--width 1024] [--every 100]

Reconstruction: a folder of 2 x SNAPSHOTS float32 snapshots of SIZE_MB each (this tool's format), ten widths
from 0.03 to 0.20 reconstructed at the last step, once in one pass and once as ten runs; the floor is one
pass with one target (reading every snapshot once). Snapshots while training: median milliseconds per step of
a plain SGD loop, with one ``PowerFunctionMovingAverage`` (what an online power EMA costs), and with
``PowerEmaSnapshots`` of two profiles snapshotting every EVERY steps; the cost of one snapshot (two files)
is timed apart. Prints tables and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from ema_average.engine.averages import PowerFunctionMovingAverage
from ema_average.offline.options import RunOptions
from ema_average.offline.posthoc_job import Targets, prepare
from ema_average.offline.run import execute, peak_rss
from ema_average.online.posthoc_training import PowerEmaSnapshots

console = Console()


def write_snapshots(folder: Path, size_mb: int, count: int) -> None:
    numel = size_mb * 2**20 // 4 // 4  # four tensors per snapshot
    for step in range(1, count + 1):
        for width in (0.05, 0.10):
            g = torch.Generator().manual_seed(step * 7 + round(width * 100))
            state = {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(4)}
            metadata = {"step": str(100 * step), "posthoc_sigma_rel": repr(width)}
            save_file(state, str(folder / f"ema-{width}-{step:04d}.safetensors"), metadata)


def reconstruct(folder: Path, out: Path, widths: tuple[float, ...]) -> float:
    start = time.perf_counter()
    run = prepare(RunOptions(folder, output=out, overwrite=True), Targets(sigma_rels=widths))
    execute(run.prepared)
    return time.perf_counter() - start


def reconstruction_table(size_mb: int, count: int, targets: int) -> None:
    widths = tuple(round(0.03 + i * (0.17 / max(1, targets - 1)), 4) for i in range(targets))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "snaps"
        folder.mkdir()
        write_snapshots(folder, size_mb, count)
        reconstruct(folder, Path(tmp) / "warm.safetensors", widths[:1])  # page cache warm for every row
        floor = reconstruct(folder, Path(tmp) / "one.safetensors", widths[:1])
        together = reconstruct(folder, Path(tmp) / "all.safetensors", widths)
        separate = sum(
            reconstruct(folder, Path(tmp) / f"s{i}.safetensors", (w,)) for i, w in enumerate(widths)
        )
    table = Table(
        title=f"{targets} targets from {2 * count} snapshots of {size_mb} MB (float32, page cache warm); "
        f"peak RSS {peak_rss() / 2**20:.0f} MB",
        title_justify="left",
    )
    for column in ("run", "seconds", "x one target"):
        table.add_column(column, justify="right" if column != "run" else "left")
    table.add_row("one target, one pass (floor)", f"{floor:.2f}", "1.00")
    table.add_row(f"{targets} targets, one pass", f"{together:.2f}", f"{together / floor:.2f}")
    table.add_row(f"{targets} targets, {targets} runs", f"{separate:.2f}", f"{separate / floor:.2f}")
    console.print(table)


def step_times(width: int, steps: int, every: int, mode: str) -> tuple[float, float]:
    """Median ms per step, and ms per snapshot (both profiles) where snapshots are taken."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, width)
    with tempfile.TemporaryDirectory() as tmp:
        power = PowerFunctionMovingAverage(model, sigma_rel=0.05) if mode == "power" else None
        snaps = PowerEmaSnapshots(model, every=every, folder=tmp) if mode == "snapshots" else None
        times, snapshot_times = [], []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if power is not None:
                power.apply(num_updates=step)
            if snaps is not None:
                snaps.update(step)
            elapsed = (time.perf_counter() - start) * 1000
            (snapshot_times if snaps is not None and step % every == 0 else times).append(elapsed)
    return statistics.median(times), statistics.median(snapshot_times) if snapshot_times else 0.0


def snapshot_table(width: int, every: int) -> None:
    steps = 3 * every
    params = 2 * (width * width + width)
    table = Table(
        title=f"per training step, MLP of {params / 1e6:.2f}M parameters, one CPU thread",
        title_justify="left",
    )
    for column in ("loop", "ms/step (median)", "x plain", "ms per snapshot step"):
        table.add_column(column, justify="right" if column != "loop" else "left")
    plain, _ = step_times(width, steps, every, "plain")
    for mode, label in (
        ("plain", "plain SGD"),
        ("power", "+ one power EMA"),
        ("snapshots", "+ PowerEmaSnapshots (2)"),
    ):
        ms, snap = step_times(width, steps, every, mode)
        table.add_row(label, f"{ms:.3f}", f"{ms / plain:.2f}", f"{snap:.1f}" if snap else "")
    console.print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reconstruction_table(args.size_mb, args.snapshots, args.targets)
    snapshot_table(args.width, args.every)
