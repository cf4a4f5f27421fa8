"""Decay rules: closed forms against plain float64 loops, and the engine applying them online."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch

from ema_average import ExponentialMovingAverage, MovingAverage
from ema_average.engine.decay_rules import (
    DecayRule,
    ExponentialRule,
    PowerRule,
    UniformRule,
    check_unit,
    gamma_to_sigma_rel,
    half_life_to_decay,
    sigma_rel_to_gamma,
)
from ema_average.errors import ConfigurationError
from helpers import bounded_python_work


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


@pytest.mark.parametrize(
    "rule", [ExponentialRule(0.9), ExponentialRule(0.999), ExponentialRule(0.9999, 3.0, 7.0), PowerRule(6.94)]
)
def test_one_step_gap_is_the_online_decay_to_the_bit(rule: ExponentialRule | PowerRule) -> None:
    """Over one step the gap-aware decay is the float ``apply(num_updates=k)`` uses, not a closed form a
    rounding away (steps 3, 4, 9, 10 of decay 0.9 differed): per-step checkpoints then give the online EMA."""
    differ = [k for k in range(1, 5000) if rule.between(k - 1, k) != rule.at(k, k)]
    assert differ == []


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


def log_loop(rule: ExponentialRule, a: int, b: int) -> float:
    """The per-step float64 reference: one log per step, summed exactly."""
    return math.fsum(step_log(rule, k) for k in range(a + 1, b + 1))


def step_log(rule: ExponentialRule, k: int) -> float:
    """log of step k's decay to an ulp or so: log1p when the ratio is near 1, where log would lose digits."""
    n, d = rule.numerator, rule.denominator
    ratio = (n + k) / (d + k)
    if ratio >= rule.decay:
        return math.log(rule.decay)
    return math.log(ratio) if ratio < 0.5 else math.log1p(-(d - n) / (d + k))


@pytest.mark.parametrize(
    ("rule", "a", "b"),
    [
        (ExponentialRule(0.9999), 0, 250_000),  # warm-up ends at ~90K, past the term-by-term head
        (ExponentialRule(0.99999, 0.5, 2.25), 4000, 200_000),  # head, tail, and the end of warm-up at ~175K
        (ExponentialRule(0.999, 3.0, 7.0), 17, 250_000),  # warm-up ends inside the head
        (ExponentialRule(1.0), 4095, 4097),  # one step each side of the head/tail split
        (ExponentialRule(1.0, 9.5, 10.0), 0, 250_000),
        (ExponentialRule(1.0, 0.0, 1000.0), 10**6, 10**6 + 100_000),  # large gap - numerator, tail only
        (ExponentialRule(1.0), 10**12, 10**12 + 100_000),  # far out: a tiny log, in the tail only
    ],
)
def test_between_equals_an_exact_float64_log_sum(rule: ExponentialRule, a: int, b: int) -> None:
    assert rule.between(a, b) == pytest.approx(math.exp(log_loop(rule, a, b)), rel=1e-12, abs=0)


_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
_BERNOULLI = [Fraction(1, 6), Fraction(-1, 30), Fraction(1, 42), Fraction(-1, 30), Fraction(5, 66)]
_BERNOULLI += [Fraction(-691, 2730), Fraction(7, 6), Fraction(-3617, 510), Fraction(43867, 798)]


def ln_gamma(x: Decimal) -> Decimal:
    """log Gamma(x), x > 0, to ~1e-50 at 60 digits: shift x past 1000, then 9 terms of Stirling's series."""
    shift = Decimal(1)
    while x < 1000:
        shift *= x
        x += 1
    series = (x - Decimal("0.5")) * x.ln() - x + (2 * _PI).ln() / 2
    for j, b in enumerate(_BERNOULLI, start=1):
        series += Decimal(b.numerator) / (b.denominator * 2 * j * (2 * j - 1) * x ** (2 * j - 1))
    return series - shift.ln()


def reference_log(rule: ExponentialRule, a: int, b: int) -> Decimal:
    """log of the product over k in (a, b] in 60-digit decimals, from the exact end of warm-up and log Gamma."""
    last_warm = b
    if rule.decay < 1:
        decay = Fraction(rule.decay)
        first_flat = math.ceil((decay * Fraction(rule.denominator) - Fraction(rule.numerator)) / (1 - decay))
        last_warm = min(b, max(a, first_flat - 1))
    with localcontext() as context:
        context.prec = 60
        n, d = Decimal(rule.numerator), Decimal(rule.denominator)
        log = (
            ln_gamma(n + last_warm + 1)
            - ln_gamma(n + a + 1)
            - ln_gamma(d + last_warm + 1)
            + ln_gamma(d + a + 1)
        )
        return log + (b - last_warm) * Decimal(rule.decay).ln() if b > last_warm else log


def test_high_precision_reference_is_exact_on_a_short_gap() -> None:
    rule = ExponentialRule(0.9999, 0.5, 10.25)  # warm-up through the whole gap
    exact = math.prod(Fraction(rule.numerator + k) / Fraction(rule.denominator + k) for k in range(3, 2001))
    with localcontext() as context:
        context.prec = 60
        error = reference_log(rule, 2, 2000) - (
            Decimal(exact.numerator).ln() - Decimal(exact.denominator).ln()
        )
    assert abs(error) < Decimal("1e-45")


def test_high_precision_reference_agrees_with_mpmath() -> None:
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50), localcontext() as context:
        context.prec = 60
        for x in ("1.5", "11", "123456.25", "1e11", "9223372036854775808"):
            error = mpmath.mpf(str(ln_gamma(Decimal(x)))) - mpmath.loggamma(mpmath.mpf(x))
            assert abs(error) < mpmath.mpf("1e-35")


# Measured worst relative error over these and ~1200 random settings and gaps: 9e-14, about one ulp of
# the log (-637 there); the method's bound is a few ulps of |log| (< 3e-13 while the product is a normal
# float) plus Euler-Maclaurin's 7e-22. 1e-12 leaves room for other libms.
@pytest.mark.parametrize(
    ("rule", "a", "b"),
    [
        (ExponentialRule(0.9999999999), 1, 10**11),  # warm-up ends at ~9e10
        (ExponentialRule(1.0), 1, 10**11),
        (ExponentialRule(1.0), 10**9, 10**15),
        (ExponentialRule(0.99999999999999), 10**9, 10**15),  # warm-up ends at ~9e14
        (ExponentialRule(0.999), 10**9, 10**15),  # all flat: underflows to exactly 0
        (ExponentialRule(1.0, 0.0, 1.0), 0, 2**63 - 1),  # telescopes to 1 / 2**63
        (ExponentialRule(1.0), 0, 2**63 - 1),
        (ExponentialRule(1.0, 3.0, 7.0), 1, 10**11),
        (ExponentialRule(1.0, 0.5, 2.25), 12_345, 10**12 + 7),
        (ExponentialRule(1.0, 95.0, 100.0), 1, 10**11),
        (ExponentialRule(1.0, 0.0, 1e12), 10**15, 10**15 + 10**5),
        (ExponentialRule(1.0, 0.0, 1e12), 10**15, 10**15 + 3),
    ],
)
def test_between_over_huge_gaps_matches_high_precision(rule: ExponentialRule, a: int, b: int) -> None:
    with localcontext() as context:
        context.prec = 60
        expected = float(reference_log(rule, a, b).exp())
    assert rule.between(a, b) == pytest.approx(expected, rel=1e-12, abs=0)


def test_between_takes_constant_time_for_any_gap() -> None:
    """A few hundred lines of Python whatever the gap: a loop over 1e11 steps would fail the bound at once."""
    for rule, a, b in [
        (ExponentialRule(0.9999999999), 1, 10**11),
        (ExponentialRule(1.0), 1, 10**11),
        (ExponentialRule(1.0), 0, 2**63 - 1),
        (ExponentialRule(math.nextafter(1.0, 0.0), 0.0, 1.7e308), 0, 2**63 - 1),
    ]:
        with bounded_python_work(5_000):
            rule.between(a, b)


@pytest.mark.parametrize(
    "rule",
    [
        ExponentialRule(math.nextafter(1.0, 0.0)),  # warm-up lasts ~8e16 steps
        ExponentialRule(math.nextafter(1.0, 0.0), 0.0, 1.7e308),  # ... and ~1e324: past any int64 step
        ExponentialRule(1.0, 0.0, 1.7e308),
        ExponentialRule(1.0, 1e307, 1.7e308),
        ExponentialRule(1.0, 0.0, 5e-324),
        ExponentialRule(0.5, 1.7e308, 1.7e308),
    ],
)
def test_between_survives_extreme_settings(rule: ExponentialRule) -> None:
    """No overflow, NaN or search near float limits; short gaps still match the per-step loop."""
    top = 2**63 - 1
    for a, b in [(0, 3), (4095, 4097), (top - 2, top)]:
        assert rule.between(a, b) == pytest.approx(math.exp(log_loop(rule, a, b)), rel=1e-12, abs=1e-300)
    for a, b in [(0, top), (top // 2, top), (5000, 10**15)]:
        assert 0.0 <= rule.between(a, b) <= 1.0


def test_between_refuses_steps_beyond_int64() -> None:
    with pytest.raises(ConfigurationError, match="steps must increase"):
        ExponentialRule().between(0, 2**63)
    with pytest.raises(ConfigurationError, match="steps must increase"):
        PowerRule(6.94).between(5, 5)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: ExponentialRule(0.99, 1.0, math.inf), "--denominator"),
        (lambda: ExponentialRule(0.99, 1.0, math.nan), "--denominator"),
        (lambda: ExponentialRule(0.99, math.inf, math.inf), "--numerator"),
        (lambda: ExponentialRule(0.99, math.nan, 10.0), "--numerator"),
        (lambda: ExponentialRule(math.nan), "--decay"),
        (lambda: ExponentialRule(True), "--decay"),
        (lambda: PowerRule(math.inf), "--gamma"),
        (lambda: PowerRule(math.nan), "--gamma"),
        (lambda: PowerRule(-1.0), "--gamma"),
        (lambda: half_life_to_decay(math.inf), "--half-life"),
        (lambda: half_life_to_decay(math.nan), "--half-life"),
        (lambda: half_life_to_decay(-3.0), "--half-life"),
    ],
)
def test_non_finite_settings_are_refused(make: Callable[[], object], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option} ") as raised:
        make()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, False, 10**400, "0.5", -1e-300])
def test_check_unit_refuses_nan_infinities_and_bools(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^--decay must be a number in \[0, 1\]"):
        check_unit("decay", value)  # type: ignore[arg-type]
    check_unit("decay", 0.5)
    check_unit("decay", 1)


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
    with pytest.raises(ConfigurationError, match="--half-life"):
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


# --- each rule's settings, declared as data (issue 20) -----------------------------------------------------


@pytest.mark.parametrize("rule", [ExponentialRule, UniformRule, PowerRule])
def test_built_in_rules_declare_their_settings_and_defaults(rule: type[DecayRule]) -> None:
    # Every declared setting is a field of the rule or an alternative to one, and a declared default is the
    # field's own: the table the command line and the plan read is the rule's truth.
    fields = {f.name: f.default for f in dataclasses.fields(rule)}
    for setting in rule.declared():
        target = setting.instead_of or setting.name
        assert target in fields, setting
        if setting.instead_of is None and setting.default is not None:
            assert fields[setting.name] == setting.default
    assert {s.instead_of or s.name for s in rule.declared()} == set(fields)


def test_declared_tables_by_hand() -> None:
    assert [s.name for s in ExponentialRule.declared()] == ["decay", "half_life", "numerator", "denominator"]
    assert [(s.name, s.several) for s in PowerRule.declared()] == [("gamma", True), ("sigma_rel", True)]
    assert ExponentialRule.setting("numerator").several is False  # type: ignore[union-attr]
    assert ExponentialRule.setting("half_life").flag == "--half-life"  # type: ignore[union-attr]
    assert UniformRule.declared() == ()
    assert [r.weighs_equally for r in (ExponentialRule, UniformRule, PowerRule)] == [False, True, False]
    # an alternative's default applies where the setting it replaces has none: EDM2's sigma_rel 0.05
    assert PowerRule.from_options() == PowerRule(sigma_rel_to_gamma(0.05))
    assert ExponentialRule.from_options(half_life=10) == ExponentialRule(0.5**0.1)


def test_a_rule_without_a_table_takes_its_dataclass_fields() -> None:
    @dataclasses.dataclass(frozen=True)
    class Shares(DecayRule):
        keep: float = 0.5
        floor: float = 0.0

        def at(self, num_updates: int | None, count: int) -> float:
            return max(self.keep, self.floor)

        def between(self, after_step: int, to_step: int) -> float:
            return self.at(None, 0) ** (to_step - after_step)

    assert [(s.name, s.default, s.several) for s in Shares.declared()] == [
        ("keep", 0.5, True),
        ("floor", 0.0, True),
    ]
    assert Shares.from_options(keep=1) == Shares(1.0, 0.0)
    with pytest.raises(ConfigurationError, match=r"^--keep must be a number, got 'x'$"):
        Shares.from_options(keep="x")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigurationError,
        match=r"^--decay does not apply to the Shares average \(it takes --keep, --floor\)$",
    ):
        Shares.from_options(decay=0.9)
