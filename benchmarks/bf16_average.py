"""What a bfloat16 EMA (``average_dtype=torch.bfloat16``) costs in accuracy, against a float64 EMA.

Weights that random-walk (``w <- w + 1e-3 * u``, ``u`` uniform with unit variance, from ``w ~ N(0, 0.05)``:
an SGD-like trajectory) are averaged at each decay by four EMAs of the same values: the float32 default, the
bfloat16 one (stochastic rounding), a bfloat16 one rounded to nearest (the float32 update, then
``.bfloat16()``), and a float64 reference. Prints, after the last step, each EMA's error against the
reference: the RMS and the largest, relative to the RMS distance the EMA travelled from the start, and the
mean (bias); and, as the floor any bfloat16 copy has, the float64 EMA rounded once to bfloat16.

    python benchmarks/bf16_average.py [--numel 1000000] [--steps 10000] [--decays 0.999 0.9999]
"""

from __future__ import annotations

import argparse
import math

import torch

from ema_average import ExponentialMovingAverage


def _stats(average: torch.Tensor, reference: torch.Tensor, travel: float) -> str:
    error = average.double() - reference
    rms, worst, bias = error.pow(2).mean().sqrt().item(), error.abs().max().item(), error.mean().item()
    return f"rms {rms:.3e} ({rms / travel:7.2%})  max {worst:.3e}  mean {bias:+.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.999, 0.9999])
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = torch.nn.Parameter(0.05 * torch.randn(args.numel))
    start = weights.detach().double().clone()
    named = [("w", weights)]
    emas = {
        d: (
            ExponentialMovingAverage(named, decay=d),
            ExponentialMovingAverage(named, decay=d, average_dtype=torch.bfloat16),
        )
        for d in args.decays
    }
    nearest = {d: weights.detach().bfloat16() for d in args.decays}
    references = {d: start.clone() for d in args.decays}
    step_noise = torch.empty(args.numel)
    for _ in range(args.steps):
        with torch.no_grad():
            weights.add_(step_noise.uniform_(-math.sqrt(3), math.sqrt(3)), alpha=1e-3)
        value = weights.detach()
        for d in args.decays:
            wide, narrow = emas[d]
            wide.apply()
            narrow.apply()
            nearest[d] = torch.lerp(nearest[d].float(), value, 1 - d).bfloat16()
            references[d].lerp_(value.double(), 1 - d)
    print(f"{args.numel:,} elements, {args.steps:,} steps; error against the float64 EMA")
    for d in args.decays:
        reference = references[d]
        travel = (reference - start).pow(2).mean().sqrt().item()
        print(f"decay {d}: the float64 EMA moved {travel:.3e} (rms) from the start")
        wide, narrow = emas[d]
        print("  float32            ", _stats(wide.averages()["w"], reference, travel))
        print("  bf16 stochastic    ", _stats(narrow.averages()["w"], reference, travel))
        print("  bf16 nearest       ", _stats(nearest[d], reference, travel))
        print("  float64 -> bf16 once", _stats(reference.bfloat16(), reference, travel))


if __name__ == "__main__":
    main()
