"""Post-hoc EMA snapshots kept by the EMA callbacks (``posthoc_every=N``): the callbacks' glue around
:class:`~ema_average.online.posthoc_training.PowerEmaSnapshots`, free of either framework.

The profiles follow the training weights at every optimizer step from step 1 (the callback's ``every``,
``start_step`` and ``should_update`` are the EMA's, not theirs: a power EMA's profile is a function of the
step), and only global rank 0 keeps and writes them (under DDP the weights are equal across ranks). Their
state goes into the trainer's checkpoint and is loaded back on resume, so a resumed run writes the
uninterrupted run's snapshots bit for bit. Sharded (DTensor) parameters are refused with one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ema_average.engine.averages import is_dtensor
from ema_average.errors import AverageStateError, CheckpointError, ConfigurationError
from ema_average.offline.posthoc_snapshots import DEFAULT_FOLDER
from ema_average.online.posthoc_training import _DTYPES, DEFAULT_SIGMA_RELS, PowerEmaSnapshots

__all__ = ["DEFAULT_FOLDER", "DEFAULT_SIGMA_RELS", "STATE_FILE", "STATE_KEY", "SnapshotKeeper"]

STATE_KEY = "posthoc_ema"  # the Lightning .ckpt's top-level key for the snapshots' state
STATE_FILE = "posthoc_ema_state.pt"  # in HF's checkpoint-N/: that state (tensors only, weights_only)
DIGEST_KEY = "weights_sha256"  # beside it: the training weights it was saved with (see weights_digest)
DTENSOR_REFUSAL = (
    "posthoc_every: sharded (DTensor) parameters are not snapshotted (each file is written whole from one "
    "process); keep PowerFunctionMovingAverage per rank and save with save_safetensors instead"
)


class SnapshotKeeper:
    """The power profiles beside a callback's EMAs: built at train start on rank 0, updated at each step."""

    def __init__(self, every: int | None, sigma_rels: Sequence[float], dtype: torch.dtype) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigurationError(f"posthoc_every must be a whole number of steps >= 1, got {every!r}")
        if dtype not in _DTYPES:
            raise ConfigurationError(f"posthoc_dtype must be float32, bfloat16 or float16, got {dtype!r}")
        widths = tuple(float(s) for s in sigma_rels)
        if not widths or len(set(widths)) < len(widths):
            raise ConfigurationError(
                f"posthoc_sigma_rels must name one or more different widths, got {sigma_rels!r}"
            )
        self.every = every
        self.sigma_rels = widths
        self.dtype = dtype
        self.snapshots: PowerEmaSnapshots | None = None
        self.pending: tuple[Mapping[str, Any], str] | None = None  # a state read from a checkpoint

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def start(
        self,
        tracked: Sequence[tuple[str, torch.Tensor]],
        folder: Path,
        global_step: int,
        *,
        rank_zero: bool,
        device: torch.device | str | None = None,
    ) -> None:
        """The profiles of ``tracked`` (the EMA's parameters, by name) writing into ``folder``: rank 0 only.

        A resumed run (``global_step > 0``) continues the state read from its checkpoint, or is refused.
        """
        self.snapshots = None
        if not self.enabled:
            return
        if any(is_dtensor(t) for _, t in tracked):
            raise ConfigurationError(DTENSOR_REFUSAL)
        pending, self.pending = self.pending, None
        if not rank_zero:
            return
        assert self.every is not None
        self.snapshots = PowerEmaSnapshots(
            dict(tracked), self.sigma_rels, every=self.every, folder=folder, dtype=self.dtype, device=device
        )
        if global_step > 0:
            self._resume(pending, global_step)

    def _resume(self, pending: tuple[Mapping[str, Any], str] | None, global_step: int) -> None:
        if pending is None:
            raise CheckpointError(
                None,
                "the checkpoint resumed holds no post-hoc snapshots' state (saved without posthoc_every?): the profiles cannot "
                "be continued; resume without posthoc_every, or start a new run",
            )
        state, where = pending
        assert self.snapshots is not None
        try:
            last = state.get("last_step") if isinstance(state, Mapping) else None
            if isinstance(last, int) and last != global_step:  # not this checkpoint's: a gap would skew them
                raise AverageStateError(f"its last step {last} is not the trainer's step {global_step}")
            self.snapshots.load_state_dict(state)
        except (AverageStateError, KeyError, TypeError, ValueError) as exc:
            raise AverageStateError(f"{where}: the post-hoc snapshots' state: {exc}") from None

    def step(self, global_step: int) -> None:
        """Every profile updated once per optimizer step (the model holding the training weights)."""
        if self.snapshots is not None and global_step > self.snapshots.last_step:
            self.snapshots.update(global_step)

    def state(self) -> dict[str, Any] | None:
        """What the trainer's checkpoint keeps: rank 0's profiles and their last step."""
        return None if self.snapshots is None else self.snapshots.state_dict()

    def load(self, state: object, where: str) -> None:
        """A state read from a checkpoint, loaded into the profiles when training starts."""
        if not isinstance(state, Mapping):
            raise AverageStateError(
                f"{where}: the post-hoc snapshots' state must be the mapping they write, got "
                f"{type(state).__name__}"
            )
        self.pending = (state, where)

    # --- a state file in a checkpoint folder (the HF Trainer's checkpoint-N/) -----------------------

    def save_file(self, folder: Path, digest: str) -> None:
        """``folder/STATE_FILE``, written aside and renamed, with the training weights' digest."""
        state = self.state()
        if state is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        aside = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
        try:
            torch.save({"state": state, DIGEST_KEY: digest}, aside)
            os.replace(aside, folder / STATE_FILE)
        except BaseException:
            aside.unlink(missing_ok=True)
            raise

    def load_file(self, folders: Sequence[Path], digest: str) -> None:
        """The state saved beside exactly the training weights now in the model, from the first of
        ``folders`` that holds one (another run's is refused, as the EMA's is)."""
        if not self.enabled:
            return
        other: Path | None = None
        for folder in folders:
            path = folder / STATE_FILE
            if not path.is_file():
                continue
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(
                    path, f"cannot be read as the post-hoc snapshots' state ({exc})"
                ) from None
            if not isinstance(saved, Mapping) or saved.get(DIGEST_KEY) != digest:
                other = other or path
                continue
            self.load(saved.get("state"), str(path))
            return
        if other is not None:
            raise CheckpointError(
                other, "holds the post-hoc snapshots of other training weights than those the Trainer resumed"
            )
