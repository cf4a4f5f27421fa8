"""Train a tiny model with Lightning and the EMA callback; validate the EMA and the raw weights together.

    python examples/train_lightning_ema.py [--steps 1500] [--out ckpts/]

``EMACallback(evaluate="both")`` swaps the averages in for validation (``val_loss``) and also logs the
training weights' loss (``val_loss_raw``). With ``--out``, each epoch's ``.ckpt`` holds the averaged model
under ``ema``: ``ema-average ckpts/ --state-dict-key ema`` averages those copies afterwards.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning as L
import torch
from tiny_regression import make_data, make_model

from ema_average.online.lightning import EMACallback


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(steps: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Noisy training batches of 32 (one epoch of ``steps`` steps), and one clean-ish validation batch."""
    x, y = make_data(32 * steps, seed=100)
    vx, vy = make_data(2000, seed=1)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(vx, vy), batch_size=2000)
    return train, val


def main(steps: int = 1500, decay: float = 0.995, out: Path | None = None) -> dict[str, float]:
    ema = EMACallback(decay=decay, evaluate="both")
    callbacks: list[L.Callback] = [ema]
    if out is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=steps // 4, save_top_k=-1)
        )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=out is not None,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    train, val = loaders(steps)
    module = Regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, train)
        metrics = L.Trainer(
            callbacks=[ema], accelerator="cpu", logger=False, enable_progress_bar=False
        ).validate(module, val, verbose=False)[0]
    return {"raw": metrics["val_loss_raw"], "ema": metrics["val_loss"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    losses = main(args.steps, out=args.out)
    print(f"validation loss of the trained model {losses['raw']:.4f}")
    print(f"validation loss of its EMA           {losses['ema']:.4f}")
