"""What the callbacks read from a model: its parameters inside the trainer's wrappers, which are averaged,
the averaged model's state dict, a digest of the training weights, and the refusal of parameters the
callbacks cannot average (ZeRO-3, FSDP's flat parameters)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence

import torch

from ema_average.engine.averages import is_dtensor, local_part
from ema_average.errors import ConfigurationError

__all__ = [
    "average_model_state",
    "averaged_parameters",
    "averaged_tensors",
    "laid_out_as",
    "refuse_unsupported",
    "unwrap_model",
    "weights_digest",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DeepSpeed wrappers: the names its own ``state_dict`` has."""
    inner = getattr(model, "module", None)
    while isinstance(inner, torch.nn.Module) and (
        isinstance(model, torch.nn.parallel.DistributedDataParallel)
        or type(model).__name__ == "DeepSpeedEngine"
    ):
        model, inner = inner, getattr(inner, "module", None)
    return model


def refuse_unsupported(model: torch.nn.Module, dtensor_refusal: str | None) -> None:
    """Refuse, before the first step, parameters the callbacks cannot average and save correctly.

    ZeRO-3 partitions parameters and gathers them only inside forward: an average of the empty placeholders
    would be a silent wrong EMA; FSDP (the first) flattens them into shards named for none of them. Sharded
    DTensor parameters (FSDP2, tensor parallel) the engine averages shard by shard; a callback that cannot
    save such averages passes ``dtensor_refusal``, the reason it gives.
    """
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ConfigurationError(
            "the model is wrapped in FSDP (FullyShardedDataParallel), whose flat parameters are not the "
            "model's: the EMA callbacks cannot average them; use FSDP2 (fully_shard) under Lightning, DDP, "
            "or ExponentialMovingAverage(model) in the loop"
        )
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise ConfigurationError(
                f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (empty outside forward): the EMA "
                "callback cannot average it; use ZeRO stage 1 or 2, or DDP"
            )
        if dtensor_refusal is not None and is_dtensor(param):
            raise ConfigurationError(
                f"parameter {name!r} is sharded (a DTensor: FSDP2 or tensor parallel): {dtensor_refusal}"
            )


def averaged_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer moves (all of them if none is trainable, as for a model only evaluated).

    A frozen parameter's average is the parameter itself, bit for bit (``lerp`` of equal values), so it is
    saved from the model like a buffer rather than kept twice: a LoRA run does not hold a float32 copy of
    its frozen base model. A parameter unfrozen later in the run is not averaged.
    """
    named = list(model.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    return trainable or named


def averaged_tensors(model: torch.nn.Module, buffers: str) -> list[tuple[str, torch.Tensor]]:
    """What an EMA keeps: :func:`averaged_parameters`, and with ``buffers="average"`` the floating-point
    buffers the model saves (batch-norm running statistics, as timm and Lightning's EMAWeightAveraging do).

    Integer buffers (``num_batches_tracked``) and buffers the model does not save (causal masks, rotary
    tables) are the model's own, never averaged; with ``buffers="copy"`` every buffer is.
    """
    named: list[tuple[str, torch.Tensor]] = list(averaged_parameters(model))
    if buffers == "average":
        saved = set(model.state_dict(keep_vars=True))
        named += [(n, b) for n, b in model.named_buffers() if n in saved and b.is_floating_point()]
    return named


def weights_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """A SHA-256 of the named tensors' names, dtypes, shapes and raw bytes (this rank's part of a DTensor).

    Recorded beside a saved EMA with the training weights it was saved with, and compared on resume with
    the weights the trainer has just restored: the EMA continued is the one of exactly those weights,
    whatever folder they were found in, never another run's.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        value = local_part(tensor).detach()
        digest.update(f"{name}|{str(value.dtype).removeprefix('torch.')}|{tuple(value.shape)}\n".encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def average_model_state(
    model: torch.nn.Module, averages: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every averaged tensor's entry (tied names included) replaced by its
    average.

    Buffers not averaged and frozen parameters are the model's own: what ``load_state_dict`` /
    ``from_pretrained`` needs to rebuild the averaged model. The averages are the live float32 tensors, not
    copies.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    by_identity = {id(t): name for name, t in tensors if name in averages}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = by_identity.get(id(value))
        state[key] = averages[name] if name is not None else value.detach()
    return state


def laid_out_as(live: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A whole saved average of a sharded one as this rank's shard alone (a DTensor of ``live``'s layout,
    cut locally with no communication), so that resuming holds one whole tensor at a time, not the model."""
    if not is_dtensor(live) or not isinstance(saved, torch.Tensor) or is_dtensor(saved):
        return saved  # checked, and loaded or refused, by the engine's load_state_dict
    if tuple(saved.shape) != tuple(live.shape):
        return saved  # the engine names the mismatch
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh, placements = live.device_mesh, live.placements
    shard = distribute_tensor(saved.to(live.device), mesh, placements, src_data_rank=None)
    local = local_part(shard).clone()  # not a view that keeps the whole tensor alive
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=live.shape, stride=live.stride()
    )
