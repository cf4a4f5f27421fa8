"""The update kernel: ``shadow <- decay * shadow + (1 - decay) * value`` over many tensors at once.

Its own module because it is the arithmetic the online average and the offline command share (offline/streaming.py
calls ``ema_update_`` directly), and it needs nothing of an average's bookkeeping: tensors in, tensors
updated. The flat-buffer helpers (``views``, ``moved``) live here with it, as the buckets build on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ema_average._platform.torch_compat import flatten_dense, foreach_lerp_
from ema_average.errors import ConfigurationError

# Dtypes an average may be kept in on request (``average_dtype=``). bfloat16 is a float32 with its low 16
# bits cut off, which is what makes stochastic rounding a bit mask (float16 is not: refused).
AVERAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_LOW_BITS = 1 << 16  # the float32 mantissa bits below bfloat16's


def shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype an average of ``dtype`` values is kept in: never narrower than float32.

    A bf16 shadow at decay 0.9999 adds 1e-4 * (value - shadow), which is below bf16's resolution
    for most weights, so the average silently stops moving; float32 has the headroom, float64 stays.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def checked_average_dtype(dtype: object) -> torch.dtype | None:
    """``average_dtype`` as asked: None (float32 or wider, the default), or one of :data:`AVERAGE_DTYPES`."""
    if dtype is None or dtype in AVERAGE_DTYPES:
        return dtype
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        problem = "not a floating-point dtype"
    else:
        problem = "not a dtype averages can be kept in"
    names = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in AVERAGE_DTYPES)
    raise ConfigurationError(f"average_dtype must be None or one of {names}; {dtype!r} is {problem}")


def rounding_seed(num_applied: int, bucket: int) -> int:
    """The seed of the stochastic rounding of one bucket's update number ``num_applied``: a function of the
    count the state already saves, so a resumed average rounds as the uninterrupted one would (splitmix64:
    the low 32 bits, all a CPU generator uses, differ from update to update)."""
    z = (num_applied * 0x9E3779B97F4A7C15 + bucket * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


# Elements of narrower values converted per pass before their lerp: a 4 MiB float32 scratch (or the largest
# tensor, if larger), whatever the model's size.
_CONVERT_NUMEL = 1 << 20


def ema_update_(
    shadows: list[torch.Tensor],
    values: list[torch.Tensor],
    decay: float,
    flat: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """``shadow <- decay * shadow + (1 - decay) * value`` for every pair: always ``lerp``, never mul + add.

    All ``shadows`` share one device and dtype, and so do all ``values`` (on the same device). Same dtypes
    take one fused multi-tensor ``lerp``. Narrower values (bf16/fp16 weights, float32 averages) are first
    converted, exactly, into a reused scratch of the shadows' dtype, a window of consecutive tensors at a
    time (one multi-tensor copy), then lerped: the arithmetic the offline command does (it converts each
    checkpoint's values, then lerps), so the two give the same bits for the same values and decay. ``flat``
    is the buffer the shadows are consecutive views of, in order: each window is then one ``lerp`` over its
    slice instead of one per tensor (most of the cost on many small tensors). No float32 copy of the model
    is made (CPU type promotion of a mixed-dtype ``lerp`` would allocate one per tensor).

    bfloat16 shadows (``average_dtype=torch.bfloat16``) take :func:`rounded_update_` with ``generator``.
    """
    if not shadows:
        return
    weight = 1.0 - decay
    if shadows[0].dtype == torch.bfloat16:
        if generator is None:
            raise ValueError("bfloat16 averages are updated with stochastic rounding: pass a generator")
        for first, end, offset in _windows([s.numel() for s in shadows], _CONVERT_NUMEL):
            if flat is not None:
                span = sum(s.numel() for s in shadows[first:end])
                rounded_update_(flat[offset : offset + span], values[first:end], weight, generator)
                continue
            for shadow, value in zip(shadows[first:end], values[first:end], strict=True):
                rounded_update_(shadow.view(-1), [value], weight, generator)
        return
    if shadows[0].dtype == values[0].dtype:
        foreach_lerp_(shadows, values, weight)
        return
    numels = [s.numel() for s in shadows]
    size = min(sum(numels), max(_CONVERT_NUMEL, *numels))
    scratch = torch.empty(size, dtype=shadows[0].dtype, device=shadows[0].device)
    first = offset = 0
    for end in _window_ends(numels, size):
        span = sum(numels[first:end])
        if end - first == 1:
            scratch[:span].view(shadows[first].shape).copy_(values[first])
        else:  # one concatenation in C++ and one conversion, not a copy and a view per tensor
            scratch[:span].copy_(flatten_dense(values[first:end]))
        if flat is not None:
            flat[offset : offset + span].lerp_(scratch[:span], weight)
        else:
            converted = views(scratch, [s.shape for s in shadows[first:end]])
            foreach_lerp_(shadows[first:end], converted, weight)
        first, offset = end, offset + span


def rounded_update_(
    shadow: torch.Tensor, values: list[torch.Tensor], weight: float, generator: torch.Generator
) -> None:
    """``shadow <- lerp(shadow, values, weight)`` for a flat bfloat16 ``shadow`` over ``values`` (consecutive):
    computed in float32, then stochastically rounded to bfloat16.

    Round to nearest would lose every step whose change, ``weight * |value - shadow|``, is under half a
    bfloat16 ulp (2^-9 of the shadow): at decay 0.9999 almost all of them, and the average stops. Adding
    uniform random bits below bfloat16's mantissa to the float32 pattern and truncating rounds up with
    probability equal to the fraction of an ulp cut off, so the rounding is unbiased (its expected value
    is the float32 result) and the average keeps moving on average. Its variance is at most
    ``ulp * |change|`` a step: see docs/library.md for the error this leaves.
    """
    wide = shadow.to(torch.float32)
    flat_values = flatten_dense(values) if len(values) > 1 else values[0].reshape(-1)
    wide.lerp_(flat_values.to(torch.float32), weight)
    bits = wide.view(torch.int32)
    noise = torch.randint(
        0, _LOW_BITS, bits.shape, generator=generator, dtype=torch.int32, device=bits.device
    )
    bits.add_(noise).bitwise_and_(-_LOW_BITS)
    shadow.copy_(wide)  # exact: the low 16 bits are zero


def _windows(numels: list[int], size: int) -> Iterator[tuple[int, int, int]]:
    """``(first, end, offset)`` of each window of :func:`_window_ends`: its tensors and where it starts."""
    first = offset = 0
    for end in _window_ends(numels, size):
        yield first, end, offset
        first, offset = end, offset + sum(numels[first:end])


def _window_ends(numels: list[int], size: int) -> Iterator[int]:
    """Ends of consecutive runs of tensors whose sizes add up to at most ``size`` (each one fits alone)."""
    total = 0
    for i, numel in enumerate(numels):
        if total and total + numel > size:
            yield i
            total = 0
        total += numel
    yield len(numels)


def views(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Consecutive tensors over ``flat``'s memory with these shapes.

    Detached, so autograd does not know them as views: an in-place update of a view pays for view
    tracking on every call (0.1 us a tensor, a fifth of a 5,000-tensor update on one CPU core).
    """
    out, offset = [], 0
    for shape in shapes:
        numel = shape.numel()
        out.append(flat[offset : offset + numel].view(shape).detach())
        offset += numel
    return out


def moved(values: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``values`` on ``device``. Non-blocking only towards CUDA: a non-blocking copy to the host returns
    before its bytes arrive, and the CPU update that reads them next does not wait for the stream."""
    if values[0].device == device:
        return values
    non_blocking = device.type == "cuda"
    return [v.to(device, non_blocking=non_blocking) for v in values]
