"""``average_dtype=torch.bfloat16``: averages kept in bfloat16 (half float32's memory), updated in float32 and
stochastically rounded, checked against a float64 EMA of the same values.

The bound. Each update rounds ``x = lerp(s, v, w)`` (float32) to one of its bfloat16 neighbours ``a < x < b``,
up with probability ``(x - a) / (b - a)``: the rounding error ``delta`` has mean 0 and variance
``(x - a)(b - x) <= ulp(x) * |x - s|`` (``s``, the shadow before the update, is a bfloat16 value, so ``x`` is
at least as far from it as from its nearer neighbour), and ``|x - s| = w * |v - s|``. The error against the
exact EMA of the same values then follows ``e <- d * e + delta``: its mean is 0 and its mean square after
the last update is at most ``B = sum_t d^(2(T-1-t)) * ulp(x_t) * w * |v_t - s_t|`` (plus float32's own
rounding, 2^-16 smaller). Over N independent elements the mean error is within a few ``sqrt(B / N)`` of 0
and the mean square error below ``B`` up to sampling noise (the sum has thousands of terms: a 10% margin
is many standard deviations). Round to nearest fails both: at decay 0.99 a change under half an ulp
(``|v - s| < 0.39`` near 1.5) is lost, so the average lags the drifting values by that much.
"""

from __future__ import annotations

import pytest
import torch

from ema_average.engine.averages import ExponentialMovingAverage, PowerFunctionMovingAverage
from ema_average.errors import ConfigurationError

N, STEPS, DECAY = 1 << 12, 600, 0.99


def _values(step: int, generator: torch.Generator) -> torch.Tensor:
    """Weights drifting from 1 to 1.5 over the run, with noise: float32, as a trainer's would be."""
    return 1 + 0.5 * step / STEPS + 0.05 * torch.randn(N, generator=generator)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bfloat16's spacing at ``x`` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 7)


def _run(update: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final shadow, float64 reference, per-element bound B) of an EMA whose one step is ``update(s, v)``."""
    generator = torch.Generator().manual_seed(1)
    start = _values(0, generator)
    shadow, reference = update(None, start), start.double()  # type: ignore[operator]
    bound = torch.zeros(N, dtype=torch.float64)
    weight = 1 - DECAY
    for step in range(1, STEPS + 1):
        v = _values(step, generator)
        s = shadow.double()
        x = s + weight * (v.double() - s)
        bound = DECAY**2 * bound + _ulp(x) * weight * (v.double() - s).abs()
        shadow = update(shadow, v)  # type: ignore[operator]
        reference = torch.lerp(reference, v.double(), weight)
    return shadow, reference, bound


def _within_bound(shadow: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> tuple[bool, bool]:
    """(mean error within 5 standard errors of 0, mean square error within 1.1 B)."""
    error = shadow.double() - reference
    unbiased = error.mean().abs().item() <= 5 * (bound.mean() / N).sqrt().item()
    return unbiased, error.pow(2).mean().item() <= 1.1 * bound.mean().item()


def _engine_update() -> object:
    param = torch.nn.Parameter(torch.empty(N))
    holder: dict[str, ExponentialMovingAverage] = {}

    def update(shadow: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            param.copy_(v)
        if shadow is None:
            holder["ema"] = ExponentialMovingAverage(
                [("w", param)], decay=DECAY, average_dtype=torch.bfloat16
            )
        else:
            holder["ema"].apply()
        return holder["ema"].averages()["w"]

    return update


def _nearest_update(shadow: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """A bfloat16 EMA rounded to nearest: the float32 update, then ``.bfloat16()``."""
    if shadow is None:
        return v.bfloat16()
    return torch.lerp(shadow.float(), v, 1 - DECAY).bfloat16()


@pytest.mark.slow
def test_bfloat16_average_is_unbiased_within_the_stochastic_rounding_bound() -> None:
    shadow, reference, bound = _run(_engine_update())
    assert shadow.dtype == torch.bfloat16 and shadow.element_size() == 2
    assert _within_bound(shadow, reference, bound) == (True, True)


def test_round_to_nearest_fails_the_same_bound() -> None:
    """The bound has teeth: a bfloat16 EMA rounded to nearest lags the drifting weights far beyond it."""
    shadow, reference, bound = _run(_nearest_update)
    assert _within_bound(shadow, reference, bound) == (False, False)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    net[1].to(torch.bfloat16)  # two buckets (float32 and bfloat16 weights): each rounds with its own bits
    return net


def _step(net: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for k, p in enumerate(net.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + k)).to(p.dtype))


def test_resume_from_state_dict_is_bit_exact() -> None:
    net = _model()
    whole = ExponentialMovingAverage(net, decay=0.999, average_dtype=torch.bfloat16)
    for step in range(1, 21):
        _step(net, step)
        whole.apply()
        if step == 10:
            state = whole.state_dict()
            assert {a.dtype for a in state["averages"].values()} == {torch.bfloat16}
            resumed = ExponentialMovingAverage(net, decay=0.999, average_dtype=torch.bfloat16)
            resumed.load_state_dict(state)
        elif step > 10:
            resumed.apply()
    for name, tensor in whole.averages().items():
        assert torch.equal(resumed.averages()[name], tensor), name
    moved = {n: t.float() for n, t in whole.averages().items()}
    assert max((moved[n] - p.float()).abs().max().item() for n, p in net.named_parameters()) > 0


def test_update_and_apply_round_alike() -> None:
    """``update(values)`` (the offline path) draws the same rounding bits as ``apply()``."""
    net = _model()
    online = PowerFunctionMovingAverage(net, gamma=7.0, average_dtype=torch.bfloat16)
    fed = PowerFunctionMovingAverage.from_tensors(
        {n: p.detach().clone() for n, p in net.named_parameters()},
        gamma=7.0,
        average_dtype=torch.bfloat16,
    )
    for step in range(1, 6):
        _step(net, step)
        online.apply()
        fed.update(dict(net.named_parameters()))
    for name, tensor in online.averages().items():
        assert torch.equal(fed.averages()[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float16, "bfloat16"])
def test_average_dtype_refuses_what_is_not_a_float_it_can_keep(dtype: object) -> None:
    with pytest.raises(ConfigurationError, match="average_dtype"):
        ExponentialMovingAverage(_model(), average_dtype=dtype)  # type: ignore[arg-type]


def test_default_stays_float32() -> None:
    net = _model()
    average = ExponentialMovingAverage(net)
    assert {t.dtype for t in average.averages().values()} == {torch.float32}
    asked = ExponentialMovingAverage(net, average_dtype=torch.float32)
    assert {t.dtype for t in asked.averages().values()} == {torch.float32}
