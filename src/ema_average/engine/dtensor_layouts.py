"""Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallel): telling them apart and laying
their averages out again.

Its own module because every DTensor concern (whether one is loaded at all, a rank's local shard, the mesh
and placements an average goes back out with) sits behind these few names; the rest of the engine sees
plain local tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from ema_average._platform.torch_compat import dtensor_off_mesh_device, loaded_dtensor_class, local_tensor
from ema_average.errors import AverageStateError, ParameterError

if TYPE_CHECKING:  # a type only: importing it costs a plain run 0.7 s (see _dtensor_class)
    from torch.distributed.tensor import DTensor

_DTENSOR: list[type[torch.Tensor]] = []  # DTensor's class, once its module is loaded


def _dtensor_class() -> type[torch.Tensor] | None:
    """DTensor's class if its module is loaded, else None.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so the engine never imports it
    itself: plain models (and the offline command) do not pay its 0.7 s import.
    """
    if not _DTENSOR:
        cls = loaded_dtensor_class()
        if cls is not None:
            _DTENSOR.append(cls)
    return _DTENSOR[0] if _DTENSOR else None


def is_dtensor(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard, any other tensor itself.

    It is what ``to_local()`` returns without autograd, minus the fresh view torch 2.13 adds for a
    Parameter (microseconds per tensor, every step). Read it at each use, never keep it: FSDP2 gives a
    sharded parameter a new local tensor at lazy init, ``model.to()`` or ``load_state_dict``.
    """
    return local_tensor(tensor) if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class DTensorLayout:
    """How a DTensor parameter is spread over ranks, so its average goes back out as a like DTensor.

    The global shape and stride are kept, never inferred from the local shard: FSDP2 shards dim 0
    unevenly (7 rows on 3 ranks are 3, 3 and 1) and a rank may hold none.
    """

    mesh: Any  # DeviceMesh
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> DTensorLayout | None:
        if not is_dtensor(tensor):
            return None
        placements = tuple(tensor.placements)
        if any(p.is_partial() for p in placements):
            raise ParameterError(
                f"parameter {name!r} is a partial DTensor (pending a reduction): its local part is not a "
                "shard of the parameter, so it cannot be averaged"
            )
        return cls(tensor.device_mesh, placements, tensor.shape, tensor.stride())

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """A DTensor of this layout around ``local`` (shared, not copied), which stays on its device.

        ``DTensor.from_local`` would move averages kept in host memory onto a CUDA mesh's device;
        there the DTensor is built directly, as FSDP2 builds its CPU-offloaded parameters.
        """
        cls = _dtensor_class()
        assert cls is not None
        with torch.no_grad():
            if local.device.type == self.mesh.device_type:
                return cls.from_local(  # type: ignore[attr-defined]  # cls: DTensor, typed as a Tensor class
                    local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
                )
            return dtensor_off_mesh_device(cls, local, self.mesh, self.placements, self.shape, self.stride)

    def local_of(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a saved average: a DTensor's own (redistributed if laid out otherwise) or
        the slice of a whole tensor that this layout puts here (no communication)."""
        if is_dtensor(value):
            if value.device_mesh != self.mesh:
                raise AverageStateError(
                    "a saved average is a DTensor on another device mesh; load it through "
                    "torch.distributed.checkpoint into this average's state_dict() instead"
                )
            if tuple(value.placements) != self.placements:
                value = value.redistribute(self.mesh, self.placements)
            return local_part(value)
        from torch.distributed.tensor import distribute_tensor

        return local_part(distribute_tensor(value, self.mesh, self.placements, src_data_rank=None))


def whole(value: torch.Tensor) -> torch.Tensor:
    """A saved average as one whole tensor (a DTensor is gathered from its ranks: a collective)."""
    return value.full_tensor() if is_dtensor(value) else value
