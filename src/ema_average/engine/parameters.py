"""What an average is built from: the named tensors given, and where a module keeps each one.

Its own module because turning what the user passed (pairs, a mapping, a module, a ``named_parameters()``
generator) into checked names and tensors, finding FSDP2 modules to reshard and the slots to follow a
replaced parameter into are one job, done once at construction.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import torch

from ema_average._platform.torch_compat import named_parameters_owner, parameter_slots
from ema_average.errors import ParameterError

NamedParameter = tuple[str, torch.Tensor]
# What an average is built from: (name, tensor) pairs, a mapping, or a module (its named_parameters, and
# for FSDP2 the modules to reshard around a swap).
Parameters: TypeAlias = Iterable[NamedParameter] | Mapping[str, torch.Tensor] | torch.nn.Module


def named_tensors(parameters: Parameters) -> list[NamedParameter]:
    """Materialise and validate what the user passed, so every later error is impossible."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
    items = list(parameters.items() if isinstance(parameters, Mapping) else parameters)
    if not items:
        raise ParameterError("no parameters to average: the iterable of (name, tensor) was empty")
    seen: set[str] = set()
    for name, tensor in items:
        if name in seen:
            raise ParameterError(f"parameter name {name!r} appears twice; names must be unique")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise ParameterError(f"parameter {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise ParameterError(
                f"parameter {name!r} has dtype {tensor.dtype}; only floating-point tensors can be averaged"
            )
    return items


def fsdp_modules(parameters: Parameters) -> list[torch.nn.Module]:
    """The FSDP2 modules of a model given whole, which a swap reshards.

    FSDP2 keeps the root module's gathered parameters after a forward (backward needs them next), so
    averages swapped into the shards would not reach the next forward, nor the training weights put back.
    """
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if cls is None or not isinstance(parameters, torch.nn.Module):
        return []
    return [m for m in parameters.modules() if isinstance(m, cls)]


# Where a module keeps a tracked parameter: its owner's ``_parameters`` dict and the key in it.
Slot: TypeAlias = tuple[dict[str, Any], str]


def owner_module(parameters: Parameters) -> torch.nn.Module | None:
    """The module whose parameters these are, when it can be known: the module itself, or the one whose
    ``named_parameters()`` generator was passed (not yet started). Anything else (a list, a dict, a filtered
    generator) names no module. Read once, when an average is made; ``apply()`` then only looks the
    parameters up in the slots :func:`module_slots` finds in that module."""
    if isinstance(parameters, torch.nn.Module):
        return parameters
    return named_parameters_owner(parameters)


def module_slots(owner: torch.nn.Module | None, params: list[torch.Tensor]) -> list[Slot] | None:
    """Each tracked parameter's slot in ``owner``, to follow a parameter the module replaces
    (``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``); None if not all are found.

    Not under FSDP2, which swaps its sharded and gathered parameters in these slots at every forward.
    """
    if owner is None or fsdp_modules(owner):
        return None
    where: dict[int, Slot] = {}
    for module in owner.modules():
        own = parameter_slots(module)
        for key, param in own.items():
            if param is not None:
                where.setdefault(id(param), (own, key))
    slots = [where[id(p)] for p in params if id(p) in where]
    return slots if len(slots) == len(params) else None
