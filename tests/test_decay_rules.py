"""Decay rules: closed forms against plain float64 loops, and the engine applying them online."""

from __future__ import annotations

import math

import pytest
import torch

from ema_average import ExponentialMovingAverage, MovingAverage
from ema_average.decay_rules import (
    ExponentialRule,
    PowerRule,
    UniformRule,
    gamma_to_sigma_rel,
    half_life_to_decay,
    sigma_rel_to_gamma,
)
from ema_average.errors import ConfigurationError


def loop_product(rule: ExponentialRule | PowerRule, a: int, b: int) -> float:
    product = 1.0
    for k in range(a + 1, b + 1):
        product *= rule.at(k, 0)
    return product


@pytest.mark.parametrize(
    ("rule", "a", "b"),
    [
        (ExponentialRule(0.9999), 0, 1),
        (ExponentialRule(0.9999), 100, 1100),  # all warm-up
        (ExponentialRule(0.999), 8000, 12000),  # crosses the step where the warm-up reaches 0.999
        (ExponentialRule(0.99), 5000, 9000),  # all flat
        (ExponentialRule(0.9999, 3.0, 7.0), 17, 250_000),
        (ExponentialRule(1.0), 10, 5000),
        (ExponentialRule(0.0), 10, 20),
        (PowerRule(6.94), 0, 10),
        (PowerRule(16.97), 1000, 3000),
    ],
)
def test_between_equals_the_per_step_product(rule: ExponentialRule | PowerRule, a: int, b: int) -> None:
    assert rule.between(a, b) == pytest.approx(loop_product(rule, a, b), rel=1e-10, abs=1e-300)


def test_between_over_millions_of_steps_without_a_loop() -> None:
    rule = ExponentialRule(0.999999)  # warm-up lasts ~9 million steps
    product = rule.between(0, 20_000_000)
    # split at a point and multiply: the product of the parts is the whole
    assert product == pytest.approx(
        rule.between(0, 7_000_000) * rule.between(7_000_000, 20_000_000), rel=1e-12
    )
    assert product == pytest.approx(
        loop_product(rule, 19_000_000, 20_000_000) * rule.between(0, 19_000_000), rel=1e-9
    )


def test_one_gap_update_equals_b_minus_a_engine_updates() -> None:
    """The step schedule's single update == calling the engine once per step with the same weights."""
    start = {"w": torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    value = {"w": torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}
    a, b = 40, 1600
    stepwise = ExponentialMovingAverage.from_tensors(start, decay=0.999)
    for k in range(a + 1, b + 1):
        stepwise.update(value, num_updates=k)
    once = ExponentialMovingAverage.from_tensors(start, decay=0.999)
    once.update_with_decay(value, ExponentialRule(0.999).between(a, b))
    torch.testing.assert_close(once.averages()["w"], stepwise.averages()["w"], rtol=1e-12, atol=1e-12)


def test_sigma_rel_and_gamma() -> None:
    # EDM2's pairs: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(0.07)) == pytest.approx(0.07, rel=1e-9)


def test_half_life() -> None:
    assert half_life_to_decay(10) ** 10 == pytest.approx(0.5)
    with pytest.raises(ConfigurationError):
        half_life_to_decay(0)


def test_uniform_has_no_step_schedule() -> None:
    with pytest.raises(ConfigurationError, match="equally"):
        UniformRule().between(1, 2)


def test_uniform_average_online_is_the_mean() -> None:
    values = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    average = MovingAverage.by_name("uniform").from_tensors({"w": values[0]})
    for v in values[1:]:
        average.update({"w": v})
    torch.testing.assert_close(average.averages()["w"].double(), torch.stack(values).double().mean(0))


def test_power_average_online_matches_float64() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    ema = MovingAverage.by_name("power")([("p", p)], gamma=6.94)
    ref = p.detach().double().clone()
    for t in range(1, 200):
        with torch.no_grad():
            p.add_(0.1 * torch.randn(4))
        ema.apply(num_updates=t)
        d = 0.0 if t <= 1 else (1 - 1 / t) ** 7.94
        ref = d * ref + (1 - d) * p.detach().double()
    torch.testing.assert_close(ema.averages()["p"].double(), ref, rtol=1e-5, atol=1e-6)
    assert math.isclose(ema.settings()["gamma"], 6.94)


def test_registered_methods() -> None:
    assert MovingAverage.list_available() == ["exponential", "power", "uniform"]


def test_power_average_takes_gamma_or_sigma_rel_not_both() -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        MovingAverage.by_name("power")({"w": torch.zeros(1)}, gamma=5.0, sigma_rel=0.1)
    by_sigma = MovingAverage.by_name("power")({"w": torch.zeros(1)}, sigma_rel=0.1)
    assert by_sigma.settings()["gamma"] == pytest.approx(sigma_rel_to_gamma(0.1))
