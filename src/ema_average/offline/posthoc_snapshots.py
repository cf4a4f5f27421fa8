"""Finding a run's post-hoc EMA snapshots and the profile each holds, checked before anything is read.

Two kinds are read: this tool's (safetensors files whose metadata names the profile: ``posthoc_gamma`` or
``posthoc_sigma_rel``, and ``step``; written by :mod:`ema_average.online.posthoc_training`, or converted by hand
from another tool), and ema-pytorch's ``PostHocEMA`` folders (``{profile_index}.{step}.pt``, whose
profiles are not in the files: the user names them, ``--snapshot-sigma-rel``). EDM2's ``.pkl`` snapshots
are pickled network objects: refused, with how to convert them; no code from a file ever runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ema_average.checkpoints.base import Checkpoint, TensorSpec
from ema_average.checkpoints.contents.own_outputs import POSTHOC_KEYS, TOOL_MARKER_KEY
from ema_average.checkpoints.contents.steps import checked_step
from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.layouts.torch_file import TorchCheckpoint
from ema_average.engine.decay_rules import gamma_to_sigma_rel, sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile
from ema_average.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    NoCheckpointsError,
)

# What a snapshot of this tool records of its profile (safetensors metadata values are strings).
GAMMA_KEY, SIGMA_REL_KEY = POSTHOC_KEYS
STEP_KEY = "step"
# The folder of a run the training side writes snapshots into, looked in when given the run itself.
DEFAULT_FOLDER = "posthoc-ema"

_EMA_PYTORCH_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$", re.ASCII)
_EMA_PYTORCH_PREFIX = "ema_model."  # KarrasEMA's state dict: initted, step, ema_model.<the model's names>


@dataclass
class Snapshot:
    """One snapshot: the file (opened lazily), and the profile it holds."""

    checkpoint: Checkpoint
    profile: Profile


@dataclass
class SnapshotSet:
    """A folder's snapshots, ordered by step then profile, and what the plan should say about them."""

    folder: Path
    kind: str  # "ema-average" or "ema-pytorch PostHocEMA"
    snapshots: list[Snapshot]
    notes: list[str] = field(default_factory=list)

    @property
    def profiles(self) -> list[Profile]:
        return [s.profile for s in self.snapshots]

    def close(self) -> None:
        for s in self.snapshots:
            s.checkpoint.close()


def find_snapshots(root: Path, sigma_rels: tuple[float, ...] | None = None) -> SnapshotSet:
    """The snapshots in ``root`` (or in its ``posthoc-ema/`` folder), all of one kind, checked to hold the
    same tensors; ``sigma_rels`` names ema-pytorch's profiles by index. One line for anything amiss."""
    folder = _snapshot_folder(root)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    pickles = [p for p in files if p.suffix == ".pkl"]
    if pickles:
        raise CheckpointError(pickles[0], _PKL_REFUSAL)
    ours = [p for p in files if p.name.endswith(".safetensors")]
    theirs = [p for p in files if _EMA_PYTORCH_NAME.match(p.name)]
    if ours and theirs:
        raise CheckpointError(
            folder,
            "holds both safetensors snapshots and ema-pytorch's N.STEP.pt files: keep one kind per folder",
        )
    if theirs:
        found = SnapshotSet(folder, "ema-pytorch PostHocEMA", _ema_pytorch(theirs, sigma_rels))
    else:
        if sigma_rels is not None:
            raise ConfigurationError(
                "--snapshot-sigma-rel names the profiles of ema-pytorch's N.STEP.pt files; "
                f"{folder} holds none (this tool's snapshots record their own)"
            )
        notes: list[str] = []
        found = SnapshotSet(folder, "ema-average", _ours(ours, notes), notes)
    if not found.snapshots:
        raise NoCheckpointsError(
            folder,
            "no post-hoc EMA snapshots found; looked for .safetensors files with posthoc_gamma or "
            "posthoc_sigma_rel metadata, and ema-pytorch's PostHocEMA files (0.1000.pt, 1.1000.pt...)",
        )
    found.snapshots.sort(key=lambda s: (s.profile.step, s.profile.gamma))
    _check_unique(found.snapshots)
    _check_same_tensors(found.snapshots)
    return found


_PKL_REFUSAL = (
    "is a pickled EDM2 snapshot (network objects: reading it would run code from the file); refused. "
    "Convert each in EDM2's own environment: net = pickle.load(f)['ema']; "
    "safetensors.torch.save_file(net.state_dict(), 'NAME.safetensors', metadata={'step': str(kimg), "
    "'posthoc_sigma_rel': '0.050'}), one file per profile and snapshot, into a folder of their own"
)


def _snapshot_folder(root: Path) -> Path:
    if not root.is_dir():
        raise NoCheckpointsError(root, "is not a folder of post-hoc EMA snapshots")
    nested = root / DEFAULT_FOLDER  # a run folder holding its snapshots' folder (the training side's default)
    return nested if nested.is_dir() else root


def _ours(paths: list[Path], notes: list[str]) -> list[Snapshot]:
    snapshots = []
    for path in paths:
        ckpt = SafetensorsCheckpoint(path)
        metadata = ckpt.metadata
        if GAMMA_KEY not in metadata and SIGMA_REL_KEY not in metadata:
            ckpt.close()
            if TOOL_MARKER_KEY in metadata:  # an average this tool wrote (a reconstruction): not a snapshot
                notes.append(f"skipped {path.name}: an output of ema-average, not a snapshot")
                continue
            raise CheckpointError(
                path, f"records no post-hoc profile ({GAMMA_KEY} or {SIGMA_REL_KEY} in its metadata)"
            )
        if STEP_KEY not in metadata:
            raise CheckpointError(path, f"records no step ({STEP_KEY!r} in its metadata)")
        step = checked_step(path, metadata[STEP_KEY], f"metadata:{STEP_KEY}")
        _use(ckpt, step, "metadata:step")
        snapshots.append(Snapshot(ckpt, Profile(step, _gamma_of(path, metadata))))
    return snapshots


def _gamma_of(path: Path, metadata: dict[str, str]) -> float:
    """The profile's gamma from its metadata: given, or from sigma_rel; both given must agree."""
    gamma = _number(path, metadata, GAMMA_KEY)
    sigma_rel = _number(path, metadata, SIGMA_REL_KEY)
    if gamma is None:
        assert sigma_rel is not None
        try:
            return sigma_rel_to_gamma(sigma_rel)
        except ConfigurationError as exc:
            raise CheckpointError(path, f"{SIGMA_REL_KEY}: {exc}") from None
    if sigma_rel is not None and not math.isclose(gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-6):
        raise CheckpointError(
            path, f"{GAMMA_KEY} {gamma!r} and {SIGMA_REL_KEY} {sigma_rel!r} name different profiles"
        )
    return gamma


def _number(path: Path, metadata: dict[str, str], key: str) -> float | None:
    if key not in metadata:
        return None
    try:
        value = float(metadata[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CheckpointError(path, f"{key} is {metadata[key][:40]!r}, not a finite number")
    return value


def _ema_pytorch(paths: list[Path], sigma_rels: tuple[float, ...] | None) -> list[Snapshot]:
    if sigma_rels is None:
        raise ConfigurationError(
            f"{paths[0].parent} holds ema-pytorch PostHocEMA snapshots, whose profiles are not in the files: "
            "give their sigma_rels in profile order, e.g. --snapshot-sigma-rel 0.05,0.28"
        )
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    snapshots = []
    for path in paths:
        match = _EMA_PYTORCH_NAME.match(path.name)
        assert match is not None
        index, step = int(match.group(1)), checked_step(path, match.group(2), "filename")
        if index >= len(gammas):
            raise ConfigurationError(
                f"{path}: profile {index}, but --snapshot-sigma-rel names {len(gammas)} profile(s) (0 to "
                f"{len(gammas) - 1}): give one sigma_rel per profile, in PostHocEMA's order"
            )
        view = _Prefixed(TorchCheckpoint(path), _EMA_PYTORCH_PREFIX)
        _use(view, step, "filename")
        snapshots.append(Snapshot(view, Profile(step, gammas[index])))
    return snapshots


def _use(ckpt: Checkpoint, step: int, origin: str) -> None:
    ckpt.step, ckpt.step_origin = step, origin


def _check_unique(snapshots: list[Snapshot]) -> None:
    seen: dict[Profile, Path] = {}
    for s in snapshots:
        if s.profile.step < 1:
            raise CheckpointError(s.checkpoint.path, "is a snapshot of step 0: a profile needs a step >= 1")
        if s.profile in seen:
            raise CheckpointMismatchError(
                s.checkpoint.path,
                f"holds the same profile (sigma_rel {s.profile.sigma_rel:.4g}) at the same step "
                f"({s.profile.step}) as {seen[s.profile].name}: keep one",
            )
        seen[s.profile] = s.checkpoint.path


def _check_same_tensors(snapshots: list[Snapshot]) -> None:
    """Every snapshot holds the first one's tensors, of the same shapes and dtypes."""
    first = snapshots[0].checkpoint
    expected = first.specs()
    for s in snapshots[1:]:
        specs = s.checkpoint.specs()
        if specs == expected:
            continue
        missing = [n for n in expected if n not in specs]
        extra = [n for n in specs if n not in expected]
        differ = [n for n in expected if n in specs and specs[n] != expected[n]]
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has an extra tensor {extra[0]!r}"
        else:
            what = f"holds {differ[0]!r} as {_shown(specs[differ[0]])}, {first.path.name} as {_shown(expected[differ[0]])}"
        raise CheckpointMismatchError(
            s.checkpoint.path, f"{what}: snapshots of one run hold the same tensors"
        )


def _shown(spec: TensorSpec) -> str:
    return f"{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)}"


class _Prefixed(Checkpoint):
    """The tensors of a checkpoint under one prefix, named without it (ema-pytorch's ``ema_model.``)."""

    layout = "ema-pytorch PostHocEMA"

    def __init__(self, inner: Checkpoint, prefix: str) -> None:
        super().__init__(inner.path)
        self.inner = inner
        self.prefix = prefix
        self._specs = {n[len(prefix) :]: s for n, s in inner.specs().items() if n.startswith(prefix)}
        if not self._specs:
            inner.close()
            raise CheckpointError(inner.path, f"holds no {prefix}* tensors: not a PostHocEMA snapshot")

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(self.prefix + name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_into(self.prefix + name, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_range_into(self.prefix + name, start, out)

    def aliases(self) -> dict[str, str]:
        cut = len(self.prefix)
        return {
            a[cut:]: b[cut:]
            for a, b in self.inner.aliases().items()
            if a.startswith(self.prefix) and b.startswith(self.prefix)
        }

    def close(self) -> None:
        self.inner.close()
