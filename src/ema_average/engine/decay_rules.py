"""Which decay each update gets: the rules of the registered averages, as pure functions of steps.

Every average is a sequence of ``shadow <- d * shadow + (1 - d) * value``; a rule says what ``d`` is,
either for one update (``at``) or for the per-step rule applied over every step of a gap between two
checkpoints (``between``: the gap-aware, "step" schedule), in closed form, never by looping over steps.
No tensors here: the plan and the engine both ask these.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from fractions import Fraction
from typing import ClassVar

import numpy as np

from ema_average.errors import ConfigurationError

_MAX_STEP = 2**63 - 1  # a step counter is an int64: the closed forms hold, in constant time, up to here

# Steps k <= _EXACT_STEPS are summed term by term; past it Euler-Maclaurin's remainder is below 7e-22.
_EXACT_STEPS = 1 << 12
# Euler-Maclaurin's corrections, as (m, B_m+1 / (m (m + 1))) for m = 2j - 1: weights of f^(m) / (m - 1)!.
_EULER_MACLAURIN = ((1, 1.0 / 12.0), (3, -1.0 / 360.0), (5, 1.0 / 1260.0))


def check_unit(name: str, value: float) -> None:
    """Refuse a decay outside [0, 1]: NaN, infinities and bools included (True is no decay)."""
    if not (_is_finite_number(value) and 0.0 <= value <= 1.0):
        raise ConfigurationError(f"--{name} must be a number in [0, 1], got {value!r}")


def _check_finite(name: str, value: float) -> None:
    """Refuse an infinite or NaN setting: it would give weights of 0, 1 or NaN, or break the closed forms."""
    if not _is_finite_number(value):
        raise ConfigurationError(f"--{name} must be a finite number, got {value!r}")


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the range of a float
        return False


@dataclass(frozen=True)
class Setting:
    """One setting a rule is built from, as data: the plan, the command line and the messages read it, so a
    new average's settings need no edit anywhere else.

    An alternative (``instead_of``) is given in place of another setting and turned into it by ``convert``
    (``half_life`` for ``decay``); its ``default`` then applies where the setting it replaces has none.
    """

    name: str  # the keyword (``half_life``); the command line spells it ``--half-life``
    default: float | None = None  # None: the rule's own field default, or an alternative's
    help: str = ""
    several: bool = True  # a comma list gives one average per value
    instead_of: str | None = None
    convert: Callable[[float], float] | None = None

    @property
    def flag(self) -> str:
        return flag_of(self.name)


def flag_of(name: str) -> str:
    """How the command line and the messages spell a setting: ``half_life`` is ``--half-life``."""
    return "--" + name.replace("_", "-")


class DecayRule(ABC):
    """The decay of each update of one kind of average."""

    # How errors name the average this rule belongs to: set once, by ``MovingAverage.register(name)``, so
    # the name lives in one place (a rule no average has registered is named by its class).
    average_name: ClassVar[str] = ""
    # The settings a user may give; None: the dataclass fields, each with its default, each a list.
    parameters: ClassVar[tuple[Setting, ...] | None] = None
    # Whether every checkpoint gets the same weight (the plan then has no "first one dominates" note).
    weighs_equally: ClassVar[bool] = False

    @abstractmethod
    def at(self, num_updates: int | None, count: int) -> float:
        """Decay of one update: ``num_updates`` is the step if known, ``count`` the values averaged so far."""

    # Whether the rule has a per-step meaning, so that ``between`` (the "step" schedule) exists.
    has_gap_product: ClassVar[bool] = True

    @abstractmethod
    def between(self, after_step: int, to_step: int) -> float:
        """Product of the per-step decays of steps ``after_step + 1 .. to_step``.

        Over one step it must be ``at(to_step, ...)`` exactly (the same float, not a closed form that rounds
        otherwise): then the command over per-step checkpoints and ``apply(num_updates=step)`` agree bit
        for bit.
        """

    @classmethod
    def declared(cls) -> tuple[Setting, ...]:
        """The settings this rule takes: its ``parameters``, or else its dataclass fields."""
        if cls.parameters is not None:
            return cls.parameters
        return tuple(
            Setting(f.name, None if f.default is MISSING else f.default)
            for f in fields(cls)  # type: ignore[arg-type]  # every concrete rule is a dataclass
        )

    @classmethod
    def setting(cls, name: str) -> Setting | None:
        """The declared setting called ``name``, or None."""
        return next((s for s in cls.declared() if s.name == name), None)

    @classmethod
    def from_options(cls, **options: float) -> DecayRule:
        """The rule from the options a user gave by name (``decay``, ``half_life``, ``gamma``...).

        The one place that turns settings into a rule: the engine's classes, the offline plan and the
        command line all come through here, checked against :meth:`declared`, so each default and each
        alternative lives in the rule's own table.
        """
        table = cls.declared()
        _refuse_foreign(cls, options, tuple(s.name for s in table))
        values = {name: _number(flag_of(name), value) for name, value in options.items()}
        for alternative in (s for s in table if s.instead_of is not None):
            _apply_alternative(table, alternative, values)
        return cls(**values)

    def settings(self) -> dict[str, float]:
        return asdict(self)  # type: ignore[call-overload]  # every concrete rule is a dataclass


def _apply_alternative(table: tuple[Setting, ...], alternative: Setting, values: dict[str, float]) -> None:
    """Turn a given alternative (``half_life``) into the setting it replaces, or apply its default where
    that setting has none of its own (power's ``sigma_rel``)."""
    assert alternative.instead_of is not None and alternative.convert is not None
    target = next(s for s in table if s.name == alternative.instead_of)
    if alternative.name in values:
        if target.name in values:
            raise ConfigurationError(f"give {target.flag} or {alternative.flag}, not both")
        values[target.name] = alternative.convert(values.pop(alternative.name))
    elif target.name not in values and target.default is None and alternative.default is not None:
        values[target.name] = alternative.convert(alternative.default)


def _number(flag: str, value: object) -> float:
    """A setting's value as a float: a string or a list is refused by name, not by a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{flag} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the range of a float
        raise ConfigurationError(f"{flag} must be a finite number, got {value!r}") from None


def _refuse_foreign(rule: type[DecayRule], options: dict[str, float], known: tuple[str, ...]) -> None:
    foreign = [name for name in options if name not in known]
    if foreign:
        flags = ", ".join(flag_of(name) for name in foreign)
        takes = ", ".join(flag_of(name) for name in known) or "no settings"
        raise ConfigurationError(
            f"{flags} does not apply to the {rule.average_name or rule.__name__} average (it takes {takes})"
        )


@dataclass(frozen=True)
class ExponentialRule(DecayRule):
    """The seed's rule: ``min(decay, (numerator + n) / (denominator + n))`` (TensorFlow's warm-up)."""

    parameters: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "decay",
            0.9999,
            "EMA decay (upper bound when steps are known). A comma list (0.999,0.9999) computes one average "
            "per value in one pass over the checkpoints, each in its own output named for it; so do "
            "--half-life, --gamma and --sigma-rel (one of them per run).",
        ),
        Setting(
            "half_life",
            help="Instead of --decay: steps (schedule step) or checkpoints (schedule checkpoint) to halve a "
            "weight; a comma list for several averages.",
            instead_of="decay",
            convert=lambda half_life: half_life_to_decay(half_life),
        ),
        Setting(
            "numerator",
            1.0,
            "Warm-up: decay = min(decay, (numerator + step) / (denominator + step)).",
            several=False,
        ),
        Setting("denominator", 10.0, "Warm-up denominator (see --numerator).", several=False),
    )

    decay: float = 0.9999
    numerator: float = 1.0
    denominator: float = 10.0

    def __post_init__(self) -> None:
        check_unit("decay", self.decay)
        _check_finite("numerator", self.numerator)
        _check_finite("denominator", self.denominator)
        if not (self.denominator > 0 and 0 <= self.numerator <= self.denominator):
            raise ConfigurationError(
                "need 0 <= --numerator <= --denominator and --denominator > 0, "
                f"got numerator={self.numerator!r}, denominator={self.denominator!r}"
            )

    def at(self, num_updates: int | None, count: int) -> float:
        if num_updates is None:
            return self.decay
        return min(self.decay, (self.numerator + num_updates) / (self.denominator + num_updates))

    def between(self, after_step: int, to_step: int) -> float:
        _check_gap(after_step, to_step)
        if to_step - after_step == 1:  # one step: the online update's own decay, to the bit
            return self.at(to_step, to_step)
        # The warm-up ratio rises with k: steps before ``first_flat`` use it, the rest use ``decay``.
        first_flat = self._first_flat_step()
        warm_end = to_step if first_flat is None else min(to_step, max(after_step, first_flat - 1))
        log_product = self._log_warmup_product(after_step, warm_end)
        return math.exp(log_product) * self.decay ** (to_step - warm_end)

    def _first_flat_step(self) -> int | None:
        """The first step k whose warm-up ratio reaches ``decay``; None if none does (decay 1).

        Solved exactly in rationals, so a decay within an ulp of 1 neither overflows nor needs a search.
        """
        if self.decay >= 1.0:
            return None
        decay = Fraction(self.decay)
        threshold = (decay * Fraction(self.denominator) - Fraction(self.numerator)) / (1 - decay)
        return max(0, math.ceil(threshold))

    def _log_warmup_product(self, after_step: int, last: int) -> float:
        """Sum of log((numerator + k) / (denominator + k)) for k in (after_step, last], in constant time.

        The first ``_EXACT_STEPS`` steps term by term (vectorised), the rest by Euler-Maclaurin.
        """
        split = min(last, max(after_step, _EXACT_STEPS))
        head = self._log_ratios(np.arange(after_step + 1, split + 1, dtype=np.float64))
        return math.fsum([*head.tolist(), self._log_tail(split, last)])

    def _log_ratios(self, k: np.ndarray) -> np.ndarray:
        """log((numerator + k) / (denominator + k)) to a few ulps, whether the ratio is near 1 or near 0."""
        excess = (self.denominator - self.numerator) / (self.denominator + k)
        with np.errstate(divide="ignore"):  # the branch np.where drops may see log1p(-1)
            ratio = (self.numerator + k) / (self.denominator + k)
            return np.where(excess < 0.5, np.log1p(-excess), np.log(ratio))

    def _log_tail(self, start: int, end: int) -> float:
        """The same sum for k in (start, end], start >= _EXACT_STEPS, by Euler-Maclaurin.

        With f(x) = log((n + x) / (d + x)): sum = integral + (f(end) - f(start)) / 2 + three derivative
        corrections. f's poles are at -n and -d <= 0, so the remainder is at most
        2 zeta(6) / (2 pi)^6 * 4! * (n + start)^-5 <= 7.94e-4 * 4096^-5 < 7e-22. Each of the integral's three
        terms is at most twice the sum in size, so rounding costs a few ulps of the sum, never more.
        """
        if end <= start:
            return 0.0
        numerator, denominator = self.numerator, self.denominator
        gap, steps = denominator - numerator, float(end - start)
        x = np.array([start, end], dtype=np.float64)
        f = self._log_ratios(x)
        # [(n + x) f(x) - gap log(d + x)] from start to end, regrouped with f(end) - f(start) = log1p(spread)
        spread = steps / (denominator + end) * (gap / (numerator + start))
        integral = (
            (numerator + start) * math.log1p(spread)
            + steps * float(f[1])
            - gap * math.log1p(steps / (denominator + start))
        )
        corrections = 0.0
        for order, weight in _EULER_MACLAURIN:
            # f^(m) / (m - 1)! = (n + x)^-m - (d + x)^-m = (n + x)^-m (1 - ratio^m), free of cancellation
            derivative = -np.expm1(order * f) * (1.0 / (numerator + x)) ** order
            corrections += weight * float(derivative[1] - derivative[0])
        return integral + float(f[1] - f[0]) / 2 + corrections


@dataclass(frozen=True)
class UniformRule(DecayRule):
    """The arithmetic mean: the k-th value added gets weight 1/k (fairseq's and OpenNMT's averaging)."""

    has_gap_product: ClassVar[bool] = False
    weighs_equally: ClassVar[bool] = True

    def at(self, num_updates: int | None, count: int) -> float:
        return count / (count + 1)

    def between(self, after_step: int, to_step: int) -> float:
        raise ConfigurationError(
            "the uniform average weighs checkpoints equally; it has no per-step schedule"
        )


@dataclass(frozen=True)
class PowerRule(DecayRule):
    """Karras et al.'s power-function EMA (EDM2, 2024): per-step decay ``(1 - 1/t) ** (gamma + 1)``.

    Over a gap the product telescopes: ``prod (k - 1) / k`` for k in (a, b] is ``a / b``.
    """

    default_sigma_rel: ClassVar[float] = 0.05  # EDM2's shorter profile; gamma 16.97
    parameters: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "gamma", help="Power method: exponent gamma of (1 - 1/t)^(gamma + 1); a comma list for several."
        ),
        Setting(
            "sigma_rel",
            default_sigma_rel,
            "Power method: relative width of the averaging profile instead of gamma; a comma list "
            "(0.05,0.1) for several.",
            instead_of="gamma",
            convert=lambda sigma_rel: sigma_rel_to_gamma(sigma_rel),
        ),
    )

    gamma: float

    def __post_init__(self) -> None:
        _check_finite("gamma", self.gamma)
        if not self.gamma > -1:
            raise ConfigurationError(f"--gamma must be > -1, got {self.gamma!r}")

    def at(self, num_updates: int | None, count: int) -> float:
        t = count if num_updates is None else num_updates
        return 0.0 if t <= 1 else (1.0 - 1.0 / t) ** (self.gamma + 1)

    def between(self, after_step: int, to_step: int) -> float:
        _check_gap(after_step, to_step)
        if to_step - after_step == 1:  # one step: the online update's own decay, to the bit
            return self.at(to_step, to_step)
        return (after_step / to_step) ** (self.gamma + 1)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's conversion: the gamma whose profile has relative standard deviation ``sigma_rel``.

    Solves (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) = sigma_rel^2, a cubic in gamma.
    """
    if not 0 < sigma_rel < 1:
        raise ConfigurationError(f"sigma_rel must be in (0, 1), got {sigma_rel!r}")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def half_life_to_decay(half_life: float) -> float:
    """The decay that halves a value's weight every ``half_life`` updates."""
    if not (_is_finite_number(half_life) and half_life > 0):
        raise ConfigurationError(f"--half-life must be a positive finite number, got {half_life!r}")
    return 0.5 ** (1.0 / half_life)


def _check_gap(after_step: int, to_step: int) -> None:
    if not 0 <= after_step < to_step <= _MAX_STEP:
        raise ConfigurationError(f"steps must increase, from 0 to 2**63 - 1: {after_step} then {to_step}")
