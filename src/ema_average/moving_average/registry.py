"""Averages other installed packages declare, found by name through the ``ema_average.averages``
entry-point group.

Its own module because reading package metadata and importing another package's code is a job apart from
the registry itself (``MovingAverage.register`` and ``by_name``), which calls it only for unknown names.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from ema_average.errors import PluginError, interrupted

if TYPE_CHECKING:
    from ema_average.moving_average.engine import MovingAverage

ENTRY_POINT_GROUP = "ema_average.averages"  # where other packages declare their averages, by name


def declared_averages() -> tuple[metadata.EntryPoint, ...]:
    """The averages installed packages declare: ``name = "module:Class"`` (or just the module that
    registers it) under ``[project.entry-points."ema_average.averages"]``."""
    return tuple(metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_declared(name: str, base: type[MovingAverage]) -> None:
    """Import the average declared as ``name`` and register it in ``base``'s registry under that name;
    nothing if none is.

    A declaration that fails to load, or names no moving average, is a one-line ``PluginError`` naming the
    package's entry point, never a traceback from another package's import: whatever its import raises, a
    ``SystemExit`` (which would end the command silently with the plug-in's exit code) included; only a
    Ctrl-C is passed on as one.
    """
    for entry in declared_averages():
        if entry.name != name:
            continue
        try:
            loaded = entry.load()
        except BaseException as exc:
            if interrupted(exc):
                raise
            raise PluginError(
                f"the average {name!r} declared as {entry.value!r} does not load: {_raised(exc)}"
            ) from None
        if isinstance(loaded, type) and issubclass(loaded, base):
            base.register(name)(loaded)
        if name not in base._registry:
            raise PluginError(
                f"the average {name!r} declared as {entry.value!r} is not a registered MovingAverage subclass"
            )
        return


def _raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"its import raised SystemExit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"
