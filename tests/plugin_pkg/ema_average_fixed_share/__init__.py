"""An average another package adds: every update keeps the share ``keep`` of the old average.

Not registered here: the entry point alone makes ``MovingAverage.by_name("fixed-share")`` and
``ema-average --method fixed-share --set keep=0.25`` find it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ema_average import MovingAverage
from ema_average.engine.decay_rules import DecayRule, Setting, check_unit


@dataclass(frozen=True)
class FixedShareRule(DecayRule):
    """Decay ``keep`` at every update; over a gap of n steps, ``keep ** n``."""

    parameters: ClassVar[tuple[Setting, ...]] = (
        Setting("keep", 0.5, "Share of the old average each update keeps."),
        Setting(
            "drop",
            help="Instead of keep: the share each new value gets.",
            instead_of="keep",
            convert=lambda drop: 1.0 - drop,
        ),
    )

    keep: float = 0.5

    def __post_init__(self) -> None:
        check_unit("keep", self.keep)

    def at(self, num_updates: int | None, count: int) -> float:
        return self.keep

    def between(self, after_step: int, to_step: int) -> float:
        return self.keep ** (to_step - after_step)


class FixedShareAverage(MovingAverage):
    rule_type = FixedShareRule
