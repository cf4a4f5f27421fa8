"""What the pickle pre-scan costs against loading the same pickle, on realistic files.

Writes (once, to ``--dir``) a ``torch.save`` of a 20,000-tensor state dict and the DCP ``.metadata`` of a
2,000-parameter model with its AdamW state, then prints the median seconds of: the pre-scan of the torch
file's ``data.pkl``, torch's own scan of its globals, torch's ``weights_only`` load of that file onto the
meta device (what the scan runs before), the pre-scan of the ``.metadata`` and the restricted load of it;
then the hash work each pickle is charged, per byte (the bound: ``MAX_HASH_WORK_PER_BYTE``).

    python benchmarks/pickle_scan.py [--dir /tmp/pickle-bench] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch._weights_only_unpickler import get_globals_in_pkl

from ema_average.checkpoints.layouts.dcp_metadata import load_dcp_metadata
from ema_average.checkpoints.reading import pickle_scan


def torch_file(folder: Path, tensors: int) -> Path:
    path = folder / "state.pt"
    if not path.exists():
        state = {f"layers.{i // 4}.block.{i % 4}.weight": torch.zeros(2, 3) for i in range(tensors)}
        torch.save(state, path)
    return path


def dcp_folder(folder: Path, parameters: int) -> Path:
    path = folder / "dcp"
    if not (path / ".metadata").exists():
        model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(parameters)])
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path / ".metadata"


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pickle-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = torch_file(args.dir, 20_000)
    with zipfile.ZipFile(path) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    metadata = dcp_folder(args.dir, 2_000)
    raw = metadata.read_bytes()
    rows = [
        (f"scan torch data.pkl ({len(pkl):,} bytes)", lambda: scan_torch(pkl)),
        ("torch's own globals scan (get_globals_in_pkl)", lambda: get_globals_in_pkl(io.BytesIO(pkl))),
        ("torch.load(weights_only, meta) same file", lambda: torch.load(path, map_location="meta")),
        (f"scan DCP .metadata ({len(raw):,} bytes)", lambda: scan_dcp(raw)),
        ("load_dcp_metadata (scan + restricted load)", lambda: load_dcp_metadata(metadata)),
    ]
    for name, run in rows:
        print(f"{name:<48} {median_seconds(run, args.repeats):8.3f} s")
    for name, data, result in (("data.pkl", pkl, scan_torch(pkl)), (".metadata", raw, scan_dcp(raw))):
        print(f"hash work of the {name}: {result.work:,} ({result.work / len(data):.2f} per byte)")  # type: ignore[attr-defined]


def scan_torch(pkl: bytes) -> object:
    return pickle_scan.scan_pickle(io.BytesIO(pkl), len(pkl), is_allowed=lambda name: True, max_kinds=1024)


def scan_dcp(raw: bytes) -> object:
    return pickle_scan.scan_pickle(io.BytesIO(raw), len(raw), torch_opcodes=False, what="DCP metadata")


if __name__ == "__main__":
    main()
