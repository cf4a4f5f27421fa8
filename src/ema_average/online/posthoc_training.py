"""Snapshots while training: several power-function EMAs kept at once, each saved every N steps.

``PowerEmaSnapshots(model, sigma_rels=(0.05, 0.10), every=1000, folder=run / "posthoc-ema")`` keeps EDM2's
two profiles by default; ``update(step)`` after each optimizer step (``step`` = the global step, from 1)
updates every profile with the engine's multi-tensor update and, every ``every`` steps, writes one
safetensors file per profile, atomically, recording its gamma, sigma_rel, step and this tool's mark: the
folder ``ema-average FOLDER --method posthoc --sigma-rel ...`` reads. ``state_dict``/``load_state_dict``
go into the trainer's checkpoint, so a resumed run continues every profile bit for bit.

The snapshots hold float32 by default. ``dtype=torch.bfloat16`` (or float16) halves the files at a cost
per value of up to 2^-8 (bfloat16) or 2^-11 (float16) relative rounding, which the reconstruction's
coefficients can multiply by their sum of magnitudes (the plan shows it, usually 1 to 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ema_average._version import __version__
from ema_average.checkpoints.contents.own_outputs import TOOL_MARKER_KEY
from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.engine.averages import Parameters, PowerFunctionMovingAverage, check_fits, is_dtensor
from ema_average.errors import AverageStateError, ConfigurationError
from ema_average.offline.posthoc_snapshots import DEFAULT_FOLDER, GAMMA_KEY, SIGMA_REL_KEY, STEP_KEY
from ema_average.output import SafetensorsWriter, TensorEntry

__all__ = ["DEFAULT_FOLDER", "DEFAULT_SIGMA_RELS", "PowerEmaSnapshots"]

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two profiles
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensors(parameters: Parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.nn.Module):
        return list(parameters.parameters())
    if isinstance(parameters, Mapping):
        return list(parameters.values())
    return [p[1] if isinstance(p, tuple) else p for p in parameters]


class PowerEmaSnapshots:
    """Power-function EMAs of a model's parameters at several widths, snapshotted for post-hoc EMA."""

    def __init__(
        self,
        parameters: Parameters,
        sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        *,
        every: int,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"every must be a whole number of steps >= 1, got {every!r}")
        if dtype not in _DTYPES:
            raise ConfigurationError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        widths = tuple(float(s) for s in sigma_rels)
        if not widths or len(set(widths)) < len(widths):
            raise ConfigurationError(f"sigma_rels must name one or more different widths, got {sigma_rels!r}")
        if not isinstance(parameters, torch.nn.Module | Mapping):
            parameters = list(parameters)  # a generator is read once, by every average alike
        if any(is_dtensor(p) for p in _tensors(parameters)):
            raise ConfigurationError(
                "sharded (DTensor) parameters: snapshots are written whole from one process; "
                "keep PowerFunctionMovingAverage per rank and save with save_safetensors instead"
            )
        self.sigma_rels = widths
        self.every = every
        self.folder = Path(folder)
        self.dtype = dtype
        self.averages = [PowerFunctionMovingAverage(parameters, sigma_rel=s, device=device) for s in widths]
        self.last_step = 0

    def update(self, step: int) -> list[Path]:
        """Every profile updated with the parameters' current values at training step ``step`` (the first
        optimizer step is 1); a snapshot of each when ``step`` is a multiple of ``every``. Returns the
        files written (none on most steps)."""
        if isinstance(step, bool) or not isinstance(step, int) or step <= self.last_step:
            raise ConfigurationError(f"steps must increase from {self.last_step}, got {step!r}")
        for average in self.averages:
            average.apply(num_updates=step)
        self.last_step = step
        return self.snapshot() if step % self.every == 0 else []

    def snapshot(self) -> list[Path]:
        """One file per profile at the last step, each written whole or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return [self._write(average) for average in self.averages]

    def _write(self, average: PowerFunctionMovingAverage) -> Path:
        gamma = average.rule.gamma  # type: ignore[attr-defined]  # a power average: a PowerRule
        sigma_rel = self.sigma_rels[self.averages.index(average)]
        path = self.folder / f"ema-sigma_rel{sigma_rel!r}-step{self.last_step:010d}.safetensors"
        averages = average.averages()
        entries = [TensorEntry(n, TensorSpec(tuple(t.shape), self.dtype)) for n, t in averages.items()]
        metadata = {
            "format": "pt",
            TOOL_MARKER_KEY: __version__,
            GAMMA_KEY: repr(float(gamma)),
            SIGMA_REL_KEY: repr(sigma_rel),
            STEP_KEY: str(self.last_step),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        writer = SafetensorsWriter(path, entries, metadata, overwrite=True)
        try:
            for name, value in averages.items():
                check_fits(name, value, self.dtype)
                writer.write(name, value.to(self.dtype))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return path

    def state_dict(self) -> dict[str, Any]:
        """Every profile's state and the last step: saved with the trainer's checkpoint."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "every": self.every,
            "last_step": self.last_step,
            "averages": [average.state_dict() for average in self.averages],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the same widths, in the same order, or an error naming both."""
        saved = state.get("sigma_rels") if isinstance(state, Mapping) else None
        if saved is None or [float(s) for s in saved] != list(self.sigma_rels):
            raise AverageStateError(
                f"state holds profiles {saved!r}, these snapshots keep {list(self.sigma_rels)}"
            )
        last = state.get("last_step")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise AverageStateError(f"state's last_step must be a whole number >= 0, got {last!r}")
        for average, own in zip(self.averages, state["averages"], strict=True):
            average.load_state_dict(own)
        self.last_step = last
