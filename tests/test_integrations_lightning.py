"""The Lightning EMA callback, with the real Lightning trainer on the CPU: the EMA it keeps equals a float64
reference of the weights after each optimizer step, validation sees the averages, and a run stopped at a
checkpoint and resumed ends with the uninterrupted run's EMA, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import Ran, run_cli
from helpers import float64_reference

L = pytest.importorskip("lightning")

from ema_average.errors import AverageStateError, ConfigurationError  # noqa: E402
from ema_average.online.lightning import EMA_KEY, EMACallback  # noqa: E402

DECAY = 0.9


class Tiny(L.LightningModule):
    """Two layers and a batch norm (a buffer the averaged model must carry); momentum SGD (optimizer state
    that a resume must restore for the weights, and so the EMA, to continue bit for bit)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Recorder(L.Callback):
    """The weights (parameters and floating-point buffers: batch-norm statistics) at the start and after each
    optimizer step, in float64: the reference's input."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def _record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.steps.append(trainer.global_step)
        tensors = [*module.named_parameters(), *module.named_buffers()]
        self.weights.append({n: t.detach().double().clone() for n, t in tensors if t.is_floating_point()})

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._record(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.steps[-1]:
            self._record(trainer, module)


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(1)
    train = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    val = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    return torch.utils.data.DataLoader(train, batch_size=4), torch.utils.data.DataLoader(val, batch_size=8)


def trainer(callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "deterministic": True,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def fit(t: L.Trainer, model: L.LightningModule, **kwargs: Any) -> None:
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train, val, **kwargs)


def model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def reference(recorder: Recorder, decay: float = DECAY) -> dict[str, torch.Tensor]:
    """The TF rule written out plainly in float64 over the recorded per-step weights."""
    shadow = dict(recorder.weights[0])
    for step, weights in zip(recorder.steps[1:], recorder.weights[1:], strict=True):
        d = min(decay, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
    return shadow


def assert_close_to(averages: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(averages) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(averages[name].double(), tensor, rtol=1e-5, atol=1e-6)


def test_ema_equals_float64_reference_of_every_optimizer_step() -> None:
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    fit(trainer([recorder, ema], max_steps=12), model())
    assert recorder.steps == list(range(13))
    assert ema.moving_average is not None and ema.moving_average.num_applied == 12
    assert_close_to(ema.moving_average.averages(), reference(recorder))
    # and not the last weights: the average lags behind them
    last = recorder.weights[-1]["net.0.weight"]
    assert not torch.allclose(ema.moving_average.averages()["net.0.weight"].double(), last, atol=1e-3)


def test_the_callback_and_the_library_give_bit_identical_averages() -> None:
    """One engine: the weights the callback saw, fed to the library's own update, give the same bits."""
    from ema_average import ExponentialMovingAverage

    ema, recorder = EMACallback(decay=DECAY), Recorder()
    fit(trainer([recorder, ema], max_steps=12), model())
    library = ExponentialMovingAverage.from_tensors(
        {n: t.float() for n, t in recorder.weights[0].items()}, decay=DECAY
    )
    for step, weights in zip(recorder.steps[1:], recorder.weights[1:], strict=True):
        library.update(
            {n: t.float() for n, t in weights.items()}, num_updates=step
        )  # float64 -> the fp32 bits
    assert ema.moving_average is not None
    got = ema.moving_average.averages()
    for name, tensor in library.averages().items():
        assert torch.equal(got[name], tensor), name


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    fit(trainer([recorder, ema], max_epochs=2, accumulate_grad_batches=4), model())  # 8 batches an epoch
    assert recorder.steps == [0, 1, 2, 3, 4]
    assert ema.moving_average is not None and ema.moving_average.num_applied == 4
    assert_close_to(ema.moving_average.averages(), reference(recorder))


def test_every_n_steps_takes_the_gap_product_of_the_skipped_decays() -> None:
    ema, recorder = EMACallback(decay=DECAY, every=3), Recorder()
    fit(trainer([recorder, ema], max_steps=9), model())
    assert ema.moving_average is not None and ema.moving_average.num_applied == 3
    shadow = dict(recorder.weights[0])
    for step in (3, 6, 9):  # the weights seen at steps 3, 6, 9, each standing for the steps since the last
        d = 1.0
        for k in range(step - 2, step + 1):
            d *= min(DECAY, (1 + k) / (10 + k))
        shadow = {n: d * s + (1 - d) * recorder.weights[step][n] for n, s in shadow.items()}
    assert_close_to(ema.moving_average.averages(), shadow)


def val_loss_of(weights: dict[str, torch.Tensor], buffers_from: Tiny) -> float:
    """The validation loss of ``weights`` on a fresh copy of the model, computed here independently."""
    copy = model()
    copy.load_state_dict(buffers_from.state_dict())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            p.copy_(weights[name])
        for name, b in copy.named_buffers():
            if name in weights:  # averaged batch-norm statistics
                b.copy_(weights[name])
    copy.eval()
    _, val = loaders()
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(copy.net(x), y, reduction="sum") for x, y in val]
    return float(sum(losses) / len(val.dataset))


@pytest.mark.parametrize("evaluate", ["ema", "both", "raw"])
def test_validation_runs_on_the_averages_and_restores_training_weights(evaluate: str) -> None:
    ema, net = EMACallback(decay=DECAY, evaluate=evaluate), model()
    t = trainer([ema], max_steps=10, limit_val_batches=1.0)
    fit(t, net)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    raw |= {n: b.detach().clone() for n, b in net.named_buffers() if b.is_floating_point()}
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = t.validate(net, val, verbose=False)[0]
    for name, p in net.named_parameters():
        assert torch.equal(p, raw[name]), name  # bit for bit
    assert ema.moving_average is not None
    averages = {n: t.double() for n, t in ema.moving_average.averages().items()}
    ema_loss, raw_loss = val_loss_of(averages, net), val_loss_of(raw, net)
    assert abs(ema_loss - raw_loss) > 1e-3  # the two are told apart
    expected = raw_loss if evaluate == "raw" else ema_loss
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5)
    if evaluate == "both":
        assert metrics["val_loss_raw"] == pytest.approx(raw_loss, rel=1e-5)
    else:
        assert "val_loss_raw" not in metrics


def test_test_loop_runs_on_the_averages() -> None:
    ema, net = EMACallback(decay=DECAY), model()
    t = trainer([ema], max_steps=6, limit_test_batches=1.0)
    fit(t, net)
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = t.test(net, val, verbose=False)[0]
    assert ema.moving_average is not None
    assert metrics["test_loss"] == pytest.approx(val_loss_of(ema.moving_average.averages(), net), rel=1e-5)


def test_validation_during_fit_sees_the_averages_and_training_continues_on_raw_weights() -> None:
    """Validation in the middle of an epoch: the steps after it start from the training weights, so the
    EMA still equals the reference of an undisturbed run."""
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    plain = Recorder()
    fit(trainer([recorder, ema], max_steps=12, limit_val_batches=2, val_check_interval=4), model())
    fit(trainer([plain], max_steps=12), model())
    for swapped, undisturbed in zip(recorder.weights, plain.weights, strict=True):
        for name in undisturbed:
            assert torch.equal(swapped[name], undisturbed[name]), name
    assert ema.moving_average is not None
    assert_close_to(ema.moving_average.averages(), reference(plain))


def ckpt_trainer(folder: Path, callbacks: list[L.Callback], max_epochs: int) -> L.Trainer:
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}-{step}")
    return trainer([*callbacks, saver], max_epochs=max_epochs, enable_checkpointing=True)


@pytest.mark.slow
def test_stop_and_resume_gives_the_uninterrupted_ema_bit_for_bit(tmp_path: Path) -> None:
    whole = EMACallback(decay=DECAY)
    net_whole = model()
    fit(ckpt_trainer(tmp_path / "whole", [whole], max_epochs=4), net_whole)

    fit(ckpt_trainer(tmp_path / "parts", [EMACallback(decay=DECAY)], max_epochs=2), model())
    stopped = tmp_path / "parts" / "epoch=1-step=16.ckpt"
    assert stopped.is_file()
    resumed, net_resumed = EMACallback(decay=DECAY), model(seed=5)  # other weights: all must come back
    fit(ckpt_trainer(tmp_path / "parts", [resumed], max_epochs=4), net_resumed, ckpt_path=str(stopped))

    assert whole.moving_average is not None and resumed.moving_average is not None
    assert resumed.moving_average.num_applied == whole.moving_average.num_applied == 32
    got, expected = resumed.moving_average.averages(), whole.moving_average.averages()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    for (name, a), b in zip(net_whole.named_parameters(), net_resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_ckpt_holds_the_averaged_model_loadable_by_load_state_dict(tmp_path: Path) -> None:
    ema, net = EMACallback(decay=DECAY), model()
    fit(ckpt_trainer(tmp_path, [ema], max_epochs=1), net)
    saved = torch.load(tmp_path / "epoch=0-step=8.ckpt", weights_only=True)
    assert set(saved[EMA_KEY]) == set(saved["state_dict"])  # the whole model, buffers included
    fresh = model(seed=3)
    fresh.load_state_dict(saved[EMA_KEY])
    assert ema.moving_average is not None
    fresh_tensors = dict([*fresh.named_parameters(), *fresh.named_buffers()])
    for name, tensor in ema.moving_average.averages().items():
        assert torch.equal(fresh_tensors[name], tensor), name
    assert "net.1.running_mean" in ema.moving_average.averages()  # batch-norm statistics averaged
    assert torch.equal(
        saved[EMA_KEY]["net.1.num_batches_tracked"], saved["state_dict"]["net.1.num_batches_tracked"]
    )


def test_resuming_into_another_model_names_the_missing_average(tmp_path: Path) -> None:
    fit(ckpt_trainer(tmp_path, [EMACallback(decay=DECAY)], max_epochs=1), model())
    saved = torch.load(tmp_path / "epoch=0-step=8.ckpt", weights_only=True)
    del saved[EMA_KEY]["net.2.bias"]
    torch.save(saved, tmp_path / "edited.ckpt")
    with pytest.raises(AverageStateError, match=r"'net\.2\.bias'"):
        fit(
            trainer([EMACallback(decay=DECAY)], max_epochs=2),
            model(),
            ckpt_path=str(tmp_path / "edited.ckpt"),
        )


@pytest.mark.parametrize(
    ("options", "words"),
    [({"decay": 1.5}, "decay"), ({"every": 0}, "every"), ({"evaluate": "best"}, "evaluate")],
)
def test_bad_settings_fail_at_construction(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        EMACallback(**options)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import lightning as L
    from ema_average.online.lightning import EMACallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(L.Callback):
        def __init__(self):
            self.weights = []
        def on_train_start(self, trainer, module):
            self.weights.append({n: p.detach().double().clone() for n, p in module.named_parameters()})
        def on_train_batch_end(self, trainer, module, *args):
            self.weights.append({n: p.detach().double().clone() for n, p in module.named_parameters()})

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
        ema, recorder = EMACallback(decay=0.9), Recorder()
        trainer = L.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_steps=4, callbacks=[recorder, ema], logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
        shadow = dict(recorder.weights[0])
        for step, weights in enumerate(recorder.weights[1:], start=1):
            d = min(0.9, (1 + step) / (10 + step))
            shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
        averages = ema.moving_average.averages()
        gap = max(float((averages[n].double() - shadow[n]).abs().max()) for n in shadow)
        record = {
            "num_applied": ema.moving_average.num_applied,
            "gap": gap,
            "averages": {n: t.tolist() for n, t in averages.items()},
        }
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)
    """
)


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_ddp_two_gloo_ranks_keep_equal_averages(tmp_path: Path) -> None:
    """Lightning's own DDP launcher (it starts rank 1 by running the script again) on two CPU processes."""
    run_lightning_script(tmp_path, "ddp_ema.py", DDP_SCRIPT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_applied"] == ranks[1]["num_applied"] == 4
    assert ranks[0]["gap"] < 1e-6 and ranks[1]["gap"] < 1e-6  # each rank: the float64 reference
    assert ranks[0]["averages"] == ranks[1]["averages"]  # equal across ranks, exactly


def run_lightning_script(folder: Path, name: str, source: str) -> None:
    """``source`` run as ``folder/name`` on Lightning's own launcher (it starts rank 1 by running the script
    again, so no fork), on a free port; its output goes to ``folder``."""
    script = folder / name
    script.write_text(source)
    env = {**os.environ, "PL_DISABLE_FORK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run(
        [sys.executable, str(script), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lightning_ema_run(folder: Path) -> list[dict[str, torch.Tensor]]:
    """Three epochs' .ckpt files of a run with the callback; the averaged models they hold, in order."""
    fit(ckpt_trainer(folder, [EMACallback(decay=DECAY)], max_epochs=3), model())
    paths = [folder / f"epoch={e}-step={8 * (e + 1)}.ckpt" for e in range(3)]
    return [torch.load(p, weights_only=True)[EMA_KEY] for p in paths]


def command_average(run: Path, out: Path, *flags: str) -> Ran:
    return run_cli(run, *flags, "--decay", "0.5", "-o", out)


def assert_averages_the_ema_copies(out: Path, states: list[dict[str, torch.Tensor]]) -> None:
    expected = float64_reference(states, [8, 16, 24], 0.5)
    got = load_file(str(out))
    assert set(expected) == {name for name, t in got.items() if t.is_floating_point()}
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-6, atol=1e-7)
    assert torch.equal(
        got["net.1.num_batches_tracked"], states[-1]["net.1.num_batches_tracked"]
    )  # the latest


@pytest.mark.subprocess
def test_the_command_names_and_averages_the_ema_in_lightning_ckpts(tmp_path: Path) -> None:
    states = lightning_ema_run(tmp_path / "run")
    plan = run_cli(tmp_path / "run", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "read state_dict; also here: ema (--state-dict-key ema)" in plan.stdout
    done = command_average(tmp_path / "run", tmp_path / "out.safetensors", "--state-dict-key", "ema")
    assert done.returncode == 0, done.stderr
    assert_averages_the_ema_copies(tmp_path / "out.safetensors", states)


@pytest.mark.subprocess
def test_submodel_ema_reads_the_ema_in_lightning_ckpts(tmp_path: Path) -> None:
    states = lightning_ema_run(tmp_path / "run")
    done = command_average(tmp_path / "run", tmp_path / "out.safetensors", "--submodel", "ema")
    assert done.returncode == 0, done.stderr
    assert "in each checkpoint: read ema" in done.stdout
    assert_averages_the_ema_copies(tmp_path / "out.safetensors", states)


FSDP1_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from ema_average.errors import ConfigurationError
    from ema_average.online import EmaTracker

    dist.init_process_group("gloo", rank=0, world_size=1)
    flat = FullyShardedDataParallel(torch.nn.Linear(4, 1), device_id=torch.device("cpu"))
    try:
        EmaTracker(0.9, 1.0, 10.0, device=None, every=1, evaluate="ema").start(flat, 0, training=True)
        print("averaged")
    except ConfigurationError as exc:
        print(exc)
    dist.destroy_process_group()
    """
)


@pytest.mark.subprocess
def test_fsdp_flat_parameters_are_refused_at_start_with_one_line(tmp_path: Path) -> None:
    """FSDP's (the first's) flat parameters, on a real one-rank gloo group."""
    script = tmp_path / "fsdp1.py"
    script.write_text(FSDP1_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "the model is wrapped in FSDP (FullyShardedDataParallel), whose flat parameters are not the model's: "
        "the EMA callbacks cannot average them; use FSDP2 (fully_shard) under Lightning, DDP, or "
        "ExponentialMovingAverage(model) in the loop",
    ]


FSDP2_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path
    import torch
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from ema_average.online.lightning import EMACallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        def configure_model(self):
            # the root owns net.2 (FSDP2 keeps a root's gathered weights after a forward)
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self, mesh=mesh)
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def whole(named):
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double().clone() for n, t in named}

    class Recorder(L.Callback):
        # whole weights at the start and after each optimizer step (gathered); the whole EMA of each save
        def __init__(self):
            self.steps, self.weights, self.saved = [], [], {}
        def on_train_start(self, trainer, module):
            self.steps.append(trainer.global_step)
            self.weights.append(whole(module.named_parameters()))
        def on_train_batch_end(self, trainer, module, *args):
            self.steps.append(trainer.global_step)
            self.weights.append(whole(module.named_parameters()))
        def on_save_checkpoint(self, trainer, module, checkpoint):
            if "ema" in checkpoint:
                self.saved[trainer.global_step] = whole(checkpoint["ema"].items())

    def fit(folder, callbacks, max_epochs, ckpt_path=None, validate=True, sharded_save=True):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        train = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
        val = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}-{step}")
        trainer = L.Trainer(
            strategy=ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded_save
            ),
            accelerator="cpu",
            devices=2, max_epochs=max_epochs, callbacks=[*callbacks, saver], logger=False, deterministic=True,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=1.0 if validate else 0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(
                Tiny(), torch.utils.data.DataLoader(train, batch_size=2),
                torch.utils.data.DataLoader(val, batch_size=4), ckpt_path=ckpt_path,
            )
        return trainer

    if __name__ == "__main__":
        out = Path(sys.argv[1])
        ema, recorder, plain = EMACallback(decay=0.9), Recorder(), Recorder()
        trainer = fit(out / "whole", [ema, recorder], max_epochs=2)  # validation on the EMA after each epoch
        fit(out / "plain", [plain], max_epochs=2, validate=False)  # no callback, no validation
        fit(out / "parts", [EMACallback(decay=0.9)], max_epochs=1)
        resumed = EMACallback(decay=0.9)
        fit(out / "parts", [resumed], max_epochs=2, ckpt_path=str(out / "parts" / "epoch=0-step=4.ckpt"))
        fit(out / "full", [EMACallback(decay=0.9)], max_epochs=1, sharded_save=False)  # one .ckpt file
        from_full = EMACallback(decay=0.9)
        fit(out / "full", [from_full], max_epochs=2, ckpt_path=str(out / "full" / "epoch=0-step=4.ckpt"))
        shards = {n: t.to_local().clone() for n, t in ema.moving_average.averages().items()}
        torch.save(
            {
                "steps": recorder.steps,
                "weights": recorder.weights,
                "plain": plain.weights,
                "saved": recorder.saved,
                "num_applied": [ema.moving_average.num_applied, resumed.moving_average.num_applied],
                "shards": shards,
                "resumed_shards": {n: t.to_local().clone() for n, t in resumed.moving_average.averages().items()},
                "from_full_shards": {n: t.to_local().clone() for n, t in from_full.moving_average.averages().items()},
                "whole": whole(ema.moving_average.averages().items()),
                "val_loss": float(trainer.callback_metrics["val_loss"]),
            },
            out / f"rank{trainer.global_rank}.pt",
        )
    """
)


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Lightning's ModelParallelStrategy (fully_shard in configure_model) on two gloo CPU ranks: a run with
    the callback (validating each epoch), the same without it, and one stopped after epoch 0 and resumed."""
    folder = tmp_path_factory.mktemp("fsdp2")
    run_lightning_script(folder, "fsdp2_ema.py", FSDP2_SCRIPT)
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_keeps_shard_local_averages_equal_to_a_float64_reference(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, ranks = fsdp2_runs
    record = ranks[0]
    assert record["steps"] == list(range(9))
    shadow = dict(record["weights"][0])
    for step, weights in zip(record["steps"][1:], record["weights"][1:], strict=True):
        d = min(DECAY, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
    assert_close_to(record["whole"], shadow)
    # each rank holds its own rows alone (FSDP2 shards dim 0: 8 rows are 4 and 4, 1 row is 1 and 0)
    assert [tuple(r["shards"]["net.0.weight"].shape) for r in ranks] == [(4, 4), (4, 4)]
    assert [tuple(r["shards"]["net.2.weight"].shape) for r in ranks] == [(1, 8), (0, 8)]
    assert torch.equal(
        torch.cat([r["shards"]["net.0.weight"] for r in ranks]).double(), record["whole"]["net.0.weight"]
    )


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_validation_sees_the_averages_and_training_goes_on_from_the_raw_weights(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The weights after every step equal, bit for bit, those of a run without the callback or validation:
    the swaps put the training shards back, and FSDP2's gathered copies of the averages are dropped."""
    _, ranks = fsdp2_runs
    record = ranks[0]
    for with_ema, without in zip(record["weights"], record["plain"], strict=True):
        for name in without:
            assert torch.equal(with_ema[name], without[name]), name
    g = torch.Generator().manual_seed(1)
    torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)  # the training data, drawn first
    x, y = torch.randn(8, 4, generator=g).double(), torch.randn(8, 1, generator=g).double()

    def loss(weights: dict[str, torch.Tensor]) -> float:
        hidden = torch.tanh(x @ weights["net.0.weight"].T + weights["net.0.bias"])
        return float(
            torch.nn.functional.mse_loss(hidden @ weights["net.2.weight"].T + weights["net.2.bias"], y)
        )

    assert record["val_loss"] == pytest.approx(loss(record["whole"]), rel=1e-5)
    assert abs(loss(record["whole"]) - loss(record["weights"][-1])) > 1e-3  # the two are told apart


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_stop_and_resume_gives_the_uninterrupted_shards_bit_for_bit(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Resumed from the strategy's DCP folder, and from the one file it writes with
    save_distributed_checkpoint=False (the whole averages, each rank keeping its shard)."""
    folder, ranks = fsdp2_runs
    assert (folder / "parts" / "epoch=0-step=4.ckpt" / ".metadata").is_file()  # a DCP folder, as saved
    assert (folder / "full" / "epoch=0-step=4.ckpt").is_file()
    for record in ranks:
        assert record["num_applied"] == [8, 8]
        for name, shard in record["shards"].items():
            assert torch.equal(record["resumed_shards"][name], shard), name
            assert torch.equal(record["from_full_shards"][name], shard), name


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_with_save_distributed_checkpoint_false_the_ckpt_holds_the_gathered_averages(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]],
) -> None:
    folder, ranks = fsdp2_runs
    saved = torch.load(folder / "full" / "epoch=0-step=4.ckpt", weights_only=True)[EMA_KEY]
    expected = ranks[0]["saved"][4]  # the whole run's, gathered by the run itself at the same step
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert not hasattr(saved[name], "full_tensor"), name  # a plain tensor, loadable anywhere
        assert torch.equal(saved[name].double(), tensor), name


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_dcp_folder_holds_the_averages_the_command_reads(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The strategy's DCP folder holds the averages under the top-level key ema, beside state_dict:
    ``--state-dict-key ema`` averages them."""
    from torch.distributed.checkpoint import FileSystemReader

    folder, ranks = fsdp2_runs
    metadata = FileSystemReader(str(folder / "whole" / "epoch=1-step=8.ckpt")).read_metadata()
    files = {(tuple(i.offset), metadata.storage_data[i].relative_path) for i in metadata.storage_data if i.fqn == "ema.net.0.weight"}  # fmt: skip
    assert files == {((0, 0), "__0_0.distcp"), ((4, 0), "__1_0.distcp")}  # each rank wrote its own rows
    assert_command_reads_the_averages(
        folder / "whole", ranks[0]["saved"], tmp_path, "--state-dict-key", "ema"
    )


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_fsdp2_submodel_ema_reads_the_averages_in_the_dcp_folders(
    fsdp2_runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    folder, ranks = fsdp2_runs
    assert_command_reads_the_averages(folder / "whole", ranks[0]["saved"], tmp_path, "--submodel", "ema")


def assert_command_reads_the_averages(
    run: Path, saved: dict[int, dict[str, torch.Tensor]], tmp_path: Path, *flags: str
) -> None:
    """``ema-average RUN FLAGS`` over the FSDP2 run's two saves equals the float64 reference of the whole
    EMAs the run gathered at each save (``saved``)."""
    done = command_average(run, tmp_path / "out.safetensors", *flags)
    assert done.returncode == 0, done.stderr
    expected = float64_reference([saved[4], saved[8]], [4, 8], 0.5)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-6, atol=1e-7)


def test_validate_with_ckpt_path_evaluates_the_ema_saved_in_it(tmp_path: Path) -> None:
    fit(ckpt_trainer(tmp_path, [EMACallback(decay=DECAY)], max_epochs=1), model())
    ckpt = tmp_path / "epoch=0-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    net = model(seed=4)
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer([EMACallback(decay=DECAY)], limit_val_batches=1.0)
        metrics = t.validate(net, val, ckpt_path=str(ckpt), verbose=False)[0]
    for name, p in net.named_parameters():
        assert torch.equal(p, saved["state_dict"][name]), name  # the raw weights, put back
    averaged = {name: saved[EMA_KEY][name] for name, _ in [*net.named_parameters(), *net.named_buffers()]}
    assert metrics["val_loss"] == pytest.approx(val_loss_of(averaged, net), rel=1e-5)
    assert abs(metrics["val_loss"] - val_loss_of(dict(net.named_parameters()), net)) > 1e-3


def test_a_callback_used_for_an_earlier_fit_starts_afresh_with_a_new_trainer() -> None:
    ema, net = EMACallback(decay=DECAY), model()
    fit(trainer([ema], max_steps=6), net)
    recorder = Recorder()
    fit(trainer([recorder, ema], max_steps=6), net)  # global step back at 0: another run
    assert recorder.steps == list(range(7))
    assert ema.moving_average is not None and ema.moving_average.num_applied == 6
    assert_close_to(ema.moving_average.averages(), reference(recorder))


def test_validate_with_a_new_trainer_after_fit_sees_the_fitted_average() -> None:
    ema, net = EMACallback(decay=DECAY), model()
    fit(trainer([ema], max_steps=10), net)
    assert ema.moving_average is not None
    averages = {n: t.clone() for n, t in ema.moving_average.averages().items()}
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer([ema], limit_val_batches=1.0).validate(net, val, verbose=False)[0]  # step 0 here
    assert metrics["val_loss"] == pytest.approx(val_loss_of(averages, net), rel=1e-5)


def test_frozen_parameters_are_saved_as_they_are_and_hold_no_average(tmp_path: Path) -> None:
    """A frozen layer's average would be itself: no float32 copy of it is kept, the .ckpt has its values."""
    net, ema, recorder = model(), EMACallback(decay=DECAY), Recorder()
    net.net[0].requires_grad_(False)
    fit(ckpt_trainer(tmp_path, [recorder, ema], max_epochs=1), net)
    assert ema.moving_average is not None
    averages = ema.moving_average.averages()
    assert set(averages) == {"net.1.weight", "net.1.bias", "net.2.weight", "net.2.bias"} | {
        "net.1.running_mean",
        "net.1.running_var",
    }
    expected = reference(recorder)
    assert_close_to(averages, {n: expected[n] for n in averages})
    saved = torch.load(tmp_path / "epoch=0-step=8.ckpt", weights_only=True)[EMA_KEY]
    assert torch.equal(saved["net.0.weight"], net.net[0].weight)
    assert torch.equal(saved["net.2.weight"], averages["net.2.weight"])


@pytest.mark.parametrize(("key", "value"), [("num_applied", 2.7), ("last_step", 2.7), ("last_step", -1)])
def test_a_saved_counter_that_is_no_whole_number_is_refused_not_truncated(key: str, value: object) -> None:
    from ema_average.errors import AverageStateError
    from ema_average.online import EmaTracker

    model = torch.nn.Linear(3, 2)
    settings = {
        "decay": 0.9,
        "numerator": 1.0,
        "denominator": 10.0,
        "device": None,
        "every": 1,
        "evaluate": "ema",
    }
    tracker, saved = EmaTracker(**settings), EmaTracker(**settings)
    saved.start(model, 0, training=True)
    saved.step(3)
    state = {**saved.state(), key: value}
    with pytest.raises(AverageStateError, match=rf"epoch=0-step=3\.ckpt: .*{key}"):  # when read, or loaded
        tracker.load(state, dict(saved.average.averages()), "epoch=0-step=3.ckpt")
        tracker.start(model, 3, training=True)
