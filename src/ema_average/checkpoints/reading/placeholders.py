"""Objects a trainer pickles beside its weights, loaded as inert placeholders: no code of theirs is imported.

mmengine's ``message_hub`` (``HistoryBuffer`` objects), ultralytics' pickled model, olmo-core's and
other trainers' own classes name globals of packages the reader need not have. For a global that is
not on torch's allow list, not data we stand in for (:mod:`safe_unpickle`) and not a dangerous callable,
the unpickler is handed a :class:`Placeholder` subclass made for that name: constructing it, giving it
state or calling ``getattr`` on it builds another placeholder, and nothing else works on it. So the
file's tensors load, and no code the file names is imported or run.

Refused, as before, are globals of the standard library (``os.system``, ``builtins.eval``,
``subprocess``, ``importlib``, ``functools.partial``, ``pickle``...) and of torch itself except its
``nn.Module`` classes: those are callables that do things, and a file naming them is refused with
``--trust-pickle`` named. ``builtins.getattr`` is allowed only on a placeholder (mmengine pickles
``getattr(HistoryBuffer, "min")`` for a method); on anything else it is refused.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch

# The longest name a placeholder keeps: a chain of getattr's must not build ever longer strings.
MAX_NAME = 200

# How many kinds of objects one file may name (each gets a class of its own while it is loaded).
MAX_PLACEHOLDERS = 1024

# How many placeholders under one key are looked at to name them in the plan.
LISTED = 64


class RefusedCall(Exception):
    """A call the pickle asks for that we never make (``getattr`` on a real object): the file is refused.

    Not a ``pickle.UnpicklingError``, which torch rewraps into its own long message."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Placeholder:
    """An object of a class the file names but we never import: it records ``module.name`` and holds
    nothing else (its state, tensors included, is dropped: tensors inside an object are not weights).

    ``module_like``: its state looked like an ``nn.Module``'s (``_parameters`` and ``_modules``): a
    pickled model, whose weights only its own class can give (``state_dict()``).
    """

    __slots__ = ("module_like", "pickled_name")
    kind: ClassVar[str] = "object"
    module_like: bool
    pickled_name: str

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        made = object.__new__(cls)
        object.__setattr__(made, "pickled_name", cls.kind)
        object.__setattr__(made, "module_like", False)
        return made

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0]
        module_like = isinstance(state, dict) and {"_parameters", "_modules"} <= state.keys()
        object.__setattr__(self, "module_like", module_like)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.pickled_name} is a placeholder (not read): it takes no attributes")

    def __reduce__(self) -> Any:
        raise TypeError(f"{self.pickled_name} is a placeholder (not read): it cannot be pickled again")

    def __repr__(self) -> str:
        return f"<{self.pickled_name} object (not read)>"


def placeholder_class(name: str) -> type[Placeholder]:
    """A class of its own for the global ``name``, so that torch's allow list can map the name to it."""
    return type(name.rpartition(".")[2] or "Placeholder", (Placeholder,), {"__slots__": (), "kind": name})


def named(name: str) -> Placeholder:
    """A placeholder for something reached from another (``HistoryBuffer.min``)."""
    made = Placeholder()
    object.__setattr__(made, "pickled_name", name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "...")
    return made


def inert_getattr(obj: Any, name: Any, *default: Any) -> Placeholder:
    """``builtins.getattr`` as a pickle may use it: only on a placeholder, giving another; never run."""
    if isinstance(obj, Placeholder):
        base: str | None = obj.pickled_name
    else:
        base = obj.kind if isinstance(obj, type) and issubclass(obj, Placeholder) else None
    if base is None or not isinstance(name, str) or len(default) > 1:
        raise RefusedCall(f"builtins.getattr on {type(obj).__name__!r}")
    return named(f"{base}.{name}")


def may_stand_in(name: str) -> bool:
    """Whether the global ``name`` (``module.qualname``) may load as a placeholder: not a callable of the
    standard library or of torch (which do things), a torch ``nn.Module`` class aside."""
    module, _, attribute = name.rpartition(".")
    top = module.partition(".")[0]
    if not module or not all(part.isidentifier() for part in name.split(".")):
        return False
    if top in sys.stdlib_module_names:
        return False
    if top == "torch":
        return _torch_module_class(module, attribute)
    return True


def _torch_module_class(module: str, attribute: str) -> bool:
    """A torch ``nn.Module`` class (``torch.nn.modules.conv.Conv2d``), looked up only in modules already
    imported, without ``__getattr__`` (nothing is imported for the file)."""
    loaded = sys.modules.get(module)
    found = vars(loaded).get(attribute) if loaded is not None else None
    return isinstance(found, type) and issubclass(found, torch.nn.Module)


def placeholders_in(obj: Any, limit: int = LISTED) -> dict[str, list[Placeholder]]:
    """The placeholders a loaded object holds, by the top-level key they sit under (``""``: the object
    itself); at most ``limit`` per key, each container visited once."""
    found: dict[str, list[Placeholder]] = {}
    seen: set[int] = set()
    tops = obj.items() if isinstance(obj, dict) else [("", obj)]
    for key, value in tops:
        stack = [value]
        while stack:  # not recursive: a pickle can nest lists deeper than Python's stack
            value = stack.pop()
            if isinstance(value, Placeholder):
                held = found.setdefault(str(key), [])
                if len(held) < limit:
                    held.append(value)
            elif isinstance(value, dict | list | tuple) and id(value) not in seen:
                seen.add(id(value))
                stack.extend(reversed(list(value.values() if isinstance(value, dict) else value)))
    return found


def described_objects(found: dict[str, list[Placeholder]]) -> str:
    """``message_hub: mmengine.logging.history_buffer.HistoryBuffer objects (not read)``, for the plan."""
    texts = []
    for key, held in found.items():
        kinds = list(dict.fromkeys(p.pickled_name for p in held))
        more = (
            "" if len(kinds) <= 3 else " and more" if len(held) >= LISTED else f" and {len(kinds) - 3} more"
        )
        shown = ", ".join(kinds[:3]) + more
        texts.append(f"{key or 'the top level'}: {shown} object{'s' if len(held) > 1 else ''} (not read)")
    return "; ".join(texts)
