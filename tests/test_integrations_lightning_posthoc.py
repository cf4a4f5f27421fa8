"""Post-hoc EMA snapshots kept by the Lightning EMA callback (``posthoc_every``), with the real Lightning
trainer: each snapshot (beside the checkpoints) is the float64 power EMA of the weights after every step, the
command reconstructs from the checkpoint folder, a run resumed from a ``.ckpt`` writes the uninterrupted
run's snapshots bit for bit, and the training weights are those of a run without the option, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from ema_average.errors import CheckpointError  # noqa: E402
from ema_average.online.lightning import EMACallback  # noqa: E402
from ema_average.online.posthoc_callbacks import DTENSOR_REFUSAL  # noqa: E402
from posthoc_helpers import assert_reconstructs, assert_snapshots_are_power_emas, read_snapshots  # noqa: E402
from test_integrations_lightning import Recorder, _free_port, ckpt_trainer, fit, model  # noqa: E402

WIDTHS = (0.05, 0.1)


@pytest.mark.slow
def test_snapshots_are_power_emas_reconstructed_and_leave_training_untouched(tmp_path: Path) -> None:
    run, recorder = tmp_path / "run", Recorder()
    fit(ckpt_trainer(run, [recorder, EMACallback(decay=0.9, posthoc_every=4)], max_epochs=2), model())
    plain = Recorder()
    fit(ckpt_trainer(tmp_path / "plain", [plain, EMACallback(decay=0.9)], max_epochs=2), model())
    assert plain.steps == recorder.steps == list(range(17))
    for with_option, without in zip(recorder.weights, plain.weights, strict=True):
        for name, value in without.items():
            assert torch.equal(with_option[name], value), name
    folder = run / "posthoc-ema"
    assert_snapshots_are_power_emas(folder, recorder.weights[1:], [4, 8, 12, 16], WIDTHS)
    assert "posthoc_ema" in torch.load(run / "epoch=1-step=16.ckpt", weights_only=True)
    assert_reconstructs(run, folder, 0.07, tmp_path / "sigma0.07.safetensors")


@pytest.mark.slow
def test_resume_writes_the_uninterrupted_runs_snapshots_bit_for_bit(tmp_path: Path) -> None:
    fit(ckpt_trainer(tmp_path / "whole", [EMACallback(decay=0.9, posthoc_every=4)], max_epochs=4), model())
    parts = tmp_path / "parts"
    fit(ckpt_trainer(parts, [EMACallback(decay=0.9, posthoc_every=4)], max_epochs=2), model())
    stopped = parts / "epoch=1-step=16.ckpt"
    resumed = EMACallback(decay=0.9, posthoc_every=4)
    fit(ckpt_trainer(parts, [resumed], max_epochs=4), model(seed=5), ckpt_path=str(stopped))
    whole, got = read_snapshots(tmp_path / "whole" / "posthoc-ema"), read_snapshots(parts / "posthoc-ema")
    assert sorted(got) == sorted(whole) == sorted((s, w) for s in range(4, 33, 4) for w in WIDTHS)
    for key in whole:
        for name, value in whole[key].items():
            assert torch.equal(got[key][name], value), (key, name)


def test_resuming_a_checkpoint_saved_without_snapshots_is_one_clear_error(tmp_path: Path) -> None:
    fit(ckpt_trainer(tmp_path, [EMACallback(decay=0.9)], max_epochs=1), model())
    with pytest.raises(CheckpointError, match="holds no post-hoc snapshots' state"):
        fit(
            ckpt_trainer(tmp_path, [EMACallback(decay=0.9, posthoc_every=4)], max_epochs=2),
            model(),
            ckpt_path=str(tmp_path / "epoch=0-step=8.ckpt"),
        )


DTENSOR_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from ema_average.errors import ConfigurationError
    from ema_average.online.posthoc_callbacks import SnapshotKeeper

    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    try:
        SnapshotKeeper(4, (0.05, 0.1), torch.float32).start([("w", weight)], "out", 0, rank_zero=True)
        print("snapshotted")
    except ConfigurationError as exc:
        print(exc)
    dist.destroy_process_group()
    """
)


@pytest.mark.subprocess
def test_sharded_dtensor_parameters_are_refused_at_start_with_one_line(tmp_path: Path) -> None:
    """What both callbacks call when training starts, on a real one-rank gloo group."""
    script = tmp_path / "dtensor.py"
    script.write_text(DTENSOR_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [DTENSOR_REFUSAL]
    assert not (tmp_path / "out").exists()
