"""Time and peak memory of averaging K checkpoints, against the ways users do it today and the I/O floor.

Each method runs in a child process of its own, three times; the table gives median wall time and peak
RSS with a bare ``python -c "import torch"`` child's subtracted, and ratios to the I/O floor (read every
input byte into one reused buffer, write the output's size, fsync). The page cache is warmed first, so
the figures are of a hot cache.

    python benchmarks/offline.py [--params 100e6] [--workdir /tmp/ema-average-bench] [--quick]

Disk: about (16 + 8 + 4) x the fp32 checkpoint size, plus a 4x model's 4 checkpoints, under --workdir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HWM = """
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

CHILD = {
    "bare torch": "import torch",
    "I/O floor": """
import os, sys, torch
files, out, size = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(16 << 20)
for f in files:
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
with open(out, "wb") as fh:
    left = size
    zeros = memoryview(bytes(16 << 20))
    while left:
        left -= fh.write(zeros[: min(left, len(zeros))])
    fh.flush()
    os.fsync(fh.fileno())
""",
    "ema-average": """
import sys
from ema_average.cli import main
sys.argv = ["ema-average", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
""",
}

# The ways users average today: load each whole checkpoint, fold it in, save the result.
LOAD_EVERYTHING = """
import sys, torch
from safetensors.torch import load_file, save_file
files, out, decay = sys.argv[1:-2], sys.argv[-2], float(sys.argv[-1])
avg = None
for f in files:
    state = LOAD
    if avg is None:
        avg = {k: v.float().clone() for k, v in state.items()}
    else:
        for k, v in state.items():
            avg[k].mul_(decay).add_(v, alpha=1 - decay)
    del state
save_file(avg, out)
"""
CHILD["torch.load loop (fairseq style)"] = LOAD_EVERYTHING.replace(
    "LOAD", 'torch.load(f, map_location="cpu", weights_only=True)["model"]'
)
CHILD["load_file loop"] = LOAD_EVERYTHING.replace("LOAD", "load_file(f)")


def run_child(method: str, args: list[str]) -> tuple[float, int]:
    code = HWM + CHILD[method] + "\nprint('HWM', _hwm())\n"
    os.sync()  # start clean: the child's fsync then flushes only its own writes
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed: {done.stderr[-2000:]}")
    hwm = int(next(line for line in done.stdout.splitlines() if line.startswith("HWM")).split()[1])
    return seconds, hwm


def measure(method: str, args: list[str], repeats: int) -> tuple[float, int]:
    results = [run_child(method, args) for _ in range(repeats)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def make_run(folder: Path, k: int, params: int, dtype: str, fmt: str) -> list[Path]:
    """K checkpoints of a model of ``params`` parameters in 4M-parameter tensors (cached on disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = f"""
import torch, sys
from safetensors.torch import save_file
folder, k, params, fmt = sys.argv[1], int(sys.argv[2]), int(float(sys.argv[3])), sys.argv[4]
dtype = getattr(torch, "{dtype}")
n = 2048 * 2048
for step in range(1, k + 1):
    g = torch.Generator().manual_seed(step)
    state = {{f"layers.{{i}}.weight": torch.randn(2048, 2048, generator=g).to(dtype) for i in range(params // n)}}
    path = f"{{folder}}/step_{{step * 1000}}.{{fmt}}"
    if fmt == "safetensors":
        save_file(state, path, metadata={{"step": str(step * 1000)}})
    else:
        torch.save({{"model": state, "step": step * 1000}}, path)
"""
    files = sorted(folder.glob(f"*.{fmt}"))
    if len(files) != k:
        for f in files:
            f.unlink()
        subprocess.run([sys.executable, "-c", code, str(folder), str(k), str(params), fmt], check=True)
        files = sorted(folder.glob(f"*.{fmt}"))
    return files


def subset(folder: Path, files: list[Path], k: int) -> Path:
    """A folder holding the first k files, as hard links (no extra disk)."""
    target = folder.parent / f"{folder.name}-k{k}"
    target.mkdir(exist_ok=True)
    for f in files[:k]:
        link = target / f.name
        if not link.exists():
            os.link(f, link)
    return target


def warm(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ema-average-bench"))
    parser.add_argument("--budget", default="256MiB", help="--memory-budget given to ema-average")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="only K=8 fp32 safetensors and .pt")
    args = parser.parse_args()
    params = int(args.params)
    work = args.workdir
    out = work / "out.safetensors"
    console = Console(width=160)
    decay = "0.999"

    cases: list[tuple[str, Path, list[Path], list[str]]] = []
    st16 = make_run(work / "st-fp32", 16, params, "float32", "safetensors")
    st8 = subset(work / "st-fp32", st16, 8)
    pt8 = make_run(work / "pt-fp32", 8, params, "float32", "pt")
    cases.append(("safetensors fp32, K=8", st8, st16[:8], ["load_file loop"]))
    cases.append(("torch .pt fp32, K=8", work / "pt-fp32", pt8, ["torch.load loop (fairseq style)"]))
    if not args.quick:
        bf8 = make_run(work / "st-bf16", 8, params, "bfloat16", "safetensors")
        cases.append(("safetensors bf16, K=8", work / "st-bf16", bf8, ["load_file loop"]))
        cases.append(("safetensors fp32, K=4", subset(work / "st-fp32", st16, 4), st16[:4], []))
        cases.append(("safetensors fp32, K=16", work / "st-fp32", st16, []))
        big = make_run(work / "st-fp32-4x", 4, 4 * params, "float32", "safetensors")
        cases.append(("safetensors fp32, 4x model, K=4", work / "st-fp32-4x", big, []))

    bare_s, bare_rss = measure("bare torch", [], args.repeats)
    console.print(
        f"bare `import torch`: {bare_s:.2f} s, {bare_rss / 2**20:.0f} MiB (subtracted below); "
        f"ema-average --memory-budget {args.budget}, --device {args.device}; largest tensor 16 MiB (fp32)"
    )
    table = Table(
        title="Averaging K checkpoints: median wall time and peak RSS above bare torch (hot page cache)"
    )
    for col in ("input", "method", "seconds", "x floor", "peak RSS MiB", "ckpt MiB"):
        table.add_column(col, justify="left" if col in ("input", "method") else "right")
    for label, folder, files, others in cases:
        warm(files)
        ckpt_mib = files[0].stat().st_size / 2**20
        out_size = files[0].stat().st_size
        floor_s, floor_rss = measure("I/O floor", [*map(str, files), str(out), str(out_size)], args.repeats)
        rows = [("I/O floor", floor_s, floor_rss)]
        ema_args = [str(folder), "-o", str(out), "--overwrite", "-q", "--decay", decay]
        ema_args += ["--memory-budget", args.budget, "--device", args.device]
        rows.append(("ema-average", *measure("ema-average", ema_args, args.repeats)))
        for other in others:
            rows.append((other, *measure(other, [*map(str, files), str(out), decay], args.repeats)))
        floor = floor_s - bare_s
        for method, seconds, rss in rows:
            table.add_row(
                label,
                method,
                f"{seconds - bare_s:.2f}",
                f"{(seconds - bare_s) / floor:.2f}",
                f"{(rss - bare_rss) / 2**20:.0f}",
                f"{ckpt_mib:.0f}",
            )
        table.add_section()
    console.print(table)
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
