"""The tiny model and noisy data the examples share (importable because examples run as scripts)."""

from __future__ import annotations

import torch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.3 * torch.randn(n, 1, generator=g)  # noisy target
    return x, y


def test_loss(model: torch.nn.Module) -> float:
    x, y = make_data(2000, seed=1)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = make_data(32, seed=100 + step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
