"""Every private torch API the package uses, each behind one small function, so a torch upgrade that
moves one breaks here and nowhere else.

Each docstring says where torch keeps it as of torch 2.13 (the version tested; the package allows
torch >= 2.1) and which public API replaces it where torch has one, with why that one is not used where
it is not. Nothing here imports ``torch.distributed`` at import time: a plain run must not pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors

# Where DTensor's class lives: its public module (torch >= 2.4), then its private one (before torch 2.4).
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def loaded_dtensor_class() -> type[torch.Tensor] | None:
    """DTensor's class if its module is already imported, else None (never imports it).

    torch >= 2.4: ``torch.distributed.tensor.DTensor`` (public); before: ``torch.distributed._tensor``.
    """
    for name in _DTENSOR_MODULES:
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, the very tensor it holds (``_local_tensor``, as of torch 2.13).

    Public API: ``DTensor.to_local()``, which returns this very tensor only under ``no_grad`` and not for
    a Parameter: otherwise an autograd node, or (torch 2.13) a fresh view for a Parameter, microseconds a
    tensor at every step.
    """
    return tensor._local_tensor  # type: ignore[attr-defined]


def local_tensors(tensors: Sequence[torch.Tensor], sharded: Sequence[bool]) -> list[torch.Tensor]:
    """Each tensor's local shard where ``sharded`` says it is a DTensor, else the tensor itself.

    One attribute read per DTensor, inline (``_local_tensor``, as of torch 2.13): on many small
    tensors a call each (``to_local()``, see :func:`local_tensor`) would cost as much as their update.
    """
    pairs = zip(tensors, sharded, strict=True)
    return [t._local_tensor if d else t for t, d in pairs]  # type: ignore[attr-defined]


def dtensor_off_mesh_device(
    cls: Callable[..., torch.Tensor],  # DTensor's class: (local, spec, *, requires_grad)
    local: torch.Tensor,
    mesh: Any,
    placements: tuple[Any, ...],
    shape: torch.Size,
    stride: tuple[int, ...],
) -> torch.Tensor:
    """A DTensor of ``cls`` around ``local`` that stays on its device though the mesh's is another (host
    averages of a CUDA mesh), as FSDP2 builds its CPU-offloaded parameters.

    ``torch.distributed.tensor._dtensor_spec`` (as of torch 2.13). The public ``DTensor.from_local(...,
    run_check=False, shape=..., stride=...)`` is used wherever the devices match; it would move
    ``local`` onto the mesh's device here.
    """
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    meta = TensorMeta(shape, stride, local.dtype)
    spec = DTensorSpec(mesh, placements, tensor_meta=meta)
    return cls(local, spec, requires_grad=False)


def parameter_slots(module: torch.nn.Module) -> dict[str, Any]:
    """The dict ``module`` keeps its own parameters in (``_parameters``, as of torch 2.13), live: a
    parameter the module replaces later shows up in it.

    Public API: ``named_parameters(recurse=False)``, a snapshot, which cannot follow a replacement.
    """
    return module._parameters


def flatten_dense(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements end to end in one new 1-D tensor, concatenated in C++.

    ``torch._utils._flatten_dense_tensors`` (as of torch 2.13). Public equivalent, same values:
    ``torch.cat([t.reshape(-1) for t in tensors])``, at a Python call per tensor.
    """
    return _flatten_dense_tensors(tensors)


def default_store() -> Any:
    """The store of the default process group (torchrun's rendezvous store), to share keys without a
    collective.

    ``torch.distributed.distributed_c10d._get_default_store`` (as of torch 2.13); torch 2.13 has no
    public accessor for the store ``init_process_group`` made.
    """
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def dcp_storage_info_class() -> type:
    """DCP's record of where a chunk's bytes lie in a data file (``FileSystemReader`` metadata).

    ``torch.distributed.checkpoint.filesystem._StorageInfo`` (as of torch 2.13); no public name.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


def layout_unpickler() -> Callable[[str], torch.layout]:
    """The function a pickled ``torch.layout`` names to rebuild itself.

    ``torch.serialization._get_layout`` (as of torch 2.13): pickles name it, so no public one can
    stand in.
    """
    return torch.serialization._get_layout
