"""Code other installed packages declare through entry points (``ema_average.averages``,
``ema_average.layouts``), loaded by name and one way.

Its own module because reading package metadata and importing another package's code is a job apart from
either registry: a declaration that fails to load is a one-line ``PluginError`` naming the entry point,
never a traceback from another package's import.
"""

from __future__ import annotations

from importlib import metadata

from ema_average.errors import PluginError, interrupted


def declared(group: str) -> tuple[metadata.EntryPoint, ...]:
    """What installed packages declare under ``[project.entry-points."<group>"]``, in metadata order."""
    return tuple(metadata.entry_points(group=group))


def load(entry: metadata.EntryPoint, what: str) -> object:
    """Import what ``entry`` names (``"module:attr"``, or a module), ``what`` naming it in the error.

    Whatever the import raises, a ``SystemExit`` (which would end the command silently with the plug-in's
    exit code) included, is one ``PluginError``; only a Ctrl-C is passed on as one.
    """
    try:
        return entry.load()
    except BaseException as exc:
        if interrupted(exc):
            raise
        raise PluginError(f"{what} declared as {entry.value!r} does not load: {_raised(exc)}") from None


def _raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"its import raised SystemExit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"
