"""Train a tiny model with an online EMA of its weights, then evaluate both.

    python examples/train_with_ema.py [--steps 2000]

The EMA is evaluated by swapping the averages into the model for the ``with`` block only.
"""

from __future__ import annotations

import argparse

import torch

from ema_average import ExponentialMovingAverage


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.3 * torch.randn(n, 1, generator=g)  # noisy target
    return x, y


def main(steps: int = 2000, decay: float = 0.995) -> dict[str, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ema = ExponentialMovingAverage(model.named_parameters(), decay=decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_test, y_test = make_data(2000, seed=1)

    def test_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_test), y_test).item()

    initial = test_loss()
    for step in range(1, steps + 1):
        x, y = make_data(32, seed=100 + step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.apply(num_updates=step)

    raw = test_loss()
    with ema.average_parameters():
        averaged = test_loss()
    return {"initial": initial, "raw": raw, "ema": averaged}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    losses = main(args.steps)
    print(f"test loss at start            {losses['initial']:.4f}")
    print(f"test loss of the trained model {losses['raw']:.4f}")
    print(f"test loss of its EMA           {losses['ema']:.4f}")
