"""``EMACallback(average_dtype=torch.bfloat16)`` with the real Lightning trainer: the averages are bfloat16 and
stay within the stochastic-rounding bound of the float32 EMA of the same run (the bound is derived in
test_bf16_average.py: mean error within a few ``sqrt(B / N)`` of 0, mean square error below ``B``), and a
resume from the ``.ckpt`` continues them bit for bit (the rounding bits follow the update count)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning")

from ema_average.online.lightning import EMACallback  # noqa: E402
from test_integrations_lightning import ckpt_trainer, fit, model, trainer  # noqa: E402

DECAY, STEPS = 0.95, 24


class Wide(L.LightningModule):
    """About 2,200 weights: enough elements for the mean error to be measured against its bound."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y.expand(-1, 4))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Shadows(L.Callback):
    """The weights and the callback's averages after each optimizer step (listed after the EMA callback)."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.weights: list[torch.Tensor] = []
        self.shadows: list[torch.Tensor] = []

    def _record(self, module: L.LightningModule) -> None:
        assert self.ema.moving_average is not None
        self.weights.append(torch.cat([p.detach().double().reshape(-1) for p in module.parameters()]))
        averages = self.ema.moving_average.averages()
        names = [n for n, _ in module.named_parameters()]
        self.shadows.append(torch.cat([averages[n].double().reshape(-1) for n in names]))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._record(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._record(module)


def _run(**options: Any) -> Shadows:
    torch.manual_seed(0)
    ema = EMACallback(decay=DECAY, **options)
    shadows = Shadows(ema)
    fit(trainer([ema, shadows], max_steps=STEPS), Wide())
    return shadows


def test_bf16_ema_stays_within_the_stochastic_rounding_bound_of_the_float32_one() -> None:
    narrow, wide = _run(average_dtype=torch.bfloat16), _run()
    assert narrow.ema.moving_average is not None
    assert {t.dtype for t in narrow.ema.moving_average.averages().values()} == {torch.bfloat16}
    for a, b in zip(narrow.weights, wide.weights, strict=True):
        assert torch.equal(a, b)  # the same training: the EMA's dtype does not touch it
    bound = torch.zeros_like(wide.shadows[0])
    for step in range(1, STEPS + 1):
        d = min(DECAY, (1 + step) / (10 + step))  # the callback's rule at global step ``step``
        s, v = narrow.shadows[step - 1], narrow.weights[step]
        x = s + (1 - d) * (v - s)
        ulp = torch.exp2(torch.floor(torch.log2(x.abs())) - 7)
        bound = d**2 * bound + ulp * (1 - d) * (v - s).abs()
    error = narrow.shadows[-1] - wide.shadows[-1]
    n = error.numel()
    assert error.abs().max() > 0  # bfloat16, not float32 relabelled
    assert error.mean().abs() <= 5 * (bound.mean() / n).sqrt()
    assert error.pow(2).mean() <= 1.1 * bound.mean()


@pytest.mark.slow
def test_stop_and_resume_gives_the_uninterrupted_bf16_ema_bit_for_bit(tmp_path: Path) -> None:
    bf16 = torch.bfloat16
    whole = EMACallback(decay=0.9, average_dtype=bf16)
    fit(ckpt_trainer(tmp_path / "whole", [whole], max_epochs=4), model())
    fit(ckpt_trainer(tmp_path / "parts", [EMACallback(decay=0.9, average_dtype=bf16)], max_epochs=2), model())
    resumed = EMACallback(decay=0.9, average_dtype=bf16)
    stopped = tmp_path / "parts" / "epoch=1-step=16.ckpt"
    fit(ckpt_trainer(tmp_path / "parts", [resumed], max_epochs=4), model(seed=5), ckpt_path=str(stopped))
    assert whole.moving_average is not None and resumed.moving_average is not None
    assert resumed.moving_average.num_applied == whole.moving_average.num_applied == 32
    for name, tensor in whole.moving_average.averages().items():
        assert tensor.dtype == bf16 and torch.equal(resumed.moving_average.averages()[name], tensor), name
