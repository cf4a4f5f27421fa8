"""What a checkpoint holds: the model's weights told apart from optimizer state, schedulers, trainer state
and averaged copies, by structure and names, in any container. One rule for every layout.

Trainers save far more than the model: torchtitan flattens model weights to the top level beside
``optimizer.state.<fqn>.exp_avg``, ``lr_scheduler`` and ``train_state``; torchtnt nests them under
``app_state.{module, optimizer, train_progress}``; Lightning keeps ``state_dict`` beside
``optimizer_states``, ``loops`` and ``callbacks``; mmengine beside ``meta``, ``message_hub`` and
``param_schedulers``. Rules per trainer do not reach the wild, so the split is decided from what such saves
have in common:

- a container is *marked* by its key (``optimizer``, ``lr_scheduler``, ``train_state``, ``ema``...: the
  lists are in :mod:`ema_average.checkpoints.contents.keys`) or by its own structure (``state`` beside
  ``param_groups`` is a torch optimizer's state dict; ``last_epoch`` beside ``base_lrs`` a scheduler's);
  a marked container is a part of that kind, whatever it holds;
- tensors named ``<parameter>.exp_avg`` (or another optimizer moment) where ``<parameter>`` is a tensor of
  the same part are optimizer state, wherever they sit;
- an average must mirror the model (most names shared, ``module.`` aside): a submodule that merely has
  ``ema`` in its name stays part of the model;
- what is left is the model. A container that holds nothing but one unmarked container (``state_dict``,
  ``app_state`` -> ``module``) is looked through, so the model's names are its own;
- where a container of the rest is a module's state dict (a flat dict of tensors), what sits beside it is
  not the model, whatever its key: 0-d tensors beside it (nanoGPT's ``best_val_loss``) are trainer state, and a sibling container that holds per-parameter state (tensors under parameter indexes, each
  beside same-shaped companions: fastai's ``opt.state.N.{grad_avg, sqr_avg}``) or whose tensors repeat
  the model's shapes more than once (moments of every parameter) is optimizer state.

The tree is given as paths of keys from the root to each tensor: ``("state_dict", "encoder.weight")`` for a
torch dict, ``("optimizer", "state", "encoder", "weight", "exp_avg")`` for a DCP name split at its dots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from ema_average.checkpoints.contents.keys import CONTAINER_KEYS, OPTIMIZER_MOMENTS, kind_of_key

Kind = Literal["model", "average", "optimizer", "scheduler", "trainer"]
KINDS: tuple[Kind, ...] = ("model", "average", "optimizer", "scheduler", "trainer")
Leaf = TypeVar("Leaf")
KeyPath = tuple[str, ...]


@dataclass
class ModelChoice:
    """Which of the models in a unit was read, and how to read each of the others instead."""

    read: str
    others: dict[str, str] = field(default_factory=dict)  # name -> the flag that reads it
    average: bool = False  # what was read is itself an average (no raw weights were found)
    beside: str = ""  # what else the unit holds that is no model (optimizer, scheduler, trainer state)

    def describe(self) -> str:
        what = self.read
        if self.average:  # asked for by name beside the raw weights, or all the unit holds
            what += " (an average)" if self.others else " (an average: no raw weights found beside it)"
        also = ", ".join(f"{name} ({flag})" for name, flag in self.others.items())
        text = f"read {what}" + (f"; also here: {also}" if also else "")
        return text + (f"; not averaged: {self.beside}" if self.beside else "")


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


Shape = tuple[int, ...]


def split(
    leaves: Iterable[tuple[KeyPath, Leaf]],
    structure: Mapping[KeyPath, Kind] | None = None,
    *,
    dotted: bool = False,
    shape_of: Callable[[Leaf], Shape] | None = None,
) -> list[Part[Leaf]]:
    """The parts of one checkpoint: models first, then averages, optimizer, scheduler and trainer state.

    ``structure`` names containers whose own non-tensor keys say what they are (:func:`structure_of`).
    Two or more models come back where the unmarked rest is several copies of one model side by side
    (Lightning's ``current_model_state`` beside ``state_dict``): the caller chooses among them. ``dotted``
    says the paths are names split at their dots (DCP), where containers are the model's own modules and
    two alike (``norm.weight``, ``output.weight``) are no copies. ``shape_of`` gives a leaf's shape, for the
    rules by shape (a 0-d tensor is no weight beside a model; optimizer state mirrors the model's shapes).
    """
    through = (lambda key: key in CONTAINER_KEYS) if dotted else (lambda key: True)
    rest, parts = _take_marked(_tree(leaves, structure or {}), (), through)
    path: KeyPath = ()
    if not dotted:  # torch form: a module's state dict is one flat dict of tensors
        path, rest = _looked_through(rest, path, through)
        rest, parts_beside = _beside_the_model(rest, path, shape_of)
        parts += parts_beside
    parts = _models(rest, path, through, copies=not dotted) + parts
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


def _looked_through(
    node: _Node[Leaf], path: KeyPath, through: Callable[[str], bool]
) -> tuple[KeyPath, _Node[Leaf]]:
    """Past containers that hold nothing but one container (``state_dict``, ``app_state`` -> ``module``)."""
    while not node.leaves and len(node.children) == 1 and through(next(iter(node.children))):
        ((key, child),) = node.children.items()
        path, node = (*path, key), child
    return path, node


def _beside_the_model(
    rest: _Node[Leaf], path: KeyPath, shape_of: Callable[[Leaf], Shape] | None
) -> tuple[_Node[Leaf], list[Part[Leaf]]]:
    """``rest`` without what sits beside a module's state dict in it, and the parts that makes: 0-d tensors
    beside it (trainer state: a metric, a loss) and containers of optimizer state (by structure). A tensor
    of one or more dimensions beside it may be a parameter of the model (a positional embedding saved
    beside its encoder's state dict), and stays."""
    modules = [key for key, child in rest.children.items() if _is_state_dict(child)]
    if not modules:
        return rest, []
    scalars = {n: leaf for n, leaf in rest.leaves.items() if shape_of is not None and shape_of(leaf) == ()}
    others = {n: leaf for n, leaf in rest.leaves.items() if n not in scalars}
    kept: _Node[Leaf] = _Node(leaves=others, children=dict(rest.children), structure=rest.structure)
    parts = [Part(".".join((*path, name)), "trainer", {name: leaf}) for name, leaf in scalars.items()]
    model = max((rest.children[key] for key in modules), key=lambda node: len(node.leaves))
    for key, child in rest.children.items():
        if child is not model and _holds_optimizer_state(child, model, shape_of):
            parts.append(Part(".".join((*path, key)), "optimizer", dict(child.items())))
            del kept.children[key]
    return kept, parts


def _is_state_dict(node: _Node[Leaf]) -> bool:
    """A module's state dict in torch form: tensors under their own names, no container between them."""
    return len(node.leaves) >= 2 and not node.children


def _holds_optimizer_state(
    node: _Node[Leaf], model: _Node[Leaf], shape_of: Callable[[Leaf], Shape] | None
) -> bool:
    """Per-parameter state (tensors under parameter indexes, with same-shaped or moment companions), or
    tensors that repeat the model's shapes more than once: an optimizer's, whatever it is called."""
    if _per_parameter(node, shape_of):
        return True
    # a flat state dict repeating the model's shapes is another module (a decoder twice the encoder's depth)
    return (
        shape_of is not None and not _is_state_dict(node) and _mirrors_shapes(node, model, shape_of, times=2)
    )


def _per_parameter(node: _Node[Leaf], shape_of: Callable[[Leaf], Shape] | None) -> bool:
    """Somewhere in ``node``, entries keyed by index (``state.0``, ``state.1``) each holding a few tensors
    under undotted names, of which two share a shape or one is named as an optimizer moment."""
    entries = node.children
    indexed = bool(entries) and all(key.isdigit() and not e.children for key, e in entries.items())
    if indexed and any(_companions(e, shape_of) for e in entries.values()):
        return True
    return any(_per_parameter(child, shape_of) for child in node.children.values())


def _companions(entry: _Node[Leaf], shape_of: Callable[[Leaf], Shape] | None) -> bool:
    names = list(entry.leaves)
    if not names or any("." in name for name in names):
        return False
    if any(name in OPTIMIZER_MOMENTS for name in names):
        return True
    if shape_of is None:
        return False
    shapes = [shape_of(leaf) for leaf in entry.leaves.values() if shape_of(leaf)]
    return len(shapes) != len(set(shapes))


def _mirrors_shapes(
    node: _Node[Leaf], model: _Node[Leaf], shape_of: Callable[[Leaf], Shape], *, times: int
) -> bool:
    """Whether every shape of the model's (non-scalar) tensors occurs at least ``times`` times as often
    among ``node``'s tensors: a copy of the model repeated, as an optimizer's moments are."""
    wanted = Counter(s for _, leaf in model.items() if (s := shape_of(leaf)))
    held = Counter(s for _, leaf in node.items() if (s := shape_of(leaf)))
    return bool(wanted) and all(held[s] >= times * n for s, n in wanted.items())


def _models(
    rest: _Node[Leaf], path: KeyPath, through: Callable[[str], bool], *, copies: bool
) -> list[Part[Leaf]]:
    """The model: all that is not marked, as one part; or, where it is several copies of one model side by
    side (each a container, two of them sharing most names), one part each."""
    path, rest = _looked_through(rest, path, through)
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
