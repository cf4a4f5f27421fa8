"""Where averages are kept: one flat buffer per (device, dtype) of the tracked tensors, float32 or wider unless
the user asks for bfloat16 (``average_dtype=``).

Its own module because the storage (buckets of views, their fit check, the pinned staging and the
background host updates of CUDA values) is independent of how an average is named, decayed or saved.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from ema_average._platform.torch_compat import foreach_copy_, local_tensors
from ema_average.engine.dtensor_layouts import is_dtensor, local_part
from ema_average.engine.kernel import ema_update_, shadow_dtype, views

SHAPE = attrgetter("shape")
_KIND = attrgetter("dtype", "device")


@dataclass
class Bucket:
    """Shadows of one (source device, source dtype) kind, as views into one flat buffer.

    One flat buffer lets the mixed-dtype update scale every shadow with a single op instead of one per
    tensor, which is most of the cost on models of many small tensors. A DTensor's kind is its local
    shard's, and its shadow is shaped like that shard: each rank holds and updates its own part only.
    """

    flat: torch.Tensor
    indices: list[int]
    shadows: list[torch.Tensor]
    tracked: list[torch.Tensor]  # the tracked tensors themselves, for apply(); emptied by from_tensors
    kind: tuple[torch.dtype, torch.device]  # what every value must still be at each apply()
    sharded: list[bool] | None = (
        None  # which tracked tensors are DTensors, if any: their shards are read at each use
    )
    staging: list[torch.Tensor] = field(default_factory=list)  # pinned views (CUDA values, host averages)
    generator: torch.Generator | None = None  # the stochastic rounding's, for bfloat16 averages only
    shapes: list[torch.Size] = field(init=False)  # the shadows', read once

    def __post_init__(self) -> None:
        self.shapes = [s.shape for s in self.shadows]

    def values(self) -> list[torch.Tensor]:
        """The tracked tensors' current values on this rank (a plain attribute read per DTensor: on many
        small tensors, a function call each would cost as much as their update)."""
        if self.sharded is None:
            return self.tracked
        return local_tensors(self.tracked, self.sharded)

    def fits(self, values: list[torch.Tensor]) -> bool:
        """Whether every value still has its average's shape and the bucket's dtype and device.

        A parameter whose ``.data`` was replaced (another shape, ``.half()``, ``.to(device)``) would make
        the multi-tensor update fail midway, or broadcast silently: checked for all before any is touched,
        in C-level passes (about 0.7 us a tensor).
        """
        return list(map(SHAPE, values)) == self.shapes and set(map(_KIND, values)) <= {self.kind}


def make_buckets(
    tensors: list[torch.Tensor], device: torch.device | None, dtype: torch.dtype | None = None
) -> list[Bucket]:
    """Copy ``tensors`` (their local shards) into flat buffers, one per local device and dtype: of ``dtype``
    if given, else float32 or wider (a bfloat16 copy rounds each value to nearest, once)."""
    local = [local_part(t) for t in tensors]
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(local):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    buckets = []
    with torch.no_grad():
        for (src_device, src_dtype), indices in by_kind.items():
            flat = torch.empty(
                sum(local[i].numel() for i in indices),
                dtype=dtype or shadow_dtype(src_dtype),
                device=device or src_device,
            )
            shadows = views(flat, [local[i].shape for i in indices])
            for view, i in zip(shadows, indices, strict=True):
                view.copy_(local[i].detach())
            sources = [tensors[i] for i in indices]
            sharded = [is_dtensor(t) for t in sources]
            kind = (src_dtype, src_device)
            bucket = Bucket(flat, indices, shadows, sources, kind, sharded if any(sharded) else None)
            if src_device.type == "cuda" and flat.device.type == "cpu":
                staging = torch.empty(flat.numel(), dtype=src_dtype, pin_memory=True)
                bucket.staging = views(staging, [local[i].shape for i in indices])
            if flat.dtype == torch.bfloat16:
                bucket.generator = torch.Generator(flat.device)
            buckets.append(bucket)
    return buckets


class HostUpdates:
    """Averages kept in host memory of values on a CUDA device, updated off the training's critical path.

    ``apply()`` queues one copy of the values into pinned buffers on a side stream and returns; a worker
    thread waits for that copy and folds it into the averages while the GPU runs the next forward. The
    training stream waits (on the GPU, not the host) for the copy before its next kernels, so the next
    optimizer step cannot change a value mid-copy. Made only for CUDA values: CPU-only runs never touch it.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ema-host-update")
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pending: list[Future[None]] = []

    def start(self, bucket: Bucket, values: list[torch.Tensor], decay: float) -> None:
        """Queue one update of ``bucket`` (call :meth:`settle` first: the pinned buffers are reused)."""
        device = values[0].device
        side = self.streams.get(device) or self.streams.setdefault(device, torch.cuda.Stream(device))
        training = torch.cuda.current_stream(device)
        side.wait_stream(training)  # copy the values as this step left them
        with torch.cuda.stream(side):
            foreach_copy_(bucket.staging, values, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        training.wait_event(copied)
        self.pending.append(self.worker.submit(self._fold, bucket, copied, decay))

    @staticmethod
    def _fold(bucket: Bucket, copied: torch.cuda.Event, decay: float) -> None:
        copied.synchronize()
        ema_update_(bucket.shadows, bucket.staging, decay, flat=bucket.flat, generator=bucket.generator)

    def settle(self) -> None:
        """Wait for queued updates (raising their errors): before the averages are read or updated again."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


def describe(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> str:
    return f"{tuple(shape)} {str(dtype).removeprefix('torch.')} on {device}"
