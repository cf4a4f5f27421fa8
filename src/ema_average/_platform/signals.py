"""Changing a signal's disposition without CPython's race, for the command's own process (the tools;
:mod:`ema_average._platform.process` decides when, and tells the whole Ctrl-C story).

CPython's ``signal.signal`` checks for pending signals, then changes the OS disposition, then its own
table: a signal caught between the first two is found pending with no Python handler to run, and CPython
prints "Signal N ignored due to race condition" as a traceback. :func:`settle` closes that window.

:func:`deferred` holds Ctrl-C and SIGTERM over a step that must not be cut in two (naming several outputs).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from ema_average._platform.libc import libc_call

__all__ = ["INTERRUPTS", "deferred", "settle"]

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)  # what a user sends to stop a run

_Handler = Callable[[int, FrameType | None], object]


def settle(sig: signal.Signals, final: signal.Handlers) -> None:
    """Give ``sig`` its ``final`` disposition (``SIG_IGN`` or ``SIG_DFL``) with no window for a signal to
    arrive mid-swap; only the main thread may, elsewhere (or where it has that disposition already) nothing
    changes.

    A Python no-op first (a pending signal raises from the swap through the old handler: swap again);
    then the OS disposition through libc, after which no new signal is caught; then Python's record of it,
    whose check runs anything caught meanwhile through the no-op. (libc by hand: ``signal.signal`` sets
    both at once, with that window.)
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(sig) is final:
        return
    while True:
        try:
            signal.signal(sig, _ignored)
            break
        except KeyboardInterrupt:
            continue
    _os_then_python(sig, final)


def _os_then_python(sig: signal.Signals, final: signal.Handlers) -> None:
    """From a Python handler to ``SIG_IGN``/``SIG_DFL``: the OS first, so that whatever is caught before
    it runs through the Python handler still in place (by ``signal.signal``'s own check)."""
    set_disposition = libc_call("signal", ctypes.c_int, ctypes.c_void_p)
    if set_disposition is not None:
        set_disposition(int(sig), int(final))
    signal.signal(sig, final)


def _ignored(signum: int, _frame: object) -> None:
    """A signal met while its disposition changes: the caller is past caring."""


@contextlib.contextmanager
def deferred(signals: tuple[signal.Signals, ...] = INTERRUPTS) -> Iterator[None]:
    """Hold ``signals`` over the block: one that arrives meanwhile is recorded, not acted on, and sent
    again once the block has finished, to whatever disposition the signal has then (Ctrl-C ignored by
    then is dropped; a default SIGTERM ends the process). If the block raises, a recorded signal is
    dropped: the block's own error is what is true.

    Only Python handlers and the default disposition are held (an ignored signal needs nothing); only the
    main thread runs Python handlers, so elsewhere nothing changes. A signal pending at entry acts
    through the old handler, before the block starts. (Swapping one Python handler for another leaves the
    OS disposition alone, and from ``SIG_DFL`` the check runs after the table is set: no race.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    held: dict[signal.Signals, signal.Handlers | _Handler] = {}
    try:
        for sig in signals:
            before = signal.getsignal(sig)
            if callable(before) or before is signal.SIG_DFL:  # not ignored, nor set outside Python (None)
                signal.signal(sig, record)
                held[sig] = before
    except BaseException:
        _give_back(held, record)
        raise
    try:
        yield
    except BaseException:  # handlers back, what was caught dropped
        _give_back(held, record)
        raise
    _give_back(held, record)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


def _give_back(held: dict[signal.Signals, signal.Handlers | _Handler], record: _Handler) -> None:
    """Each held signal's handler as it was, unless changed meanwhile (then that change stands)."""
    for sig, before in held.items():
        if signal.getsignal(sig) is not record:
            continue
        if callable(before):
            signal.signal(sig, before)
        else:
            _os_then_python(sig, before)
