"""What a checkpoint holds: the model's weights told apart from optimizer state, schedulers, trainer state
and averaged copies, by structure and names, in any container. One rule for every layout.

Trainers save far more than the model: torchtitan flattens model weights to the top level beside
``optimizer.state.<fqn>.exp_avg``, ``lr_scheduler`` and ``train_state``; torchtnt nests them under
``app_state.{module, optimizer, train_progress}``; Lightning keeps ``state_dict`` beside
``optimizer_states``, ``loops`` and ``callbacks``; mmengine beside ``meta``, ``message_hub`` and
``param_schedulers``. Rules per trainer do not reach the wild, so the split is decided from what such saves
have in common:

- a container is *marked* by its key (``optimizer``, ``lr_scheduler``, ``train_state``, ``ema``...: the
  lists are in :mod:`ema_average.checkpoints.keys`) or by its own structure (``state`` beside
  ``param_groups`` is a torch optimizer's state dict; ``last_epoch`` beside ``base_lrs`` a scheduler's);
  a marked container is a part of that kind, whatever it holds;
- tensors named ``<parameter>.exp_avg`` (or another optimizer moment) where ``<parameter>`` is a tensor of
  the same part are optimizer state, wherever they sit;
- an average must mirror the model (most names shared, ``module.`` aside): a submodule that merely has
  ``ema`` in its name stays part of the model;
- what is left is the model. A container that holds nothing but one unmarked container (``state_dict``,
  ``app_state`` -> ``module``) is looked through, so the model's names are its own.

The tree is given as paths of keys from the root to each tensor: ``("state_dict", "encoder.weight")`` for a
torch dict, ``("optimizer", "state", "encoder", "weight", "exp_avg")`` for a DCP name split at its dots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from ema_average.checkpoints.keys import CONTAINER_KEYS, OPTIMIZER_MOMENTS, kind_of_key

Kind = Literal["model", "average", "optimizer", "scheduler", "trainer"]
KINDS: tuple[Kind, ...] = ("model", "average", "optimizer", "scheduler", "trainer")
Leaf = TypeVar("Leaf")
KeyPath = tuple[str, ...]


@dataclass
class Part(Generic[Leaf]):
    """One thing a checkpoint holds: where it sits (``key``, dotted, ``""`` for the top level), what it is,
    and its tensors under names relative to ``key``."""

    key: str
    kind: Kind
    tensors: dict[str, Leaf] = field(default_factory=dict)


@dataclass
class _Node(Generic[Leaf]):
    leaves: dict[str, Leaf] = field(default_factory=dict)
    children: dict[str, _Node[Leaf]] = field(default_factory=dict)
    structure: Kind | None = None  # what the container's own non-tensor keys say it is

    def items(self, prefix: str = "") -> Iterator[tuple[str, Leaf]]:
        for name, leaf in self.leaves.items():
            yield prefix + name, leaf
        for name, child in self.children.items():
            yield from child.items(f"{prefix}{name}.")

    def empty(self) -> bool:
        return not self.leaves and not self.children


def split(
    leaves: Iterable[tuple[KeyPath, Leaf]],
    structure: Mapping[KeyPath, Kind] | None = None,
    *,
    dotted: bool = False,
) -> list[Part[Leaf]]:
    """The parts of one checkpoint: models first, then averages, optimizer, scheduler and trainer state.

    ``structure`` names containers whose own non-tensor keys say what they are (:func:`structure_of`).
    Two or more models come back where the unmarked rest is several copies of one model side by side
    (Lightning's ``current_model_state`` beside ``state_dict``): the caller chooses among them. ``dotted``
    says the paths are names split at their dots (DCP), where containers are the model's own modules and
    two alike (``norm.weight``, ``output.weight``) are no copies.
    """
    through = (lambda key: key in CONTAINER_KEYS) if dotted else (lambda key: True)
    rest, parts = _take_marked(_tree(leaves, structure or {}), (), through)
    parts = _models(rest, through, copies=not dotted) + parts
    parts = _moments_apart(parts)
    parts = _averages_that_mirror(parts)
    return sorted((p for p in parts if p.tensors), key=lambda p: KINDS.index(p.kind))


def structure_of(mapping: Mapping[object, object]) -> Kind | None:
    """What a dict is by its own keys: a torch optimizer's state dict, or an LR scheduler's."""
    keys = {k for k in mapping if isinstance(k, str)}
    if {"state", "param_groups"} <= keys:
        return "optimizer"
    if "last_epoch" in keys and keys & {"base_lrs", "_step_count", "_last_lr"}:
        return "scheduler"
    return None


def _tree(leaves: Iterable[tuple[KeyPath, Leaf]], structure: Mapping[KeyPath, Kind]) -> _Node[Leaf]:
    root: _Node[Leaf] = _Node()
    for path, leaf in leaves:
        _at(root, path[:-1]).leaves[path[-1]] = leaf
    for path, kind in structure.items():
        _at(root, path).structure = kind
    return root


def _at(root: _Node[Leaf], path: KeyPath) -> _Node[Leaf]:
    node = root
    for key in path:
        node = node.children.setdefault(key, _Node())
    return node


def _mark(key: str, node: _Node[Leaf]) -> Kind | None:
    return node.structure or kind_of_key(key)


def _marked_below(node: _Node[Leaf]) -> bool:
    return any(_mark(key, child) is not None or _marked_below(child) for key, child in node.children.items())


def _take_marked(
    node: _Node[Leaf], path: KeyPath, through: Callable[[str], bool]
) -> tuple[_Node[Leaf], list[Part[Leaf]]]:
    """``node`` without its marked containers, wherever they sit, and the parts they make (nothing inside
    a marked container is split further: an optimizer's ``state`` is all optimizer state)."""
    rest: _Node[Leaf] = _Node(leaves=dict(node.leaves))
    parts: list[Part[Leaf]] = []
    for key, child in node.children.items():
        marked = _mark(key, child)
        if marked is not None:
            parts.append(Part(".".join((*path, key)), marked, dict(child.items())))
            continue
        kept, found = _take_marked(child, (*path, key), through)
        parts += found
        if not kept.empty():
            rest.children[key] = kept
    return rest, parts


def _models(rest: _Node[Leaf], through: Callable[[str], bool], *, copies: bool) -> list[Part[Leaf]]:
    """The model: all that is not marked, as one part; or, where it is several copies of one model side by
    side (each a container, two of them sharing most names), one part each."""
    path: KeyPath = ()
    while not rest.leaves and len(rest.children) == 1 and through(next(iter(rest.children))):
        ((key, child),) = rest.children.items()
        path, rest = (*path, key), child
    alike = [dict(child.items()) for child in rest.children.values()] if copies and not rest.leaves else []
    if any(mirrors(a, b) for i, a in enumerate(alike) for b in alike[i + 1 :]):
        return [_part(child, (*path, key), "model", through) for key, child in rest.children.items()]
    return [] if rest.empty() else [_part(rest, path, "model", through)]


def _part(node: _Node[Leaf], path: KeyPath, kind: Kind, through: Callable[[str], bool]) -> Part[Leaf]:
    """One part; a container holding only one container is looked through (``state_dict`` -> its names)."""
    while not node.leaves and len(node.children) == 1 and through(next(iter(node.children))):
        ((key, child),) = node.children.items()
        path, node = (*path, key), child
    return Part(".".join(path), kind, dict(node.items()))


def _moments_apart(parts: list[Part[Leaf]]) -> list[Part[Leaf]]:
    """Optimizer moments saved among a model's tensors (``<parameter>.exp_avg``) become an optimizer part."""
    found: list[Part[Leaf]] = []
    for part in parts:
        if part.kind != "model":
            found.append(part)
            continue
        moments = {n: t for n, t in part.tensors.items() if _is_moment(n, part.tensors)}
        kept = {n: t for n, t in part.tensors.items() if n not in moments}
        found.append(Part(part.key, "model", kept))
        if moments:
            found.append(Part(part.key, "optimizer", moments))
    return found


def _is_moment(name: str, tensors: Mapping[str, object]) -> bool:
    head, _, last = name.rpartition(".")
    return last in OPTIMIZER_MOMENTS and head in tensors


def _averages_that_mirror(parts: list[Part[Leaf]]) -> list[Part[Leaf]]:
    """An average is a copy of the model: one that shares few names with any model is a submodule that
    happens to be called ``ema`` (a VQ codebook's, say), and goes back into the model it sits in."""
    models = [p for p in parts if p.kind == "model"]
    kept: list[Part[Leaf]] = []
    for part in parts:
        if part.kind != "average" or not models or any(mirrors(part.tensors, m.tensors) for m in models):
            kept.append(part)
            continue
        home = next((m for m in models if _inside(part.key, m.key)), None)
        if home is None:
            kept.append(part)  # no model it could belong to: an average saved alone
            continue
        inner = part.key[len(home.key) + 1 :] if home.key else part.key
        home.tensors.update({f"{inner}.{name}": t for name, t in part.tensors.items()})
    return kept


def mirrors(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Two state dicts of one model: most names shared, with or without a wrapper's ``module.`` prefix
    (``torch.optim.swa_utils.AveragedModel`` and mmengine's EMA keep the model as ``module``)."""
    names_a = {n.removeprefix("module.") for n in a}
    names_b = {n.removeprefix("module.") for n in b}
    return bool(names_a and names_b) and len(names_a & names_b) * 2 >= min(len(names_a), len(names_b))


def _inside(key: str, container: str) -> bool:
    return container == "" or key.startswith(container + ".")


def described(parts: Iterable[Part[Leaf]]) -> str:
    """``optimizer state (optimizer_states), trainer state (loops, callbacks)``: what is not averaged,
    for the plan."""
    kinds: dict[str, list[str]] = {}
    for part in parts:
        kinds.setdefault(part.kind, []).append(part.key or "the top level")
    return ", ".join(f"{kind} state ({', '.join(keys)})" for kind, keys in kinds.items())
