"""The update kernel: ``shadow <- decay * shadow + (1 - decay) * value`` over many tensors at once.

Its own module because it is the arithmetic the online average and the offline command share (streaming.py
calls ``ema_update_`` directly), and it needs nothing of an average's bookkeeping: tensors in, tensors
updated. The flat-buffer helpers (``views``, ``moved``) live here with it, as the buckets build on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ema_average._torch_compat import flatten_dense


def shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype an average of ``dtype`` values is kept in: never narrower than float32.

    A bf16 shadow at decay 0.9999 adds 1e-4 * (value - shadow), which is below bf16's resolution
    for most weights, so the average silently stops moving; float32 has the headroom, float64 stays.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements of narrower values converted per pass before their lerp: a 4 MiB float32 scratch (or the largest
# tensor, if larger), whatever the model's size.
_CONVERT_NUMEL = 1 << 20


def ema_update_(
    shadows: list[torch.Tensor], values: list[torch.Tensor], decay: float, flat: torch.Tensor | None = None
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
    """
    if not shadows:
        return
    weight = 1.0 - decay
    if shadows[0].dtype == values[0].dtype:
        torch._foreach_lerp_(shadows, values, weight)
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
            torch._foreach_lerp_(shadows[first:end], converted, weight)
        first, offset = end, offset + span


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
