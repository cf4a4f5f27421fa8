"""Every private torch API the package uses, each behind one small function, so a torch upgrade that
moves one breaks here and nowhere else.

Each docstring says where torch keeps it as of torch 2.13 (the version tested, and the oldest the package
runs on: ``torch>=2.13`` in pyproject, checked at import by ``torch_floor``) and which public API replaces
it where torch has one, with why that one is not used where it is not. Nothing here imports
``torch.distributed`` (or DCP, or fake tensors) at import time: a plain run must not pay for it. No other
module of the package names a private torch API (``tests/test_packaging.py`` checks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import _weights_only_unpickler
from torch._utils import _flatten_dense_tensors


def loaded_dtensor_class() -> type[torch.Tensor] | None:
    """DTensor's class if its module is already imported, else None (never imports it).

    Public: ``torch.distributed.tensor.DTensor`` (the private ``torch.distributed._tensor`` of torch < 2.4
    is older than the package's floor).
    """
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


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


def named_parameters_owner(parameters: object) -> torch.nn.Module | None:
    """The module whose ``named_parameters()`` generator ``parameters`` is, not yet started; else None.

    Leans on how torch 2.13 writes ``Module.named_parameters``: a generator function whose frame holds the
    module as ``self`` (read through the generator's ``gi_code`` and ``gi_frame``, which Python documents
    in ``inspect``). A torch that wrapped it otherwise gives None here: the average then simply does not
    follow parameters the module replaces. No public API names a generator's module.
    """
    if getattr(parameters, "gi_code", None) is not torch.nn.Module.named_parameters.__code__:
        return None
    frame = parameters.gi_frame  # type: ignore[attr-defined]
    owner = frame.f_locals.get("self") if frame is not None else None
    return owner if isinstance(owner, torch.nn.Module) else None


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


def foreach_lerp_(shadows: list[torch.Tensor], values: list[torch.Tensor], weight: float) -> None:
    """``shadow.lerp_(value, weight)`` for every pair, in one fused kernel launch per device and dtype.

    ``torch._foreach_lerp_`` (as of torch 2.13), what ``torch.optim`` uses for its foreach paths. Public
    equivalent, same values: a Python loop of ``lerp_``, a kernel launch and microseconds per tensor.
    """
    torch._foreach_lerp_(shadows, values, weight)


def foreach_copy_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], *, non_blocking: bool = False
) -> None:
    """``target.copy_(source)`` for every pair, in one fused launch per device and dtype.

    ``torch._foreach_copy_`` (as of torch 2.13). Public equivalent: a loop of ``copy_``, one launch each.
    """
    torch._foreach_copy_(targets, sources, non_blocking=non_blocking)


def checkpoint_offset(tensor: torch.Tensor) -> int | None:
    """Where the bytes of ``tensor``'s storage start in the file it was loaded from, for a tensor that
    ``torch.load(..., map_location="meta")`` made; None where torch recorded none.

    ``UntypedStorage._checkpoint_offset`` (as of torch 2.13), set by ``torch.load`` when
    ``torch.serialization.config.load.calculate_storage_offsets`` is on (or for meta loads); no public
    accessor. The package reads the bytes itself with ``pread`` (no mapping: a truncated file gives an
    error, not a SIGBUS).
    """
    offset = getattr(torch.Tensor.untyped_storage(tensor), "_checkpoint_offset", None)
    return offset if isinstance(offset, int) else None


def weights_only_allowed_globals() -> set[str]:
    """Every global ``torch.load(weights_only=True)`` accepts now: torch's own and those added with
    ``torch.serialization.add_safe_globals`` or ``safe_globals``, by dotted name.

    ``torch._weights_only_unpickler._get_allowed_globals`` and ``_get_user_allowed_globals`` (as of torch
    2.13). Public API: ``torch.serialization.get_safe_globals()`` lists only the user's, not torch's own.
    """
    allowed = set(_weights_only_unpickler._get_allowed_globals())
    return allowed | set(_weights_only_unpickler._get_user_allowed_globals())


def pickle_global_reader() -> Callable[[Callable[[], bytes]], tuple[str, str]]:
    """The function that reads a GLOBAL opcode's ``module`` and ``name`` lines as ``weights_only`` does,
    from a ``readline``, so a scan of a pickle reads the very names the load would.

    ``torch._weights_only_unpickler._read_global_instruction`` (as of torch 2.13); no public one.
    """
    return _weights_only_unpickler._read_global_instruction


def narrow_by_index(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The block of ``tensor`` at ``offsets`` of ``sizes`` (one ``narrow`` per dimension), as DCP's own
    ``FileSystemReader`` cuts a stored chunk to what a load asked for.

    ``torch.distributed._shard._utils.narrow_tensor_by_index`` (as of torch 2.13); imported when first
    called (DCP is slow to import). Public equivalent: ``narrow`` per dimension, which is what it does.
    """
    from torch.distributed._shard._utils import narrow_tensor_by_index

    return narrow_tensor_by_index(tensor, offsets, sizes)


def fake_tensor_mode() -> AbstractContextManager[Any]:
    """A mode in which tensors are made with shapes and dtypes but no storage: ``torch.save`` under
    ``torch.serialization.skip_data(materialize_fake_tensors=True)`` lays out a file of them.

    ``torch._subclasses.fake_tensor.FakeTensorMode`` (as of torch 2.13); imported when first called. The
    public ``torch.device("meta")`` tensors do not serve: ``torch.save`` writes no records for them.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()
