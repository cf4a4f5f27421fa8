"""Train a tiny model with an online EMA of its weights, then evaluate both.

    python examples/train_with_ema.py [--steps 2000]

The EMA is evaluated by swapping the averages into the model for the ``with`` block only.
"""

from __future__ import annotations

import argparse

import torch
from tiny_regression import make_model, test_loss, train_step

from ema_average import ExponentialMovingAverage


def main(steps: int = 2000, decay: float = 0.995) -> dict[str, float]:
    model = make_model()
    ema = ExponentialMovingAverage(model.named_parameters(), decay=decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    initial = test_loss(model)
    for step in range(1, steps + 1):
        train_step(model, optimizer, step)
        ema.apply(num_updates=step)
    raw = test_loss(model)
    with ema.average_parameters():
        averaged = test_loss(model)
    return {"initial": initial, "raw": raw, "ema": averaged}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    losses = main(args.steps)
    print(f"test loss at start             {losses['initial']:.4f}")
    print(f"test loss of the trained model {losses['raw']:.4f}")
    print(f"test loss of its EMA           {losses['ema']:.4f}")
