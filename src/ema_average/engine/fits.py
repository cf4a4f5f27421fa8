"""``check_fits``: refuse an average that rounding to a narrower output dtype would not hold.

Apart from the update because it guards what is written (the offline command's outputs, a sharded export),
not how averages are kept.

The test is on the values before their rounding, against the dtype's own bound, rather than on the rounded
values: float16 and float8_e5m2 round an overflow to Inf, but float8_e4m3fn saturates it to 448 (a finite,
wrong value) and the fnuz formats make it NaN; and CPU reductions such as ``aminmax`` are not implemented for
float8 at all.
"""

from __future__ import annotations

import math

import torch

from ema_average.errors import OutputRangeError

__all__ = ["check_fits", "fits", "largest_beyond", "range_message"]


def _bound(dtype: torch.dtype) -> tuple[float, bool]:
    """The magnitude half an ulp above ``dtype``'s largest finite value (where rounding to nearest leaves
    the format), and whether a value exactly there still rounds down: ties go to the even neighbour, and
    the largest value's significand is odd in IEEE formats (65504 = 2047 x 32) but even in float8_e4m3fn
    (448 = 14 x 32), whose all-ones pattern is NaN."""
    info = torch.finfo(dtype)
    ulp = 2.0 ** (math.floor(math.log2(info.max)) - round(-math.log2(info.eps)))
    return info.max + ulp / 2, (info.max / ulp) % 2 == 0


def _beyond(magnitude: float, dtype: torch.dtype) -> bool:
    bound, tie_fits = _bound(dtype)
    return magnitude > bound or (magnitude == bound and not tie_fits)


def fits(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every finite value of ``values`` rounds to a finite value of ``dtype`` (no overflow). One
    ``aminmax`` pass over ``values`` (float32 or wider) when they fit; NaN or Inf already in ``values`` are
    not this check's business (the caller's finiteness check, or the average's own values)."""
    if values.numel() == 0 or not dtype.is_floating_point:
        return True
    if torch.finfo(dtype).max >= torch.finfo(values.dtype).max:
        return True
    low, high = torch.stack(torch.aminmax(values)).tolist()  # one read back (one sync on CUDA)
    if math.isfinite(low) and math.isfinite(high):
        return not _beyond(max(-low, high), dtype)
    return largest_beyond(values, dtype) is None


def largest_beyond(values: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest magnitude among the finite ``values`` that ``dtype`` cannot hold, or None."""
    magnitudes = values.abs()
    finite = magnitudes[torch.isfinite(magnitudes)]
    if finite.numel() == 0:
        return None
    largest = float(finite.max())
    return largest if _beyond(largest, dtype) else None


def range_message(name: str, largest: float, dtype: torch.dtype) -> str:
    """The refusal's words, shared by the command and the library."""
    rounded = float(torch.tensor(largest, dtype=torch.float64).to(dtype).double())
    written = "Inf" if math.isinf(rounded) else "NaN" if math.isnan(rounded) else f"{rounded:g}"
    return (
        f"tensor {name!r} averages to {largest:.4g}, beyond what {str(dtype).removeprefix('torch.')} holds "
        f"({torch.finfo(dtype).max:g}): it would be written as {written}; refused"
    )


def check_fits(name: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse ``values`` to be written in ``dtype`` if rounding would take a finite value out of range:
    float16 holds at most 65504, so a finite 7e4 would be written as Inf; float8_e4m3fn holds 448, so 1e3
    would be written as 448. Raises ``OutputRangeError`` naming the tensor, the dtype and the largest
    value that does not fit.
    """
    if fits(values, dtype):
        return
    largest = largest_beyond(values, dtype)
    assert largest is not None  # fits() said one does not fit
    raise OutputRangeError(f"{range_message(name, largest, dtype)}. Write float32 to keep it")
