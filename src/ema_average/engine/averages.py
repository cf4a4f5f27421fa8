"""Moving averages of named tensors: the one engine behind the library and the CLI.

The public shape follows AllenNLP's ``MovingAverage`` (a registrable base with ``apply``,
``assign_average_value`` and ``restore``) so its users feel at home, with what users of torch_ema,
timm and ema-pytorch ask for on top: float32 shadows whatever the parameter dtype, one multi-tensor
update per (device, dtype) group, shadows on another device, a state dict, a swap-in context manager,
and an update that takes any tensors (``update``), not only the tracked parameters.

Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallel) are averaged shard by shard: each
rank keeps float32 averages of its local shards only, updated with no collective, and hands them back as
DTensors of the parameters' mesh and placements (``averages``, ``state_dict``), which
``torch.distributed.checkpoint`` saves sharded and reloads at another world size.

One module per job: ``engine`` (``MovingAverage``, its registry and swaps), ``registry`` (averages other
packages declare), ``kernel`` (``ema_update_``), ``buckets`` (flat storage, background host updates),
``sharded`` (DTensor layouts), ``parameters`` (what an average is built from), ``state`` (checking a saved
state), ``fits`` (``check_fits``). This file registers the built-in averages and re-exports the public
names. The package knows nothing of files or of the command line.
"""

from __future__ import annotations

import torch

from ema_average.engine.decay_rules import DecayRule, ExponentialRule, PowerRule, UniformRule
from ema_average.engine.dtensor_layouts import is_dtensor, local_part
from ema_average.engine.fits import check_fits
from ema_average.engine.kernel import ema_update_, shadow_dtype
from ema_average.engine.moving_average import ENTRY_POINT_GROUP, MovingAverage, Values
from ema_average.engine.parameters import NamedParameter, Parameters
from ema_average.errors import ConfigurationError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExponentialMovingAverage",
    "MovingAverage",
    "NamedParameter",
    "Parameters",
    "PowerFunctionMovingAverage",
    "UniformMovingAverage",
    "Values",
    "check_fits",
    "ema_update_",
    "is_dtensor",
    "local_part",
    "shadow_dtype",
]


def rule_or_settings(
    average: MovingAverage, rule: DecayRule | None, given: dict[str, float], defaults: DecayRule | None
) -> DecayRule:
    """The rule a constructor was given (how :meth:`MovingAverage.with_rule` builds every average, through
    its own ``__init__``), else the one its settings make; both at once is refused, never one ignored."""
    if rule is None:
        return average.make_rule(**given)
    if given and (defaults is None or average.make_rule(**given) != defaults):
        raise ConfigurationError(
            f"give the {average.registered_name} average a rule or its settings, not both"
        )
    return rule


@MovingAverage.register("exponential")
class ExponentialMovingAverage(MovingAverage):
    """Exponential moving average with TensorFlow's warm-up rule (AllenNLP's "exponential").

    ``apply()`` uses ``decay``; ``apply(num_updates=n)`` uses
    ``min(decay, (numerator + n) / (denominator + n))``. ``average_dtype=torch.bfloat16`` keeps the
    averages in bfloat16 with stochastic rounding (opt-in: half the memory, at the error docs/library.md
    measures).
    """

    rule_type = ExponentialRule
    rule: ExponentialRule

    def __init__(
        self,
        parameters: Parameters,
        decay: float = ExponentialRule.decay,
        numerator: float = ExponentialRule.numerator,
        denominator: float = ExponentialRule.denominator,
        *,
        rule: ExponentialRule | None = None,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> None:
        given = {"decay": decay, "numerator": numerator, "denominator": denominator}
        chosen = rule_or_settings(self, rule, given, ExponentialRule())
        super().__init__(parameters, rule=chosen, device=device, average_dtype=average_dtype)

    @property
    def decay(self) -> float:
        return self.rule.decay

    @property
    def numerator(self) -> float:
        return self.rule.numerator

    @property
    def denominator(self) -> float:
        return self.rule.denominator


@MovingAverage.register("uniform")
class UniformMovingAverage(MovingAverage):
    """The arithmetic mean of the starting values and every update (``num_updates`` is ignored).

    What fairseq's ``average_checkpoints.py`` and OpenNMT compute, in float32, streamed.
    """

    rule_type = UniformRule

    def __init__(
        self,
        parameters: Parameters,
        *,
        rule: UniformRule | None = None,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> None:
        chosen = rule_or_settings(self, rule, {}, UniformRule())
        super().__init__(parameters, rule=chosen, device=device, average_dtype=average_dtype)


@MovingAverage.register("power")
class PowerFunctionMovingAverage(MovingAverage):
    """Karras et al.'s power-function EMA (EDM2): decay ``(1 - 1/t) ** (gamma + 1)`` at step ``t``.

    Give ``gamma`` or ``sigma_rel`` (the profile's relative width; EDM2 uses 0.05 to 0.10). ``apply()``
    without ``num_updates`` counts steps itself (the first update replaces the average).
    """

    rule_type = PowerRule

    def __init__(
        self,
        parameters: Parameters,
        gamma: float | None = None,
        sigma_rel: float | None = None,
        *,
        rule: PowerRule | None = None,
        device: torch.device | str | None = None,
        average_dtype: torch.dtype | None = None,
    ) -> None:
        given = {k: v for k, v in (("gamma", gamma), ("sigma_rel", sigma_rel)) if v is not None}
        chosen = rule_or_settings(self, rule, given, None)
        super().__init__(parameters, rule=chosen, device=device, average_dtype=average_dtype)
