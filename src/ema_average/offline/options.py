"""What an offline run is asked to do: :class:`RunOptions`, filled by the command line from its flags (or by
a script calling :func:`ema_average.average_checkpoints`). The fixed lists the flags offer are in
:mod:`.choices`, torch-free for ``--help``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ema_average.checkpoints.discovery.run_steps import StepsFrom
from ema_average.offline.plan import AverageSettings, CheckpointSelection, TensorSelection

__all__ = ["RunOptions"]


@dataclass
class RunOptions:
    """Everything an offline run needs; the CLI fills it from its flags.

    ``settings`` may be several: each is averaged in the same pass over the checkpoints (read once) and
    written to an output of its own, named for what sets it apart (``run-ema-decay0.999.safetensors``).
    """

    checkpoint_dir: Path
    output: Path | None = None
    device: str = "cpu"
    settings: AverageSettings | Sequence[AverageSettings] = field(default_factory=AverageSettings)
    dtype: str = "as-input"
    overwrite: bool = False
    max_shard_size: int | None = None
    selection: TensorSelection = field(default_factory=TensorSelection)
    state_dict_key: str | None = None
    steps_from: StepsFrom = "auto"
    trust_pickle: bool = False
    checkpoints: CheckpointSelection = field(default_factory=CheckpointSelection)
    resume: Path | None = None  # continue this earlier output with the checkpoints newer than it
    allow_nonfinite: bool = False  # average NaN/Inf values instead of refusing the checkpoint holding them
    submodel: str | None = None  # in units holding several models (unet/unet_ema, fp32 master weights...)
    step_every: int | None = None  # steps that count saves or epochs, times this, are training steps
    steps: tuple[int, ...] | None = None  # each checkpoint's training step, oldest first
    globs: tuple[str, ...] = ()  # only checkpoints whose name matches one of these
    threads: int | None = None  # worker threads; default one per core (see streaming.default_threads)
    chunk_numel: int | None = None  # elements per chunk (streaming.chunk_numel); results never depend on it

    @property
    def all_settings(self) -> list[AverageSettings]:
        """The averages to compute, as a list (one or several)."""
        if isinstance(self.settings, AverageSettings):
            return [self.settings]
        return list(self.settings)
