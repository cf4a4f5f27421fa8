"""The names a model loads, in every checkpoint of a run alike: wrapper prefixes stripped on reading.

A wrapper prefixes every name of the module it wraps: ``module.`` (``DistributedDataParallel``,
``nn.DataParallel``), ``_orig_mod.`` (``torch.compile``), nested in either order. A run compiled from
mid-run on, or resumed under DDP, saves some checkpoints with the prefix and some without; the model itself
loads the names without. So each checkpoint's names lose the wrapper prefixes that *all* its names carry
(an ``AveragedModel``'s ``module.*`` beside ``n_averaged`` keeps its names), and the user's
``--strip-prefix`` where a name carries it, before checkpoints are compared, selected or written.
"""

from __future__ import annotations

from typing import Any

import torch

from ema_average.checkpoints.base import Checkpoint, SavedModel, StepInfo, TensorSpec
from ema_average.errors import ConfigurationError

# Prefixes that wrappers give every name of the module they wrap (DDP and DataParallel; torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def wrapper_prefix(names: list[str]) -> str:
    """The wrapper prefixes every name starts with (``_orig_mod.module.``), ``""`` if none; a name must
    keep something after them."""
    prefix = ""
    while names:
        step = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
        if step is None or any(len(n) <= len(prefix + step) for n in names):
            return prefix
        prefix += step
    return prefix


class Renamed(Checkpoint):
    """A checkpoint read under other names: ``names`` maps each new name to the one saved. Everything
    else is the checkpoint's own (its step, notes, choices and any layout attribute)."""

    def __init__(self, inner: Checkpoint, names: dict[str, str], stripped: str) -> None:
        super().__init__(inner.path)
        self.inner = inner
        self.layout = inner.layout
        self.lazy = inner.lazy
        self.notes = inner.notes
        self.choices = inner.choices
        self.final_copy = inner.final_copy
        self.stripped = stripped
        self._saved = names
        self._new = {old: new for new, old in names.items()}
        specs = inner.specs()
        self._specs = {new: specs[old] for new, old in names.items()}

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def saved_model(self) -> SavedModel | None:
        return self.inner.saved_model

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(self._saved[name])

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_into(self._saved[name], out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_range_into(self._saved[name], start, out)

    def aliases(self) -> dict[str, str]:
        return {self._new[a]: self._new[b] for a, b in self.inner.aliases().items() if a in self._new}

    def metadata_step(self) -> StepInfo | None:
        return self.inner.metadata_step()

    def name_step(self) -> StepInfo | None:
        return self.inner.name_step()

    def close(self) -> None:
        self.inner.close()


def with_model_names(ckpt: Checkpoint, strip_prefix: str = "") -> Checkpoint:
    """``ckpt`` under the names its model loads: without the wrapper prefixes all its names carry, and
    without ``strip_prefix`` where a name starts with it; ``ckpt`` itself where nothing changes."""
    saved = list(ckpt.specs())
    wrapper = wrapper_prefix(saved)
    names: dict[str, str] = {}
    for old in saved:
        new = old[len(wrapper) :]
        if strip_prefix and new.startswith(strip_prefix) and len(new) > len(strip_prefix):
            new = new[len(strip_prefix) :]
        if new in names:
            raise ConfigurationError(
                f"{ckpt.path}: --strip-prefix makes {names[new]!r} and {old!r} both {new!r}"
            )
        names[new] = old
    if all(new == old for new, old in names.items()):
        return ckpt
    stripped = " and ".join(repr(p) for p in (wrapper, strip_prefix) if p)
    return Renamed(ckpt, names, stripped)


def stripped_of(ckpt: Checkpoint) -> str | None:
    """What was stripped from ``ckpt``'s names (for the plan), or None."""
    return ckpt.stripped if isinstance(ckpt, Renamed) else None
