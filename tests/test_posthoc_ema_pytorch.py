"""ema-pytorch's ``PostHocEMA`` folders, written by the real package: read (weights only, its profiles
named by the user), reconstructed in one pass, equal to its own ``synthesize_ema_model``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_cli
from ema_average.offline.options import RunOptions
from ema_average.offline.posthoc_job import Targets, prepare
from ema_average.offline.run import execute

pytestmark = pytest.mark.producers  # ema-pytorch's PostHocEMA writes the snapshots

ema_pytorch = pytest.importorskip("ema_pytorch")

WIDTHS = (0.05, 0.28)  # ema-pytorch's README example


@pytest.fixture(scope="module")
def posthoc_folder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small regression trained 600 steps with PostHocEMA checkpointing every 100 (float16 files)."""
    folder = tmp_path_factory.mktemp("ema-pytorch") / "post-hoc-ema-checkpoints"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ema = ema_pytorch.PostHocEMA(
        net, sigma_rels=WIDTHS, update_every=1, checkpoint_every_num_steps=100, checkpoint_folder=str(folder)
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only fight each other (7x slower on 2 cores)
    try:
        for _ in range(600):
            x = torch.randn(32, 16)
            loss = (net(x) - x[:, :4]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update()
    finally:
        torch.set_num_threads(threads)
    return folder, ema


@pytest.mark.parametrize("target", [0.07, 0.15])
def test_matches_its_own_synthesize_ema_model(posthoc_folder, tmp_path: Path, target: float) -> None:  # type: ignore[no-untyped-def]
    folder, ema = posthoc_folder
    run = prepare(
        RunOptions(folder, output=tmp_path / "o.safetensors", dtype="float32"),
        Targets(sigma_rels=(target,), snapshot_sigma_rels=WIDTHS),
    )
    assert len(run.prepared.checkpoints) == 12
    execute(run.prepared)
    ours = load_file(str(tmp_path / "o.safetensors"))
    theirs = dict(ema.synthesize_ema_model(sigma_rel=target).ema_model.named_parameters())
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        # Both sum the same float16 values; they differ by ema-pytorch's coefficients not being scaled to
        # sum to 1 (off by < 3e-4 here) and the order of float32 sums: within float16's 2^-11.
        scale = float(tensor.abs().max())
        torch.testing.assert_close(ours[name], tensor.detach(), rtol=2**-11, atol=2**-11 * scale)


def _error(folder: Path, *args: str) -> str:
    result = run_cli(folder, "--method", "posthoc", "--sigma-rel", "0.1", *args)
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_refused_without_the_profiles_named(posthoc_folder) -> None:  # type: ignore[no-untyped-def]
    folder, _ = posthoc_folder
    assert "--snapshot-sigma-rel 0.05,0.28" in _error(folder)
    assert "names 1 profile(s)" in _error(folder, "--snapshot-sigma-rel", "0.05")
