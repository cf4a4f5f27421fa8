"""Which decay each update gets: the rules of the registered averages, as pure functions of steps.

Every average is a sequence of ``shadow <- d * shadow + (1 - d) * value``; a rule says what ``d`` is,
either for one update (``at``) or for the per-step rule applied over every step of a gap between two
checkpoints (``between``: the gap-aware, "step" schedule), in closed form, never by looping over steps.
No tensors here: the plan and the engine both ask these.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np

from ema_average.errors import ConfigurationError


def check_unit(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")


class DecayRule(ABC):
    """The decay of each update of one kind of average."""

    @abstractmethod
    def at(self, num_updates: int | None, count: int) -> float:
        """Decay of one update: ``num_updates`` is the step if known, ``count`` the values averaged so far."""

    @abstractmethod
    def between(self, after_step: int, to_step: int) -> float:
        """Product of the per-step decays of steps ``after_step + 1 .. to_step``."""

    def settings(self) -> dict[str, float]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ExponentialRule(DecayRule):
    """The seed's rule: ``min(decay, (numerator + n) / (denominator + n))`` (TensorFlow's warm-up)."""

    decay: float = 0.9999
    numerator: float = 1.0
    denominator: float = 10.0

    def __post_init__(self) -> None:
        check_unit("decay", self.decay)
        if not (self.denominator > 0 and 0 <= self.numerator <= self.denominator):
            raise ConfigurationError(
                "need 0 <= numerator <= denominator and denominator > 0, "
                f"got numerator={self.numerator!r}, denominator={self.denominator!r}"
            )

    def at(self, num_updates: int | None, count: int) -> float:
        if num_updates is None:
            return self.decay
        return min(self.decay, (self.numerator + num_updates) / (self.denominator + num_updates))

    def between(self, after_step: int, to_step: int) -> float:
        _check_gap(after_step, to_step)
        # The warm-up ratio rises with k: steps before ``first_flat`` use it, the rest use ``decay``.
        warm_end = min(to_step, max(after_step, self._first_flat_step() - 1))
        log_product = self._log_warmup_product(after_step, warm_end) if warm_end > after_step else 0.0
        flat_steps = to_step - max(after_step, warm_end)
        return math.exp(log_product) * self.decay**flat_steps

    def _first_flat_step(self) -> float:
        """The first step k whose warm-up ratio reaches ``decay``."""
        if self.decay >= 1.0:
            return math.inf
        k = max(0, math.ceil((self.decay * self.denominator - self.numerator) / (1.0 - self.decay)))
        while k > 0 and (self.numerator + k - 1) / (self.denominator + k - 1) >= self.decay:  # float rounding
            k -= 1
        while (self.numerator + k) / (self.denominator + k) < self.decay:
            k += 1
        return k

    def _log_warmup_product(self, after_step: int, last: int) -> float:
        """sum of log((numerator + k) / (denominator + k)) for k in (after_step, last], vectorised in chunks."""
        gap = self.denominator - self.numerator
        parts = []
        for start in range(after_step + 1, last + 1, 1 << 20):
            k = np.arange(start, min(last, start + (1 << 20) - 1) + 1, dtype=np.float64)
            parts.append(float(np.sum(np.log1p(-gap / (self.denominator + k)))))
        return math.fsum(parts)


@dataclass(frozen=True)
class UniformRule(DecayRule):
    """The arithmetic mean: the k-th value added gets weight 1/k (fairseq's and OpenNMT's averaging)."""

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

    gamma: float = 6.94

    def __post_init__(self) -> None:
        if not self.gamma > -1:
            raise ConfigurationError(f"gamma must be > -1, got {self.gamma!r}")

    @classmethod
    def from_gamma_or_sigma_rel(cls, gamma: float | None, sigma_rel: float | None) -> PowerRule:
        """The rule given by ``gamma`` or by ``sigma_rel`` (neither: EDM2's sigma_rel 0.05)."""
        if gamma is not None and sigma_rel is not None:
            raise ConfigurationError("give gamma (--gamma) or sigma_rel (--sigma-rel), not both")
        if gamma is None:
            gamma = sigma_rel_to_gamma(0.05 if sigma_rel is None else sigma_rel)
        return cls(float(gamma))

    def at(self, num_updates: int | None, count: int) -> float:
        t = count if num_updates is None else num_updates
        return 0.0 if t <= 1 else (1.0 - 1.0 / t) ** (self.gamma + 1)

    def between(self, after_step: int, to_step: int) -> float:
        _check_gap(after_step, to_step)
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
    if not half_life > 0:
        raise ConfigurationError(f"half-life must be positive, got {half_life!r}")
    return 0.5 ** (1.0 / half_life)


def _check_gap(after_step: int, to_step: int) -> None:
    if not 0 <= after_step < to_step:
        raise ConfigurationError(f"steps must increase: {after_step} then {to_step}")
