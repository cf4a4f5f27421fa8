"""What a torch file's unpickled object holds: the state dicts in it (raw weights before averages), each
under the key that picks it, and the parts that are no model, to name in the plan.

Split from :mod:`ema_average.checkpoints.layouts.torch_file` (the reader): this module only walks the object,
bounded in depth and names, and asks :func:`ema_average.checkpoints.contents.parts.split` what each part is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.contents.keys import STATE_DICT_KEYS, is_ema_name
from ema_average.checkpoints.contents.parts import (
    KeyPath,
    Kind,
    ModelChoice,
    Part,
    described,
    mirrors,
    split,
    structure_of,
)
from ema_average.checkpoints.reading.placeholders import Placeholder, described_objects, placeholders_in
from ema_average.errors import CheckpointError, NoWeightsError, UnsafeCheckpointError

# Bounds on walking a nested state dict: a few hundred bytes of pickle can describe a loop, or a DAG
# of shared dicts with 2**40 paths through it.
MAX_DEPTH = 100
MAX_NAMES = 10_000_000


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a huge int, say
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def checked_name(path: Path, key: Any) -> str:
    """A dict key usable in a tensor name: a string that UTF-8 can encode (names are sorted and written)."""
    if not isinstance(key, str):
        raise CheckpointError(path, f"has a tensor name {_short_repr(key)} that is not a string")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            path, f"has a tensor name {_short_repr(key)} that is not valid UTF-8 text"
        ) from None
    return key


class _Flattener:
    """Walks a nested state dict once: each dict visited at most once, depth and names bounded. Records
    each tensor under its dotted name and its path of keys, and what each dict's own keys say it is
    (an optimizer's or a scheduler's state), for :func:`ema_average.checkpoints.contents.parts.split`."""

    def __init__(self, path: Path, *, whole_file: bool = False) -> None:
        self.path = path
        self.whole_file = whole_file  # optimizer state has integer keys: they are refused only in a model
        self.out: dict[str, torch.Tensor] = {}
        self.paths: list[tuple[KeyPath, torch.Tensor]] = []
        self.structure: dict[KeyPath, Kind] = {}
        self.odd: dict[str, Any] = {}  # whole file: names reached through a key that is no string
        self.seen: dict[int, str] = {}

    def walk(
        self, mapping: Mapping[Any, Any], name: str = "", depth: int = 0, keys: KeyPath = (), odd: Any = None
    ) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(self.path, f"nests dicts more than {MAX_DEPTH} deep (at {name!r}); refused")
        self.seen[id(mapping)] = name
        kind = structure_of(mapping) if isinstance(mapping, Mapping) else None
        if kind is not None:
            self.structure[keys] = kind
        prefix = f"{name}." if name else ""
        for key, value in _items(mapping):
            if not (isinstance(value, torch.Tensor) or _holds_more(value)):
                continue
            if self.whole_file and not isinstance(key, str):
                checked, odd_here = str(key), key if odd is None else odd
            else:
                checked, odd_here = checked_name(self.path, key), odd
            if isinstance(value, torch.Tensor):
                self._add(prefix + checked, (*keys, checked), value)
                if odd_here is not None:
                    self.odd[prefix + checked] = odd_here
            else:
                child = prefix + checked
                first = self.seen.get(id(value))
                if first is not None:
                    raise CheckpointError(
                        self.path,
                        f"holds the same dict at {_shown(first)} and at {child!r} "
                        "(a loop or a shared sub-dict); refused",
                    )
                self.walk(value, child, depth + 1, (*keys, checked), odd_here)

    def _add(self, name: str, keys: KeyPath, tensor: torch.Tensor) -> None:
        if name in self.out:
            raise CheckpointError(self.path, f"has two tensors named {name!r}")
        if len(self.out) >= MAX_NAMES:
            raise CheckpointError(self.path, f"has more than {MAX_NAMES} tensors; refused")
        self.out[name] = tensor
        self.paths.append((keys, tensor))


def _items(container: Mapping[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterable[tuple[Any, Any]]:
    """A dict's items; a list's under their index (Lightning's ``optimizer_states``, a list of dicts)."""
    if isinstance(container, Mapping):
        return container.items()
    return ((str(i), value) for i, value in enumerate(container))


def _holds_more(value: Any) -> bool:
    """A non-empty dict, or a list or tuple of dicts or tensors, to walk into (a list of numbers is not)."""
    if isinstance(value, Mapping):
        return bool(value)
    return isinstance(value, list | tuple) and any(isinstance(v, Mapping | torch.Tensor) for v in value)


def _shown(name: str) -> str:
    return repr(name) if name else "the top level"


def _flatten(path: Path, mapping: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    """Tensors of a (possibly nested) state dict under dotted names; non-tensor entries are left out."""
    flattener = _Flattener(path)
    flattener.walk(mapping)
    return flattener.out


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


@dataclass
class _Candidate:
    """A state dict found in a file: the key that names it and whether it is an average of the weights."""

    key: str
    value: Mapping[Any, Any]
    ema: bool


def _candidates(path: Path, obj: Mapping[str, Any]) -> tuple[list[_Candidate], list[Part[torch.Tensor]]]:
    """The state dicts ``obj`` holds, raw weights before averages, each under the key that picks it; and
    the parts that are no model (optimizer, scheduler and trainer state), to name in the plan.

    What is model, average or other state is decided by :func:`contents.split` for every trainer alike;
    only where a trainer saves its average under the raw weights' usual key is its convention applied.
    """
    found, beside = _composer_candidates(obj), []
    if not found:
        walker = _Flattener(path, whole_file=True)
        walker.walk(obj)
        parts = split(walker.paths, walker.structure, shape_of=lambda t: tuple(t.shape))
        _refuse_odd_names(path, walker.odd, parts)
        found = [
            _Candidate(p.key, p.tensors, p.kind == "average") for p in parts if p.kind in ("model", "average")
        ]
        found = _swapped_by_convention(obj, found)
        beside = [p for p in parts if p.kind not in ("model", "average")]
    return sorted(found, key=lambda c: (c.ema, _preference(c.key))), beside


def _refuse_odd_names(path: Path, odd: Mapping[str, Any], parts: list[Part[torch.Tensor]]) -> None:
    """A model or average whose names go through a key that is no string cannot be written (optimizer
    state, keyed by parameter index, may)."""
    for part in parts:
        if part.kind not in ("model", "average"):
            continue
        for name in part.tensors:
            key = odd.get(f"{part.key}.{name}" if part.key else name)
            if key is not None:
                checked_name(path, key)  # raises, naming the key


def _preference(key: str) -> int:
    """The usual keys first (``state_dict`` before ``model``...), others in the file's order."""
    return STATE_DICT_KEYS.index(key) if key in STATE_DICT_KEYS else len(STATE_DICT_KEYS)


def _swapped_by_convention(obj: Mapping[str, Any], found: list[_Candidate]) -> list[_Candidate]:
    """Trainers that save the average under the raw weights' key. Lightning's EMAWeightAveraging moves
    the raw weights to ``current_model_state``; mmengine's EMAHook (a Runner save: ``message_hub``) swaps
    the average into ``state_dict`` and keeps the raw weights in ``ema_state_dict`` as ``module.*``,
    beside the ``steps`` counter of its ``AveragedModel``."""
    keys = {c.key: c for c in found}
    if "current_model_state" in keys and "state_dict" in keys:
        keys["state_dict"].ema = True
    if "message_hub" in obj and "ema_state_dict" in keys and "state_dict" in keys:
        raw = keys["ema_state_dict"]
        raw.value = {n.removeprefix("module."): t for n, t in raw.value.items() if n.startswith("module.")}
        raw.ema, keys["state_dict"].ema = False, True
    return found


def _composer_candidates(obj: Mapping[str, Any]) -> list[_Candidate]:
    """composer: the model at ``state.model``; its EMA algorithm swaps the average into the model for
    checkpointing (``ema_weights_active``) and keeps the training weights in its own state."""
    state = obj.get("state")
    if not isinstance(state, Mapping) or not _is_state_dict(state.get("model")):
        return []
    model = _Candidate("state.model", state["model"], False)
    algorithms = state.get("algorithms")
    for entry in algorithms if isinstance(algorithms, list) else []:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and entry[0] == "EMA"):
            continue
        ema_state = entry[1] if isinstance(entry[1], Mapping) else {}
        held = ema_state.get("ema_model")
        if not isinstance(held, Mapping):
            continue
        parts = [held.get("named_parameters_dict"), held.get("named_buffers_dict")]
        merged = {k: v for part in parts if isinstance(part, Mapping) for k, v in part.items()}
        if all(name in merged for name in state["model"]):  # the saved names: persistent buffers only
            merged = {name: merged[name] for name in state["model"]}
        if not _is_state_dict(merged):
            continue
        swapped = ema_state.get("ema_weights_active") is True
        other = _Candidate("state.algorithms.EMA", merged, not swapped)
        model.ema = swapped
        return [model, other]
    return [model]


class NeedsFullUnpickling(Exception):
    """The weights are a pickled model object and the user trusts the file (``--trust-pickle``): it is
    unpickled again, fully, so that the model's own class gives its state dict."""


def as_mapping(path: Path, obj: Any, *, trust_pickle: bool, trusted: bool) -> Mapping[Any, Any]:
    """The loaded object as a dict to look for weights in. Where the file was fully unpickled
    (``trusted``), a pickled ``nn.Module`` (the object, or a top-level value such as ultralytics'
    ``ema``) is replaced by its ``state_dict()``: only its own class knows which tensors that holds."""
    if trusted and isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if trusted and isinstance(obj, Mapping):
        return {k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in obj.items()}
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Placeholder) and obj.module_like:
        raise _pickled_model(path, {"": obj}, trust_pickle)
    shown = f"pickled {obj.pickled_name} object" if isinstance(obj, Placeholder) else type(obj).__name__
    raise CheckpointError(path, f"holds a {shown}, not a state dict (a whole pickled model?)")


def _pickled_model(
    path: Path, models: Mapping[str, Placeholder], trust_pickle: bool
) -> UnsafeCheckpointError | NeedsFullUnpickling:
    """The weights are pickled model objects (their class's code gives their state dict): refused in one
    line naming them, or unpickled again fully where the user trusts the file."""
    if trust_pickle:
        return NeedsFullUnpickling()
    shown = ", ".join(f"{k}: {p.pickled_name}" if k else p.pickled_name for k, p in models.items())
    package = next(iter(models.values())).pickled_name.partition(".")[0]
    return UnsafeCheckpointError(
        path,
        f"its weights are a pickled model object ({shown}), not a state dict: only its class's code "
        f"gives them. With --trust-pickle and {package!r} importable, its state dict is read",
    )


def _any_model(held: list[Placeholder]) -> bool:
    return any(p.module_like for p in held)


def find_state_dict(
    path: Path, obj: Mapping[str, Any], key: str | None, *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], str | None, ModelChoice | None]:
    """The weights ``obj`` holds (under ``key`` where given), the key that held them, and the choice
    among the state dicts found, with what else the file holds (pickled objects included)."""
    if key is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _flatten(path, obj), None, None
    candidates, beside = _candidates(path, obj)
    chosen = next((c for c in candidates if c.key == key), None) if key is not None else None
    if key is not None and chosen is None:
        held = obj.get(key)
        if isinstance(held, Placeholder) and held.module_like:  # --submodel ema, ultralytics
            raise _pickled_model(path, {key: held}, trust_pickle)
        return _by_dotted_key(path, obj, key), key, None
    if chosen is None and candidates:
        chosen = candidates[0]
    objects = placeholders_in(obj)
    if chosen is None:
        models = {
            k: next(p for p in held if p.module_like) for k, held in objects.items() if _any_model(held)
        }
        if models:
            raise _pickled_model(path, models, trust_pickle)
        keys = ", ".join(_short_repr(k) for k in list(obj)[:8])
        held = "; ".join(text for text in (described(beside), described_objects(objects)) if text)
        held = f"; it holds {held}" if held else ""
        raise NoWeightsError(
            path,
            f"no state dict found (top-level keys: {keys}{held}); "
            "name the key holding the weights with --state-dict-key",
        )
    tensors = _flatten(path, chosen.value)
    return tensors, chosen.key, _choice(path, chosen, candidates, tensors, beside, objects)


def _choice(
    path: Path,
    chosen: _Candidate,
    candidates: list[_Candidate],
    tensors: dict[str, torch.Tensor],
    beside: list[Part[torch.Tensor]],
    objects: dict[str, list[Placeholder]],
) -> ModelChoice | None:
    """The other state dicts of the same model (same names: an average, not an optimizer's state), and
    what else the file holds that is not averaged (pickled objects: loaded as placeholders, not read)."""
    others = {}
    for c in candidates:
        if c is not chosen and mirrors(_flatten(path, c.value), tensors):
            said = c.ema and not is_ema_name(c.key)  # mmengine's state_dict, swapped: say it is the EMA
            others[c.key] = f"the average; --state-dict-key {c.key}" if said else f"--state-dict-key {c.key}"
    if not others and not chosen.ema and not beside and not objects:
        return None
    held = "; ".join(text for text in (described(beside), described_objects(objects)) if text)
    return ModelChoice(chosen.key, others, average=chosen.ema, beside=held)


def _by_dotted_key(path: Path, obj: Mapping[str, Any], key: str) -> dict[str, torch.Tensor]:
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise CheckpointError(path, f"has no state dict under --state-dict-key {key!r}")
        value = value[part]
    if not _is_state_dict(value):
        raise CheckpointError(path, f"the value under --state-dict-key {key!r} holds no tensors")
    return _flatten(path, value)
