"""Changing a signal's disposition without CPython's race, for the command's own process.

CPython's ``signal.signal`` checks for pending signals, then changes the OS disposition, then its own
table: a signal caught between the first two is found pending with no Python handler to run, and CPython
prints "Signal N ignored due to race condition" as a traceback. :func:`settle` closes that window.
"""

from __future__ import annotations

import ctypes
import signal
import threading

from ema_average.libc import libc_call

__all__ = ["settle"]


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
    set_disposition = libc_call("signal", ctypes.c_int, ctypes.c_void_p)
    if set_disposition is not None:
        set_disposition(int(sig), int(final))
    signal.signal(sig, final)


def _ignored(signum: int, _frame: object) -> None:
    """A signal met while its disposition changes: the caller is past caring."""
