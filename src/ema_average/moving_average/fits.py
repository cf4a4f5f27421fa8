"""``check_fits``: refuse an average that rounding to a narrower output dtype would turn into Inf.

Apart from the update because it guards what is written (the offline command's outputs, a sharded export),
not how averages are kept.
"""

from __future__ import annotations

import torch

from ema_average.errors import OutputRangeError


def check_fits(name: str, values: torch.Tensor, rounded: torch.Tensor) -> None:
    """Refuse ``rounded`` (``values`` converted to a narrower dtype) if rounding turned a finite value into
    Inf: float16 holds at most 65504, so a finite 7e4 would be written as Inf. Values already NaN or Inf
    are not this check's business. One ``aminmax`` over what is written when it fits; raises
    ``OutputRangeError`` naming the tensor, the dtype and the largest value that does not fit.
    """
    if rounded.numel() == 0 or not rounded.is_floating_point():
        return
    low, high = torch.aminmax(rounded)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    overflowed = torch.isinf(rounded) & torch.isfinite(values)
    if not bool(overflowed.any()):
        return
    largest = float(values[overflowed].abs().max())
    dtype = rounded.dtype
    raise OutputRangeError(
        f"tensor {name!r} averages to {largest:.4g}, beyond what {str(dtype).removeprefix('torch.')} holds "
        f"({torch.finfo(dtype).max:g}): it would be written as Inf; refused. Write float32 to keep it"
    )
