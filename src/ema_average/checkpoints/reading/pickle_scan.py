"""What unpickling a pickle will cost, bounded in one linear pass over its opcodes, before anything is built.

A pickle can build a tuple DAG: ``t1 = (t0, t0)``, ``t2 = (t1, t1)``... each level one memo reference more,
so a few hundred bytes describe a tuple of 2^34 leaves. Building it is cheap, but Python does not cache
tuple hashes: used as a dict key, a set member or an argument a call hashes, it is hashed leaf by leaf and
the load never ends. A chain of 200,000 nested tuples is short and linear, but hashing it recurses in C
and ends the process (SIGSEGV).

:func:`scan_pickle` follows the stack and the memo as the unpickler does, building nothing. One cost model:
each value's weight is what hashing it visits (every object it reaches, a shared memo reference counted
each time it is reached), its depth how deeply it nests. The weights of everything the load hashes (dict
keys, set members, the arguments of each call, taken as they are when it is called) may sum to at most
:data:`MAX_HASH_WORK_PER_BYTE` per byte of the pickle plus :data:`MAX_HASH_WORK_BASE`, and nothing hashed
may nest deeper than :data:`MAX_HASHED_DEPTH`. Two readers use it:

- torch files (``torch_opcodes=True``): only the opcodes torch's ``weights_only`` reader reads (what
  ``torch.save``'s protocol 2 writes); one of a newer protocol is refused as such, never called damage. The
  pass also lists every global the pickle names that ``is_allowed`` does not allow (so a legacy file is
  unpickled once, with all its stand-ins), refusing at the first one past ``max_kinds``.
- DCP ``.metadata`` (any protocol).

The loop is flat and dispatches on the opcode byte through a table: a 2 MB ``data.pkl`` of 20,000 tensors
is scanned in well under the time torch takes to load it (``benchmarks/pickle_scan.py``).
"""

from __future__ import annotations

import gc
import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from ema_average._platform.torch_compat import pickle_global_reader
from ema_average.checkpoints.reading.pickle_source import PickleRefused, PickleSource

_read_global = pickle_global_reader()  # what the load reads a GLOBAL with, to read the same names

# Hash work a pickle may cost: a base, plus so much per byte of the pickle. Measured: a state dict of 20,000
# tensors costs 0.19 a byte (a rebuild, ~20, in ~110 bytes), the .metadata of a 2,000-parameter model with
# AdamW 0.23 (benchmarks/pickle_scan.py); a 600-byte tuple DAG key 10^7 a byte and more.
MAX_HASH_WORK_BASE = 1_000_000
MAX_HASH_WORK_PER_BYTE = 4
MAX_HASHED_DEPTH = 100  # a MetadataIndex key nests 3 deep; 200,000 levels crash the interpreter

_LEAF = (1, 0, None)  # a constant (number, string, None, a global): weight 1, nothing inside
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


@dataclass
class ScanResult:
    """The globals a pickle names (after torch's Python 2 renames) that are not allowed, in order met, and
    the hash work charged."""

    globals: list[str] = field(default_factory=list)
    work: int = 0


# What the loop does with each opcode byte, numbered in the order the loop tests them (the most frequent
# first; literals there, a name lookup per test costs a tenth of the loop).
_TORCH = {
    "LONG_BINPUT": 1, "BINPUT": 1,  # memo[n] = top (1 or 4 bytes of n)
    "NONE": 2, "NEWTRUE": 2, "NEWFALSE": 2, "BININT": 2, "BININT1": 2, "BININT2": 2, "BINFLOAT": 2,
    "EMPTY_TUPLE": 2,  # a constant of fixed size
    "BINGET": 3, "LONG_BINGET": 3,  # push memo[n]
    "MARK": 5,
    "BINUNICODE": 6, "SHORT_BINSTRING": 7, "LONG1": 7,  # counted bytes (4- or 1-byte count)
    "TUPLE2": 8, "TUPLE1": 8, "TUPLE3": 8, "TUPLE": 9,
    "REDUCE": 10, "NEWOBJ": 10,  # a call: its arguments are hashed
    "SETITEMS": 11, "BUILD": 12, "SETITEM": 13, "APPEND": 14, "APPENDS": 14,  # change the object below
    "EMPTY_DICT": 15, "EMPTY_LIST": 15, "EMPTY_SET": 15, "BINPERSID": 16,
    "STOP": 17, "PROTO": 18, "GLOBAL": 20,
}  # fmt: skip
# Any protocol: the same, and the rest of pickle's opcodes (21: the rare ones, by their declared effect).
_ANY = {
    **_TORCH,
    "MEMOIZE": 4, "SHORT_BINUNICODE": 7, "SHORT_BINBYTES": 7, "BINBYTES": 6, "BINSTRING": 6, "FRAME": 19,
}  # fmt: skip
_OTHER = 21
_REFUSED = 99  # not read: a newer protocol, or no opcode at all
# Bytes of an argument's fixed part (its length, where counted), by how pickletools declares its size.
_COUNTED = {
    pickletools.TAKEN_FROM_ARGUMENT1: 1,
    pickletools.TAKEN_FROM_ARGUMENT4: 4,
    pickletools.TAKEN_FROM_ARGUMENT4U: 4,
    pickletools.TAKEN_FROM_ARGUMENT8U: 8,
}


def _table(actions: dict[str, int], rest: int) -> tuple[list[int], list[int]]:
    """Per opcode byte: its action, and the bytes of its argument's fixed part (a constant's whole)."""
    action, skip = [_REFUSED] * 256, [0] * 256
    for op in pickletools.opcodes:
        byte = ord(op.code)
        action[byte] = actions.get(op.name, rest)
        n = op.arg.n if op.arg is not None else 0
        skip[byte] = n if n >= 0 else _COUNTED.get(n, 0)
    return action, skip


_TORCH_TABLE = _table(_TORCH, _REFUSED)
_ANY_TABLE = _table(_ANY, _OTHER)


def scan_pickle(
    file: IO[bytes],
    size: int,
    *,
    is_allowed: Callable[[str], bool] | None = None,
    max_kinds: int = 1 << 62,
    torch_opcodes: bool = True,
    what: str = "a torch file",
) -> ScanResult:
    """Read one pickle from ``file`` (``size``: its bytes, or the bytes left in the file) up to its STOP.

    ``is_allowed(name)``: a global the reader allows as it is, not counted as a kind. ``torch_opcodes``:
    only what torch's safe reader reads; otherwise any protocol. ``what``: the file is "damaged or not
    {what}". Raises :class:`PickleRefused` past ``max_kinds`` kinds of other globals, past the hash budget
    or depth, on an opcode the reader does not read, or where the pickle is broken.
    """
    source = PickleSource(file, size, what)
    gc_was = gc.isenabled()
    gc.disable()  # hundreds of thousands of small lists, none of them cyclic
    try:
        return _walk(source, size, is_allowed or (lambda name: True), max_kinds, torch_opcodes)
    except PickleRefused:
        raise
    except (
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        struct.error,
    ) as exc:  # a mark where a value should be
        if source.pos > source.end:
            raise source.ended() from None
        if isinstance(exc, KeyError):
            raise source.damaged(f"its pickle gets memo entry {exc.args[0]}, never put") from None
        if isinstance(exc, UnicodeDecodeError):
            raise source.damaged("its pickle names a global that is not text") from None
        raise source.damaged("its pickle is malformed") from None
    finally:
        if gc_was:
            gc.enable()


def _walk(  # one flat loop: a call per opcode would double its time
    src: PickleSource, size: int, is_allowed: Callable[[str], bool], max_kinds: int, torch_opcodes: bool
) -> ScanResult:
    action, skip = _TORCH_TABLE if torch_opcodes else _ANY_TABLE
    budget = MAX_HASH_WORK_BASE + MAX_HASH_WORK_PER_BYTE * max(size, 0)
    cap = budget + 1  # weights saturate: a list appended to itself must not grow them forever
    result = ScanResult()
    seen: set[str] = set()
    stack: list = []  # [weight, depth, items] lists (items: a tuple's elements) or _LEAF
    push = stack.append
    marks: list[int] = []
    memo: dict[int, object] = {}
    spent = 0
    leaf, u32 = _LEAF, _U32.unpack_from
    buf, pos, limit = src.buf, src.pos, src.limit
    try:
        while True:
            if pos >= limit:
                src.pos = pos
                if src.eof:
                    raise src.ended()
                src.refill()
                buf, pos, limit = src.buf, src.pos, src.limit
                continue
            op = buf[pos]
            code = action[op]
            if code == 1:  # BINPUT, LONG_BINPUT
                if op == 0x72:
                    memo[u32(buf, pos + 1)[0]] = stack[-1]
                    pos += 5
                else:
                    memo[buf[pos + 1]] = stack[-1]
                    pos += 2
            elif code == 2:  # a constant
                push(leaf)
                pos += 1 + skip[op]
            elif code == 3:  # BINGET, LONG_BINGET
                if op == 0x68:
                    push(memo[buf[pos + 1]])
                    pos += 2
                else:
                    push(memo[u32(buf, pos + 1)[0]])
                    pos += 5
            elif code == 4:  # MEMOIZE
                memo[len(memo)] = stack[-1]
                pos += 1
            elif code == 5:  # MARK
                marks.append(len(stack))
                pos += 1
            elif code <= 7:  # counted bytes: a string
                if code == 6:
                    length = u32(buf, pos + 1)[0]
                    if length > size:
                        src.pos = pos
                        raise src.damaged("a string in its pickle is longer than the pickle")
                    pos += 5
                else:
                    length = buf[pos + 1]
                    pos += 2
                push(leaf)
                if pos + length <= limit:
                    pos += length
                else:
                    src.pos = pos
                    src.skip(length)
                    buf, pos, limit = src.buf, src.pos, src.limit
            elif code <= 9:  # TUPLE1..3, TUPLE: weight and depth of its elements, kept for a call's arguments
                if code == 9:
                    start = marks.pop()
                else:
                    start = len(stack) - (op - 0x84)
                    if start < 0:
                        raise IndexError
                items = stack[start:]
                del stack[start:]
                weight, depth = 1, 0
                for item in items:
                    weight += item[0]
                    if item[1] > depth:
                        depth = item[1]
                push([weight if weight < cap else cap, depth + 1, items])
                pos += 1
            elif code == 10:  # REDUCE, NEWOBJ: the arguments as they are now (a list in them may have grown)
                args = stack.pop()
                items = args[2]
                if items is None:
                    weight, depth = args[0], args[1]
                else:
                    weight, depth = 1, 0
                    for item in items:
                        weight += item[0]
                        if item[1] > depth:
                            depth = item[1]
                    depth += 1
                spent += weight
                if spent > budget or depth > MAX_HASHED_DEPTH:
                    raise _too_costly(spent, budget, depth, size)
                callee = stack[-1]
                weight += 1 + callee[0]
                stack[-1] = [weight if weight < cap else cap, max(depth, callee[1]) + 1, None]
                pos += 1
            elif code == 11:  # SETITEMS: the keys are hashed
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                for key in items[0::2]:
                    spent += key[0]
                    if key[1] > MAX_HASHED_DEPTH:
                        raise _too_costly(spent, budget, key[1], size)
                if spent > budget:
                    raise _too_costly(spent, budget, 0, size)
                _grow(stack[-1], items, cap)
                pos += 1
            elif code == 12:  # BUILD: the state goes into the object
                _grow(stack[-2], [stack.pop()], cap)
                pos += 1
            elif code == 13:  # SETITEM
                value, key = stack.pop(), stack.pop()
                spent += key[0]
                if spent > budget or key[1] > MAX_HASHED_DEPTH:
                    raise _too_costly(spent, budget, key[1], size)
                _grow(stack[-1], [key, value], cap)
                pos += 1
            elif code == 14:  # APPEND, APPENDS
                if op == 0x65:
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                else:
                    items = [stack.pop()]
                _grow(stack[-1], items, cap)
                pos += 1
            elif code == 15:  # an empty container: grows in place later
                push([1, 0, None])
                pos += 1
            elif code == 16:  # BINPERSID
                persid = stack[-1]
                stack[-1] = [min(cap, 1 + persid[0]), persid[1] + 1, None]
                pos += 1
            elif code == 17:  # STOP
                src.pos = pos + 1
                src.give_back()
                result.work = spent
                return result
            elif code == 18:  # PROTO
                pos += 2
            elif code == 19:  # FRAME: frames only group opcodes; read on as if there were none
                pos += 9
            elif code == 20:  # GLOBAL
                src.pos = pos + 1
                module, name = _read_global(src.line)
                buf, pos, limit = src.buf, src.pos, src.limit
                full = f"{module}.{name}"
                if full not in seen and not is_allowed(full):
                    seen.add(full)
                    result.globals.append(full)
                    if len(result.globals) > max_kinds:
                        raise PickleRefused(f"names more than {max_kinds} kinds of pickled objects; refused")
                push(leaf)
            elif code == _OTHER:
                src.pos = pos + 1
                spent = _other(_OPCODES[chr(op)], src, stack, marks, memo, spent, cap)
                if spent > budget:
                    raise _too_costly(spent, budget, 0, size)
                buf, pos, limit = src.buf, src.pos, src.limit
            else:
                src.pos = pos
                raise _unreadable(op, src.what)
    except (IndexError, KeyError, TypeError, ValueError, struct.error):
        src.pos = max(src.pos, pos + 1 + skip[buf[pos]])  # where the opcode that failed ends
        raise


def _grow(target: list, items: list, cap: int) -> None:
    """Items added to a list, dict, set or object: its weight and depth grow (the memo sees it grow)."""
    if type(target) is not list:  # a constant changed in place: the unpickler fails there
        raise TypeError
    weight, depth = target[0], target[1]
    for item in items:
        weight += item[0]
        if item[1] >= depth:
            depth = item[1] + 1
    target[0], target[1] = weight if weight < cap else cap, depth


def _too_costly(spent: int, budget: int, depth: int, size: int) -> PickleRefused:
    if depth > MAX_HASHED_DEPTH:
        return PickleRefused(f"hashes an object nested {depth} deep (at most {MAX_HASHED_DEPTH}); refused")
    return PickleRefused(
        f"would hash more than {budget} elements building its dict keys and call arguments (at most "
        f"{MAX_HASH_WORK_PER_BYTE} per byte of its {size} bytes of pickle, plus {MAX_HASH_WORK_BASE}): "
        "shared tuples nested as keys; refused"
    )


# Of the rare opcodes, which taken objects are hashed: dict keys, set members, a class's call arguments.
_HASHED: dict[str, Callable[[list, list], list]] = {
    "DICT": lambda pre, items: items[0::2],
    "ADDITEMS": lambda pre, items: items,
    "FROZENSET": lambda pre, items: items,
    "INST": lambda pre, items: items,
    "NEWOBJ_EX": lambda pre, items: pre[1:],
    "OBJ": lambda pre, items: items[1:],
}
_MEMO_ARG = {"GET", "PUT"}  # text opcodes whose argument is a memo index
_OPCODES = {op.code: op for op in pickletools.opcodes}  # pickletools' own code2op, which is not public


def _other(
    op: pickletools.OpcodeInfo, src: PickleSource, stack: list, marks: list, memo: dict, spent: int, cap: int
) -> int:
    """A rare opcode (text protocols, sets, buffers...), by its declaration in ``pickletools``; returns the
    hash work spent so far."""
    arg = _argument(op, src)
    if op.name in _MEMO_ARG:
        assert arg is not None  # GET and PUT declare a decimal line
        index = int(arg)
        if op.name == "GET":
            stack.append(memo[index])
        else:
            memo[index] = stack[-1]
        return spent
    if op.name == "DUP":
        stack.append(stack[-1])
        return spent
    if op.name == "POP_MARK" or (op.name == "POP" and marks and len(stack) == marks[-1]):
        del stack[marks.pop() :]  # POP with nothing above the mark pops the mark, as pickle does
        return spent
    before = op.stack_before
    marked = pickletools.markobject in before
    n_pre = before.index(pickletools.markobject) if marked else len(before)
    items: list = []
    if marked:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
    if n_pre > len(stack):
        raise IndexError
    pre = stack[len(stack) - n_pre :]
    del stack[len(stack) - n_pre :]
    hashed = _HASHED[op.name](pre, items) if op.name in _HASHED else []
    for node in hashed:
        spent += node[0]
        if node[1] > MAX_HASHED_DEPTH:
            raise _too_costly(spent, 0, node[1], 0)
    in_place = op.name == "ADDITEMS"
    parts = pre[1:] + items if in_place else pre + items
    weight = sum(node[0] for node in parts)
    depth = max((node[1] for node in parts), default=-1) + 1
    if in_place:
        target = pre[0]
        if type(target) is tuple:
            raise TypeError
        target[0], target[1] = min(cap, target[0] + weight), max(target[1], depth)
        stack.append(target)
    else:
        stack.extend([min(cap, 1 + weight), depth, None] for _ in op.stack_after)
    return spent


def _argument(op: pickletools.OpcodeInfo, src: PickleSource) -> bytes | None:
    """The raw argument of a rare opcode: fixed bytes, a line (two for a text global), or counted bytes."""
    kind = op.arg
    if kind is None:
        return None
    if kind.n >= 0:
        return src.take(kind.n)
    if kind.n == pickletools.UP_TO_NEWLINE:
        text = src.line()
        return text + src.line() if kind.name == "stringnl_noescape_pair" else text
    counter = {
        pickletools.TAKEN_FROM_ARGUMENT1: (1, None),
        pickletools.TAKEN_FROM_ARGUMENT4: (4, _I32),
        pickletools.TAKEN_FROM_ARGUMENT4U: (4, _U32),
        pickletools.TAKEN_FROM_ARGUMENT8U: (8, _U64),
    }[kind.n]
    raw = src.take(counter[0])
    count = raw[0] if counter[1] is None else counter[1].unpack(raw)[0]
    if count < 0 or count > src.size:
        raise src.damaged("a string in its pickle is longer than the pickle")
    src.skip(count)  # a string or bytes: not needed, never held
    return None


def _unreadable(op: int, what: str) -> PickleRefused:
    """An opcode the reader does not read: for torch's safe reader, a newer protocol (4: FRAME,
    STACK_GLOBAL, MEMOIZE...); or no pickle at all."""
    info = _OPCODES.get(chr(op))
    if info is None:
        return PickleRefused(f"is damaged or not {what} (byte {op:#04x} is no pickle opcode)")
    if info.proto < 3:  # protocols 0 and 1: text, not what torch.save writes; most likely no pickle at all
        return PickleRefused(
            f"is damaged or not {what} (its pickle uses opcode {info.name}, which torch.save never writes)"
        )
    return PickleRefused(
        f"is pickled with protocol {info.proto} or later (opcode {info.name}), which the safe "
        "reader (torch's weights_only, protocol 2 as torch.save writes) cannot read; refused. "
        "If you trust this file, pass --trust-pickle",
        unsafe=True,
    )
