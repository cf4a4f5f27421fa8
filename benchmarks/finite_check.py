"""What refusing NaN/Inf costs: one ``aminmax`` over each finished chunk of every average.

NaN and Inf never wash out of an average, so the pipeline checks each finished chunk once (and only when
that fails reads the group again to name the file and tensor). Two measurements, interleaved, medians:

1. In process: one ``update_with_decay`` against one ``all_finite()`` over the same fp32 shadows, for fp32
   and bf16 values: the check's cost is this ratio divided by the number of checkpoints.
2. The offline job (``prepare`` + ``execute``, as the command runs it) on K safetensors checkpoints, default
   (checked) against ``allow_nonfinite``, in one process after a warm-up run. (Separate processes were tried
   first: there, whichever run follows another pays 0.3-0.4 s for the page cache, whatever its settings.)

    python benchmarks/finite_check.py [--params 50e6] [--k 8] [--repeats 7] [--workdir /tmp/ema-average-finite]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from ema_average import ExponentialMovingAverage
from ema_average.offline.options import RunOptions
from ema_average.offline.run import execute, prepare

TENSOR = 2048 * 2048


def model(params: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.weight": torch.randn(2048, 2048, generator=g).to(dtype) for i in range(params // TENSOR)
    }


def time_updates(params: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median ms of one update and of one finite check, interleaved."""
    average = ExponentialMovingAverage.from_tensors(model(params, dtype, 0), decay=0.999)
    values = model(params, dtype, 1)
    update, check = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        average.update_with_decay(values, 0.999)
        update.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert average.all_finite()
        check.append(time.perf_counter() - start)
    return statistics.median(update) * 1e3, statistics.median(check) * 1e3


def write_run(folder: Path, params: int, k: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(1, k + 1):
        path = folder / f"step_{step * 100}.safetensors"
        if not path.exists():
            save_file(model(params, torch.float32, step), str(path), metadata={"step": str(step * 100)})


def time_run(folder: Path, out: Path, allow_nonfinite: bool) -> float:
    """Seconds of the offline job itself (the summary's figure): process start-up would only add noise."""
    options = RunOptions(folder, out, overwrite=True, allow_nonfinite=allow_nonfinite)
    return execute(prepare(options)).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ema-average-finite"))
    args = parser.parse_args()
    params = int(args.params)
    console = Console()

    table = Table(
        title=f"one update of {params / 1e6:.0f}M parameters, fp32 shadows (median of {args.repeats})"
    )
    for column in ("values", "update ms", "all_finite ms", "check / update", f"check share, K={args.k}"):
        table.add_column(column, justify="right")
    for dtype in (torch.float32, torch.bfloat16):
        update, check = time_updates(params, dtype, args.repeats)
        share = check / (update * (args.k - 1) + check)  # of the engine's work on one group
        row = (f"{update:.1f}", f"{check:.1f}", f"{check / update:.2f}", f"{share:.1%}")
        table.add_row(str(dtype).removeprefix("torch."), *row)
    console.print(table)

    run = args.workdir / "run"
    write_run(run, params, args.k)
    out = args.workdir / "ema.safetensors"
    checked_s, allowed_s = [], []
    time_run(run, out, True)  # warm-up: the page cache and the allocator, for both
    for i in range(2 * args.repeats):  # ABBA order, in one process
        if i % 4 in (0, 3):
            checked_s.append(time_run(run, out, False))
        else:
            allowed_s.append(time_run(run, out, True))
    table = Table(title=f"ema-average over {args.k} fp32 checkpoints of {params / 1e6:.0f}M parameters")
    for column in ("mode", "median s", "ratio"):
        table.add_column(column, justify="right")
    base = statistics.median(allowed_s)
    table.add_row("--allow-nonfinite (no check)", f"{base:.3f}", "1.00")
    table.add_row(
        "default (checked)",
        f"{statistics.median(checked_s):.3f}",
        f"{statistics.median(checked_s) / base:.2f}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
