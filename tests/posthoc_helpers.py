"""What the callbacks' post-hoc snapshot tests share: EDM2's power EMA written out in float64 over the
recorded weights of every step, and the snapshots a run wrote, read back by step and profile."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cli_helpers import run_cli
from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, reconstruct


def power_reference(
    history: list[dict[str, torch.Tensor]], sigma_rel: float, t: int
) -> dict[str, torch.Tensor]:
    """EDM2's power EMA at step t of the weights after steps 1..t (``history[k - 1]``): step k's weights
    count (k/t)^(g+1) - ((k-1)/t)^(g+1)."""
    g = sigma_rel_to_gamma(sigma_rel)
    weights = [(k / t) ** (g + 1) - ((k - 1) / t) ** (g + 1) for k in range(1, t + 1)]
    return {n: sum(w * h[n] for w, h in zip(weights, history[:t], strict=True)) for n in history[0]}


def read_snapshots(folder: Path) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """Every snapshot in ``folder`` by (step, sigma_rel), as its metadata says."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - no __iter__
        found[(int(meta["step"]), float(meta["posthoc_sigma_rel"]))] = tensors
    return found


def assert_snapshots_are_power_emas(
    folder: Path, history: list[dict[str, torch.Tensor]], steps: list[int], sigma_rels: tuple[float, ...]
) -> None:
    """One file per profile at each of ``steps``, each the float64 power EMA (float32 tolerance)."""
    snapshots = read_snapshots(folder)
    assert sorted(snapshots) == sorted((s, w) for s in steps for w in sigma_rels)
    for (step, width), tensors in snapshots.items():
        expected = power_reference(history, width, step)
        assert set(expected) <= set(tensors)
        for name, value in expected.items():
            assert tensors[name].dtype == torch.float32
            torch.testing.assert_close(tensors[name].double(), value, rtol=1e-5, atol=1e-6)


def assert_reconstructs(run: Path, folder: Path, sigma_rel: float, out: Path) -> None:
    """``ema-average RUN --method posthoc --sigma-rel W`` finds ``folder``'s snapshots and writes their
    combination with the float64 least-squares coefficients (float32 tolerance)."""
    done = run_cli(run, "--method", "posthoc", "--sigma-rel", repr(sigma_rel), "-o", out)
    assert done.returncode == 0, done.stderr
    snapshots = read_snapshots(folder)
    keys = sorted(snapshots)
    profiles = [Profile(step, sigma_rel_to_gamma(width)) for step, width in keys]
    last = max(step for step, _ in keys)
    coefficients = reconstruct(profiles, Profile(last, sigma_rel_to_gamma(sigma_rel))).coefficients
    written = load_file(out)
    for name in snapshots[keys[0]]:
        expected = sum(c * snapshots[k][name].double() for c, k in zip(coefficients, keys, strict=True))
        torch.testing.assert_close(written[name].double(), expected, rtol=1e-5, atol=1e-6)
