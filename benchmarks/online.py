"""Time one online ``apply()`` against the ways users do it today and against the hardware floors.

Prints a table: median milliseconds of one update and the ratio to ``torch._foreach_lerp_`` over the same
tensors in float32 (the multi-tensor floor; for bf16 parameters over fp32 copies made beforehand), timed in the
same round-robin as the methods, for two mixes of tensor sizes, fp32 and bf16 parameters; then the fp32
mixes sharded by FSDP2 over ``--ranks`` CPU processes (gloo), where each rank's ``apply()`` on its local
shards is timed against ``_foreach_lerp_`` over those very local tensors. Then, each in a child process,
the extra memory one bf16 update needs beyond model + shadows.

    python benchmarks/online.py [--scale 1.0] [--repeats 25] [--device cpu] [--ranks 2] [--threads N]

On a machine shared with other work, ``--threads 1``: a two-thread OpenMP region there waits a scheduler slice
for its second thread, which times the machine's load rather than the update.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ema_average import ExponentialMovingAverage
from ema_average.engine.averages import local_part

DECAY = 0.999


def make_model(total: int, count: int, dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    size = total // count
    return [torch.nn.Parameter(torch.randn(size, dtype=dtype, device=device)) for _ in range(count)]


def median_ms_interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each function, timed round-robin so that machine noise hits every method alike."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def methods(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    """Each way to do one EMA update over ``params``, set up beforehand."""
    found: dict[str, Callable[[], None]] = {}
    ema = ExponentialMovingAverage([(f"p{i}", p) for i, p in enumerate(params)], decay=DECAY)
    found["ema-average apply()"] = ema.apply

    loop_shadows = [p.detach().float().clone() for p in params]

    def allennlp_loop() -> None:  # AllenNLP's MovingAverage.apply, one Python step per tensor
        with torch.no_grad():
            for shadow, p in zip(loop_shadows, params, strict=True):
                shadow.mul_(DECAY).add_((1 - DECAY) * p)

    found["AllenNLP per-tensor loop"] = allennlp_loop
    try:
        from torch_ema import ExponentialMovingAverage as TorchEma

        torch_ema = TorchEma(params, decay=DECAY, use_num_updates=False)
        found["torch_ema update() (shadows in param dtype)"] = torch_ema.update
    except ImportError:
        pass

    floor_shadows = [p.detach().to(torch.float32, copy=True) for p in params]  # never the parameter itself
    # the floor for bf16 parameters: over fp32 copies of them, made once, outside the timing
    plain = [p.detach().float() for p in params]
    found["_foreach_lerp_ (multi-tensor floor)"] = lambda: torch._foreach_lerp_(
        floor_shadows, plain, 1 - DECAY
    )
    if params[0].dtype == torch.float32:
        n = sum(p.numel() for p in params)
        flat_shadow = torch.zeros(n, device=params[0].device)
        flat_value = torch.randn(n, device=params[0].device)
        found["one flat lerp_ (bandwidth floor)"] = lambda: flat_shadow.lerp_(flat_value, 1 - DECAY)
    return found


def time_mix(
    name: str, total: int, count: int, dtype: torch.dtype, args: argparse.Namespace
) -> list[tuple[str, str, float]]:
    params = make_model(total, count, dtype, args.device)
    medians = median_ms_interleaved(methods(params), args.repeats, args.device)
    rows = [(name, method, ms) for method, ms in medians.items()]
    del params
    return rows


def sharded_rows(total: int, count: int, ranks: int, repeats: int) -> list[tuple[str, str, float]]:
    """One fp32 mix sharded by FSDP2 over ``ranks`` CPU processes; rank 0's medians (all ranks run at once)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_sharded_rank, args=(ranks, folder, total, count, repeats), nprocs=ranks, join=True)
        medians = torch.load(Path(folder) / "medians.pt", weights_only=True)
    mix = f"{total / 1e6:.0f}M in {count} tensors on {ranks} FSDP2 ranks (each its shards), float32"
    return [(mix, method, ms) for method, ms in medians.items()]


def _sharded_rank(rank: int, ranks: int, folder: str, total: int, count: int, repeats: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(max(1, torch.get_num_threads() // ranks))  # the ranks share the cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=ranks)
    try:
        model = torch.nn.ParameterList(make_model(total, count, torch.float32, "cpu"))
        fully_shard(model, mesh=init_device_mesh("cpu", (ranks,)))
        params = list(model.parameters())  # DTensors; apply() reads their local shards
        ema = ExponentialMovingAverage([(f"p{i}", p) for i, p in enumerate(params)], decay=DECAY)
        local = [local_part(p).detach() for p in params]
        shadows = [t.clone() for t in local]
        fns = {
            "ema-average apply() on the local shards": ema.apply,
            "_foreach_lerp_ (multi-tensor floor, same local tensors)": lambda: torch._foreach_lerp_(
                shadows, local, 1 - DECAY
            ),
        }
        medians = median_ms_interleaved(fns, repeats, "cpu")
        if rank == 0:
            torch.save(medians, Path(folder) / "medians.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _peak_mib() -> float:
    """This process's peak resident MiB (VmHWM belongs to this address space; ru_maxrss would inherit the
    parent's peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(total: int, count: int, how: str) -> float:
    """In a fresh process: the peak MiB one bf16 update adds above the model and its shadows."""
    params = [torch.nn.Parameter(torch.randn(total // count, dtype=torch.bfloat16)) for _ in range(count)]
    if how == "apply":
        ema = ExponentialMovingAverage([(str(i), p) for i, p in enumerate(params)], decay=DECAY)
    else:
        shadows = [torch.zeros(p.shape) for p in params]  # touched, so counted before
    before = _peak_mib()
    with torch.no_grad():
        if how == "apply":
            ema.apply()
        else:  # the hand-written multi-tensor way: a float32 copy of every parameter, then one lerp
            torch._foreach_lerp_(shadows, [p.float() for p in params], 1 - DECAY)
    return _peak_mib() - before


def extra_memory_mib(total: int, count: int, how: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(total), str(count), how],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the parameter counts")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="FSDP2 ranks for the sharded rows (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-child", nargs=3, metavar=("TOTAL", "COUNT", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        total, count, how = args.memory_child
        print(memory_child(int(total), int(count), how))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    large = (int(50_000_000 * args.scale), 200)
    small = (int(20_000_000 * args.scale), 5_000)
    console = Console(width=120)
    console.print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    rows = []
    for total, count in (large, small):
        for dtype in (torch.float32, torch.bfloat16):
            mix = f"{total / 1e6:.0f}M in {count} tensors, {str(dtype).removeprefix('torch.')}"
            rows += time_mix(mix, total, count, dtype, args)
    if args.ranks:
        for total, count in (large, small):
            rows += sharded_rows(total, count, args.ranks, args.repeats)

    floors = {mix: ms for mix, method, ms in rows if method.startswith("_foreach_lerp_")}  # each round's own
    fp32_apply = {
        mix.rsplit(", ", 1)[0]: ms
        for mix, method, ms in rows
        if method.startswith("ema") and "float32" in mix
    }
    table = Table(
        title="One EMA update: median ms (ratio to _foreach_lerp_ on fp32 copies timed in the same round)"
    )
    for col in ("mix", "method", "median ms", "x floor", "x ema fp32"):
        table.add_column(col, justify="right" if col != "method" and col != "mix" else "left")
    for mix, method, ms in rows:
        key = mix.rsplit(", ", 1)[0]
        table.add_row(mix, method, f"{ms:.1f}", f"{ms / floors[mix]:.2f}", f"{ms / fp32_apply[key]:.2f}")
    console.print(table)

    if args.device == "cpu":
        mem = Table(title="Extra peak memory of one bf16 update (child process, MiB above model + shadows)")
        mem.add_column("method")
        mem.add_column("extra MiB", justify="right")
        total, count = large
        mem.add_row("ema-average apply()", f"{extra_memory_mib(total, count, 'apply'):.0f}")
        mem.add_row("p.float() copies, then _foreach_lerp_", f"{extra_memory_mib(total, count, 'float'):.0f}")
        console.print(mem)


if __name__ == "__main__":
    main()
