"""A pickle's globals and its cost, learnt in one linear pass over its opcodes, before anything is built.

torch's ``weights_only`` unpickler reads a small set of opcodes (those ``torch.save``'s protocol 2 writes).
This pass reads the same set, builds nothing, and says in one go:

- every global the pickle names (so a legacy file is unpickled once, with all its stand-ins, instead of once
  per refused name), refusing at the first name past the cap on kinds;
- an opcode the safe reader cannot read (a pickle of protocol 4 or later): said as such, never "damaged";
- how much hashing building it would cost. Tuple hashes are not cached: a tuple DAG of a few hundred bytes
  (each level a pair of the level below) expands to 2^n elements, hashed in full each time it is a dict key
  or a set member. Each value carries the size of its expansion (saturating); each dict key, and each call
  whose arguments hold items that may be hashed (``set``, ``OrderedDict``, ``Counter`` of a list), is charged
  that much, and the whole pickle may be charged at most :data:`MAX_HASH_WORK_BASE` plus
  :data:`MAX_HASH_WORK_PER_BYTE` per byte of the pickle.

Used for torch files (zip and legacy). The checks are generic (no torch names), so a restricted unpickler of
another format can call :func:`scan_pickle` on its bytes first.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from torch._weights_only_unpickler import _read_global_instruction

# Hash work a pickle may cost: a base, plus so much per byte of the pickle. A state dict's keys are strings
# (one unit each, several bytes each); a tensor's rebuild charges its arguments (~15 units in ~60 bytes).
MAX_HASH_WORK_BASE = 1_000_000
MAX_HASH_WORK_PER_BYTE = 4
_CAP = 1 << 62  # costs saturate here (no big integers)
_U32 = struct.Struct("<I")


class PickleRefused(ValueError):
    """The pickle cannot or may not be read; ``unsafe``: refused as unreadable by the safe reader (a newer
    protocol), not as damage."""

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


class _Value:
    """What the scan keeps of a value: ``cost``, the work of hashing it (its expansion, for a tuple);
    ``content``, the work of hashing its items again (a list's, a dict's keys, a call's arguments)."""

    __slots__ = ("content", "cost", "items")

    def __init__(self, cost: int = 1, content: int = 0, items: list[_Value] | None = None) -> None:
        self.cost = cost
        self.content = content
        self.items = items  # a tuple's elements


_SCALAR = _Value()  # never changed: only containers (made fresh) are added to


@dataclass
class ScanResult:
    """The globals a pickle names (after torch's Python 2 renames), in order met, and the hash work charged."""

    globals: list[str] = field(default_factory=list)
    work: int = 0


# opcode byte -> bytes of argument that follow it (the scalars torch's reader knows)
_FIXED = {
    0x4E: 0,  # N NONE
    0x88: 0,  # NEWTRUE
    0x89: 0,  # NEWFALSE
    0x4A: 4,  # J BININT
    0x4B: 1,  # K BININT1
    0x4D: 2,  # M BININT2
    0x47: 8,  # G BINFLOAT
}


def scan_pickle(
    file: IO[bytes],
    size: int,
    *,
    is_allowed: Callable[[str], bool],
    max_kinds: int,
) -> ScanResult:
    """Read one pickle from ``file`` (``size``: its bytes, or the bytes left in the file) up to its STOP.

    ``is_allowed(name)``: a global the reader allows as it is, not counted as a kind. Raises
    :class:`PickleRefused` past ``max_kinds`` kinds of other globals, past the hash budget, on an opcode
    torch's safe reader does not read, or where the pickle is broken.
    """
    read, readline = file.read, file.readline
    budget = MAX_HASH_WORK_BASE + MAX_HASH_WORK_PER_BYTE * max(size, 0)
    result = ScanResult()
    seen: set[str] = set()
    stack: list[object] = []
    metastack: list[list[object]] = []
    memo: dict[int, object] = {}

    def charge(work: int) -> None:
        result.work = min(result.work + work, _CAP)
        if result.work > budget:
            raise PickleRefused(
                f"would hash more than {budget} elements building its dict keys (a key that is a tuple "
                f"of tuples shared many times over expands exponentially); at most {MAX_HASH_WORK_PER_BYTE} "
                f"per byte of its pickle, plus {MAX_HASH_WORK_BASE}, are allowed"
            )

    def pop_mark() -> list[object]:
        nonlocal stack
        items = stack
        stack = metastack.pop()
        return items

    def exact(n: int) -> bytes:
        data = read(n)
        if len(data) != n:
            raise PickleRefused("is damaged or not a torch file (its pickle ends early)")
        return data

    try:
        while True:  # the opcodes torch.save writes most often first (BINPUT and BINGET: every object)
            key = read(1)
            if not key:
                raise PickleRefused("is damaged or not a torch file (its pickle ends early)")
            op = key[0]
            if op == 0x71:  # q BINPUT
                memo[exact(1)[0]] = stack[-1]
            elif op == 0x68:  # h BINGET
                stack.append(_memo_get(memo, exact(1)[0]))
            elif op == 0x58:  # X BINUNICODE
                (n,) = _U32.unpack(exact(4))
                if n > size:
                    raise PickleRefused(
                        "is damaged or not a torch file (a string in its pickle is longer than the pickle)"
                    )
                exact(n)
                stack.append(_SCALAR)
            elif op == 0x28:  # ( MARK
                metastack.append(stack)
                stack = []
            elif 0x85 <= op <= 0x87:  # TUPLE1..3
                n = op - 0x84
                if len(stack) < n:
                    raise IndexError
                items = stack[-n:]
                del stack[-n:]
                stack.append(_tuple(items))
            elif op == 0x74:  # t TUPLE
                items = pop_mark()  # first: it rebinds ``stack``
                stack.append(_tuple(items))
            elif op in _FIXED:  # None, booleans, ints, floats
                exact(_FIXED[op])
                stack.append(_SCALAR)
            elif op == 0x52 or op == 0x81:  # R REDUCE, NEWOBJ
                args = stack.pop()
                work = _call_work(args)
                charge(work)
                stack[-1] = _Value(min(1 + args.cost, _CAP), work)  # type: ignore[attr-defined]
            elif op == 0x75:  # u SETITEMS
                items = pop_mark()
                work = sum(v.cost for v in items[::2])  # type: ignore[attr-defined]
                charge(work)
                _add(stack[-1], work)
            elif op == 0x73:  # s SETITEM
                _value, key_value = stack.pop(), stack.pop()
                charge(key_value.cost)  # type: ignore[attr-defined]
                _add(stack[-1], key_value.cost)  # type: ignore[attr-defined]
            elif op == 0x29:  # ) EMPTY_TUPLE
                stack.append(_SCALAR)
            elif op in (0x5D, 0x7D, 0x8F):  # ] EMPTY_LIST, } EMPTY_DICT, EMPTY_SET
                stack.append(_Value())
            elif op == 0x72:  # r LONG_BINPUT
                memo[_U32.unpack(exact(4))[0]] = stack[-1]
            elif op == 0x6A:  # j LONG_BINGET
                stack.append(_memo_get(memo, _U32.unpack(exact(4))[0]))
            elif op == 0x61:  # a APPEND
                item = stack.pop()
                _add(stack[-1], item.cost)  # type: ignore[attr-defined]
            elif op == 0x65:  # e APPENDS
                items = pop_mark()
                _add(stack[-1], sum(v.cost for v in items))  # type: ignore[attr-defined]
            elif op == 0x62:  # b BUILD
                stack.pop()
            elif op == 0x51:  # Q BINPERSID
                stack.pop()
                stack.append(_Value())
            elif op == 0x55 or op == 0x8A:  # U SHORT_BINSTRING, LONG1
                exact(exact(1)[0])
                stack.append(_SCALAR)
            elif op == 0x63:  # c GLOBAL
                module, name = _read_global_instruction(readline)
                full = f"{module}.{name}"
                if full not in seen and not is_allowed(full):
                    seen.add(full)
                    result.globals.append(full)
                    if len(result.globals) > max_kinds:
                        raise PickleRefused(f"names more than {max_kinds} kinds of pickled objects; refused")
                stack.append(_Value())
            elif op == 0x80:  # PROTO
                exact(1)
            elif op == 0x2E:  # . STOP
                return result
            else:
                raise _unreadable(op)
    except (IndexError, AttributeError, TypeError):  # an empty stack, a mark where a value should be
        raise PickleRefused("is damaged or not a torch file (its pickle is malformed)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, PickleRefused):
            raise
        raise PickleRefused(
            "is damaged or not a torch file (its pickle names a global that is not text)"
        ) from None


def _unreadable(op: int) -> PickleRefused:
    """An opcode torch's safe reader does not read: a newer protocol (4: FRAME, STACK_GLOBAL, MEMOIZE...),
    or not a pickle at all."""
    info = pickletools.code2op.get(chr(op))
    if info is None:
        return PickleRefused(f"is damaged or not a torch file (byte {op:#04x} is no pickle opcode)")
    if info.proto < 3:  # protocols 0 and 1: text, not what torch.save writes; most likely no pickle at all
        return PickleRefused(
            f"is damaged or not a torch file (its pickle uses opcode {info.name}, which torch.save never writes)"
        )
    return PickleRefused(
        f"is pickled with protocol {info.proto} or later (opcode {info.name}), which the safe "
        "reader (torch's weights_only, protocol 2 as torch.save writes) cannot read; refused. "
        "If you trust this file, pass --trust-pickle",
        unsafe=True,
    )


def _memo_get(memo: dict[int, object], index: int) -> object:
    if index not in memo:
        raise PickleRefused(f"is damaged or not a torch file (its pickle gets memo entry {index}, never put)")
    return memo[index]


def _sum(a: int, b: int) -> int:
    return min(a + b, _CAP)


def _tuple(items: list[object]) -> _Value:
    """A tuple: hashing it hashes every element, down every shared branch (the expansion)."""
    cost = 1 + sum(item.cost for item in items)  # type: ignore[attr-defined]
    return _Value(min(cost, _CAP), items=items)  # type: ignore[arg-type]


def _add(container: object, work: int) -> None:
    """Items added to a list, dict or set: the work of hashing them again where it is passed to a call."""
    if container is _SCALAR or not isinstance(container, _Value):
        raise TypeError
    container.content = _sum(container.content, work)


def _call_work(args: object) -> int:
    """What a call may hash of its arguments: each argument, and the items of each (``set(list)``,
    ``OrderedDict(pairs)``, ``Counter(tuple)``), as they are when it is called."""
    if not isinstance(args, _Value):
        raise TypeError
    work = _sum(args.cost, args.content)
    for item in args.items or ():
        work = _sum(work, item.content)
    return work
