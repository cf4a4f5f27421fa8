"""What hashing a pickle's objects will cost, bounded before the pickle is loaded.

A pickle can build a tuple DAG: ``t1 = (t0, t0)``, ``t2 = (t1, t1)``... each level one memo reference
more, so 1.5 KB describes a tuple of 2^34 leaves. Building it is cheap, but Python does not cache tuple
hashes: used as a dict key (or inside a ``MetadataIndex`` used as one) it is hashed leaf by leaf, and
the load never ends. A chain of 200,000 nested tuples is short and linear, but hashing it recurses in C
and ends the process (SIGSEGV).

:func:`hashing_cost_problem` walks the opcodes once (``pickletools.genops``), following the stack and the
memo as the unpickler does but building nothing: each object's weight is the number of objects it reaches
counting shared ones each time (what hashing or comparing it visits), its depth how deeply it nests. The
weights of everything the load hashes (dict keys, set members, the arguments a class is called with) must
sum to at most ``HASH_WORK_PER_BYTE`` per byte of the file (plus ``HASH_WORK_FLOOR``), and nothing hashed
may nest deeper than ``MAX_HASHED_DEPTH``.
"""

from __future__ import annotations

import gc
import pickletools
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

# Weight summed over everything hashed, per byte of pickle; a real DCP .metadata needs under 1 per byte
# (measured on torch's and megatron-core's saves), an attack 10^7 per byte.
HASH_WORK_PER_BYTE = 16
HASH_WORK_FLOOR = 1_000_000
MAX_HASHED_DEPTH = 100  # a MetadataIndex key nests 3 deep; 200,000 levels crash the interpreter

_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET = {"GET", "BINGET", "LONG_BINGET"}
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below


class _Effect(NamedTuple):
    """An opcode's stack effect, from its declaration in ``pickletools``: how many objects it takes from
    below the mark (or from the top, without one), whether it takes a mark, how many it pushes, whether
    it changes the object below instead of making one, and which of the taken objects it hashes."""

    n_pre: int
    marked: bool
    n_after: int
    in_place: bool
    hashed: Callable[[list, list], list] | None


def _hashed(name: str) -> Callable[[list, list], list] | None:
    """Which objects an opcode hashes (``pre`` taken from the top, ``items`` above a mark): dict keys,
    set members, a class's call arguments (an enum looks its value up in a dict); None for none."""
    if name == "SETITEM":
        return lambda pre, items: pre[1:2]
    if name in ("SETITEMS", "DICT"):
        return lambda pre, items: items[0::2]
    if name in ("ADDITEMS", "FROZENSET", "INST"):
        return lambda pre, items: items
    if name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
        return lambda pre, items: pre[1:]
    if name == "OBJ":
        return lambda pre, items: items[1:]
    return None


def _effects() -> dict[str, _Effect]:
    effects = {}
    for op in pickletools.opcodes:
        before = op.stack_before
        marked = pickletools.markobject in before
        n_pre = before.index(pickletools.markobject) if marked else len(before)
        effects[op.name] = _Effect(n_pre, marked, len(op.stack_after), op.name in _IN_PLACE, _hashed(op.name))
    return effects


_EFFECTS = _effects()
_LEAF = (1, 0)  # a constant (int, string, None, a global): weight 1, nothing inside
# Opcodes that push a new empty container, which later opcodes fill in place.
_FRESH = {"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET"}


def hashing_cost_problem(data: BinaryIO, size: int) -> str | None:
    """Why loading the pickle in ``data`` (``size`` bytes, read from where it stands) would hash too much
    (``None`` where it is within the bounds): checked by walking its opcodes, before anything is built,
    and without holding the file in memory (a sparse giant fails at its first byte)."""
    gc_was = gc.isenabled()
    gc.disable()  # hundreds of thousands of small lists, none of them cyclic
    try:
        return _walk(data, size)
    except (ValueError, IndexError, KeyError) as exc:  # what the unpickler would fail on too
        return f"is damaged or not DCP metadata ({exc})"
    finally:
        if gc_was:
            gc.enable()


def _walk(data: BinaryIO, size: int) -> str | None:  # one loop over the opcodes, kept flat for speed
    budget = HASH_WORK_FLOOR + HASH_WORK_PER_BYTE * size
    cap = budget + 1  # weights saturate: a cycle (a list appended to itself) must not grow them forever
    stack: list = []  # [weight, depth] lists (objects that may grow in place) or the _LEAF tuple
    marks: list[int] = []
    memo: dict[int, Any] = {}
    spent = 0
    effects, leaf, fresh = _EFFECTS, _LEAF, _FRESH
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _GET:
            stack.append(memo[arg])
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
            continue
        if name in _PUT:
            memo[arg] = stack[-1]
            continue
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name == "STOP":
            break
        if name == "DUP":
            stack.append(stack[-1])
            continue
        if name == "POP_MARK" or (name == "POP" and marks and len(stack) == marks[-1]):
            del stack[marks.pop() :]  # POP with nothing above the mark pops the mark, as pickle does
            continue
        if name == "POP":
            stack.pop()
            continue
        n_pre, marked, n_after, in_place, hashes = effects[name]
        if not n_pre and not marked:
            if name in fresh:
                stack.append([1, 0])  # an empty container: grows in place later
            else:
                stack.extend([leaf] * n_after)
            continue
        if marked:
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
        else:
            items = []
        if n_pre > len(stack):
            raise IndexError(f"{name} finds too few objects on the stack")
        pre = stack[-n_pre:] if n_pre else []
        if n_pre:
            del stack[-n_pre:]
        if hashes is not None:
            hashed = hashes(pre, items)
            if hashed:
                spent += sum(node[0] for node in hashed)
                deepest = max(node[1] for node in hashed)
                if deepest > MAX_HASHED_DEPTH:
                    return f"hashes an object nested {deepest} deep (at most {MAX_HASHED_DEPTH}); refused"
                if spent > budget:
                    return (
                        f"would take more than {budget} steps to hash its objects "
                        f"({HASH_WORK_PER_BYTE} per byte of its {size}): shared tuples nested as keys; refused"
                    )
        parts = pre[1:] + items if in_place else pre + items
        weight = 0
        depth = 0
        for node in parts:
            weight += node[0]
            if node[1] > depth:
                depth = node[1]
        if in_place:
            target = pre[0]
            if type(target) is tuple:  # a constant changed in place: the unpickler fails there
                raise ValueError(f"{name} on an object that cannot change")
            target[0] = min(cap, target[0] + weight)
            target[1] = max(target[1], depth + 1)
            stack.append(target)  # the same object: the memo sees it grow too
        else:
            stack.extend([min(cap, 1 + weight), depth + 1] for _ in range(n_after))
    return None
