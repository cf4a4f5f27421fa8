"""One engine, literally: the library's ``apply()`` over a run's weights and the command's ``--schedule step``
over that run's per-step checkpoints give the same bits, for float32 and bf16 weights of every size (and
float64, whose averages show a decay that differs in its last bit).

The expectation is independent of both: each side computes the whole average on its own (the command
from files it reads back, the library from live parameters), and only then are the results compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli
from ema_average import ExponentialMovingAverage, PowerFunctionMovingAverage
from ema_average.engine.averages import MovingAverage

STEPS = range(1, 14)  # step 1 starts the average; steps 2..13 are all in the warm-up (decay < 0.9)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = {"one": 1, "seven": 7, "thousand": 1000, "hundred_k": 100_000}


def weights_at(step: int, sizes: dict[str, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's weights at ``step``: a random walk, so every update moves every average."""
    g = torch.Generator().manual_seed(step)
    return {name: (torch.randn(n, generator=g) * step).to(dtype) for name, n in sizes.items()}


def online(method: str, sizes: dict[str, int], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """The library: parameters trained step by step, ``apply(num_updates=step)`` after each."""
    first = weights_at(STEPS[0], sizes, dtype)
    params = {name: torch.nn.Parameter(t.to(device)) for name, t in first.items()}
    ema: MovingAverage
    if method == "power":
        ema = PowerFunctionMovingAverage(params, gamma=6.94)
    else:
        ema = ExponentialMovingAverage(params, decay=0.9)
    for step in STEPS[1:]:
        with torch.no_grad():
            for name, value in weights_at(step, sizes, dtype).items():
                params[name].copy_(value)
        ema.apply(num_updates=step)
    return {name: t.cpu() for name, t in ema.averages().items()}


def offline(
    tmp_path: Path, method: str, sizes: dict[str, int], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """The command over one safetensors checkpoint per step (the step in the header's metadata)."""
    run = tmp_path / "run"
    run.mkdir()
    for step in STEPS:
        weights = weights_at(step, sizes, dtype)
        save_file(weights, str(run / f"model_step_{step}.safetensors"), metadata={"step": str(step)})
    out = tmp_path / "ema.safetensors"
    settings = ["--method", "power", "--gamma", "6.94"] if method == "power" else ["--decay", "0.9"]
    out_dtype = "as-input" if dtype == torch.float64 else "float32"
    args = [
        str(run),
        "-o",
        str(out),
        "--schedule",
        "step",
        "--dtype",
        out_dtype,
        "--device",
        device,
        *settings,
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return load_file(str(out))


CASES = [pytest.param({name: n}, id=name) for name, n in SIZES.items()] + [pytest.param(SIZES, id="mixed")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("method", ["exponential", "power"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
@pytest.mark.parametrize("sizes", CASES)
def test_apply_and_the_command_agree_bit_for_bit(
    tmp_path: Path, method: str, dtype: torch.dtype, sizes: dict[str, int], device: str
) -> None:
    expected = online(method, sizes, dtype, device)
    got = offline(tmp_path, method, sizes, dtype, device)
    assert set(got) == set(expected)
    for name, average in expected.items():
        assert got[name].dtype == average.dtype
        bits = torch.int64 if average.dtype == torch.float64 else torch.int32
        differ = int((got[name].view(bits) != average.view(bits)).sum())
        assert differ == 0, f"{name}: {differ} of {average.numel()} values differ in their bits"
