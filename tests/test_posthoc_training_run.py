"""Post-hoc EMA on a real small training: the EMAs reconstructed for widths that were not tracked (0.07,
0.15) against power EMAs of those widths tracked directly in the same run.

The bound asserted is the method's own error, exactly: both are weighted sums of the weights theta_k of
every step k, with weights summing to 1 (the snapshots' binned profiles combined by the coefficients, and
the target's binned profile). Their difference is sum_k delta_k theta_k = sum_k delta_k (theta_k - direct)
since sum_k delta_k = 0, so per tensor ||reconstructed - direct|| <= sum_k |delta_k| ||theta_k - direct||
(the triangle inequality), plus float32 rounding of the snapshots and sums. delta comes from the profiles
alone; the distances from the run's own weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ema_average.engine.averages import PowerFunctionMovingAverage
from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, binned_weights
from ema_average.offline.options import RunOptions
from ema_average.offline.posthoc_job import Targets, prepare
from ema_average.offline.run import execute
from ema_average.online.posthoc_training import PowerEmaSnapshots

STEPS, EVERY, TRACKED, UNTRACKED = 3000, 300, (0.05, 0.10), (0.07, 0.15)


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :1] * x[:, 1:2]).sin() + x[:, 2:3] + 0.3 * torch.randn(n, 1, generator=g)


def _loss(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    with torch.no_grad():
        out = torch.func.functional_call(model, {n: w.float() for n, w in weights.items()}, (x,))
    return float((out - y).pow(2).mean())


@pytest.mark.slow
def test_reconstructed_emas_match_the_tracked_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    snaps = PowerEmaSnapshots(model, TRACKED, every=EVERY, folder=tmp_path / "run" / "posthoc-ema")
    direct = [PowerFunctionMovingAverage(model, sigma_rel=s) for s in UNTRACKED]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data(1, 4096)
    history: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only fight each other
    try:
        for step in range(1, STEPS + 1):
            batch = torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(step))
            loss = (model(x[batch]) - y[batch]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            snaps.update(step)
            for average in direct:
                average.apply(num_updates=step)
            for n, p in model.named_parameters():
                history[n].append(p.detach().clone())
    finally:
        torch.set_num_threads(threads)

    run = prepare(RunOptions(tmp_path / "run", output=tmp_path / "ema.safetensors"), Targets(UNTRACKED))
    execute(run.prepared)
    test_x, test_y = _data(2, 2048)
    raw = dict(model.named_parameters())
    print(f"\nraw weights: test loss {_loss(model, raw, test_x, test_y):.5f}")
    for width, average, path, solved in zip(
        UNTRACKED, direct, run.prepared.outputs, run.reconstructions, strict=True
    ):
        rebuilt, tracked = load_file(str(path)), average.averages()
        delta = _binned_difference(run, solved.coefficients, width)
        print(
            f"sigma_rel {width}: fit error {solved.fit_error:.3%}, sum|delta_k| {np.abs(delta).sum():.4f}; test "
            f"loss reconstructed {_loss(model, rebuilt, test_x, test_y):.5f}, tracked "
            f"{_loss(model, tracked, test_x, test_y):.5f}"
        )
        for name, want in tracked.items():
            error = float((rebuilt[name].double() - want.double()).norm())
            distances = torch.stack([(h.double() - want.double()).norm() for h in history[name]]).numpy()
            bound = float(np.abs(delta) @ distances) + 1e-6 * float(want.norm()) * solved.amplification
            print(
                f"  {name}: relative error {error / float(want.norm()):.2e} (bound {bound / float(want.norm()):.2e})"
            )
            assert error <= bound
        loss_rebuilt, loss_tracked = (
            _loss(model, rebuilt, test_x, test_y),
            _loss(model, tracked, test_x, test_y),
        )
        assert abs(loss_rebuilt - loss_tracked) <= 0.01 * loss_tracked


def _binned_difference(run, coefficients: tuple[float, ...], width: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each step's weight in the reconstruction minus its weight in the tracked EMA (sums to 0)."""
    combined = np.zeros(STEPS)
    for c, profile in zip(coefficients, run.snapshots.profiles, strict=True):
        combined += c * binned_weights(profile, STEPS)
    target = binned_weights(Profile(STEPS, sigma_rel_to_gamma(width)))
    assert abs(combined.sum() - 1) < 1e-9 and abs(target.sum() - 1) < 1e-12
    return combined - target
