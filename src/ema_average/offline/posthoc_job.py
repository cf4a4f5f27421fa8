"""The offline reconstruction: ``ema-average SNAPSHOTS --method posthoc --sigma-rel 0.05,0.1``.

The snapshots are found and checked, each target's coefficients solved in float64 (:mod:`.profiles`), and
the plan is the offline job's own: the snapshots are the sources, each target an average whose weights are
its coefficients, streamed as a plain weighted sum (``PlannedAverage.sums``) by the pipeline's chunked pass,
so every target's output comes from one read of the snapshots, in memory bounded by the chunks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ema_average.checkpoints.discovery.discover import Run
from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, Reconstruction, reconstruct
from ema_average.errors import ConfigurationError, OutputError
from ema_average.offline import streaming
from ema_average.offline.options import RunOptions
from ema_average.offline.output_plan import check_names, check_not_an_input, check_sizes, output_paths
from ema_average.offline.plan import AverageSettings, Plan, PlannedAverage, chunk_layout, output_tensors
from ema_average.offline.posthoc_snapshots import SnapshotSet, find_snapshots
from ema_average.offline.run import PreparedRun, resolve_device
from ema_average.output.folder_plan import is_folder

METHOD = "posthoc"  # what --method names it, and what its outputs record (so --resume refuses them)


@dataclass(frozen=True)
class Targets:
    """What to reconstruct: widths (``sigma_rels``) or exponents (``gammas``), one output each, read at
    ``at_step`` (default: the last snapshot); ``snapshot_sigma_rels`` names ema-pytorch's profiles."""

    sigma_rels: tuple[float, ...] | None = None
    gammas: tuple[float, ...] | None = None
    at_step: int | None = None
    snapshot_sigma_rels: tuple[float, ...] | None = None

    def resolved(self) -> list[tuple[str, float]]:
        """Each target as (how its output is labelled, its gamma); a value given twice is refused."""
        if (self.sigma_rels is None) == (self.gammas is None):
            raise ConfigurationError(
                "post-hoc EMA needs its targets: give --sigma-rel (e.g. 0.05,0.1) or --gamma, not both"
            )
        name, values = ("sigma-rel", self.sigma_rels) if self.sigma_rels else ("gamma", self.gammas or ())
        if len(set(values)) < len(values):
            raise ConfigurationError(f"--{name} names the same target twice")
        convert = sigma_rel_to_gamma if name == "sigma-rel" else float
        return [(f"{name}{float(v)!r}".removesuffix(".0"), convert(v)) for v in values]


@dataclass
class PosthocRun:
    """A reconstruction found and planned: the offline job's prepared run, and how each target is made."""

    prepared: PreparedRun
    snapshots: SnapshotSet
    reconstructions: list[Reconstruction]
    at_step: int
    notes: list[str] = field(default_factory=list)


def prepare(options: RunOptions, targets: Targets, *, dry_run: bool = False) -> PosthocRun:
    """Find the snapshots, solve every target and plan the pass; every input error surfaces here."""
    _refuse_offline_only(options)
    wanted = targets.resolved()
    device = resolve_device(options.device)
    found = find_snapshots(options.checkpoint_dir, targets.snapshot_sigma_rels)
    at_step = targets.at_step if targets.at_step is not None else found.profiles[-1].step
    solved = [reconstruct(found.profiles, Profile(at_step, gamma)) for _, gamma in wanted]
    used = [i for i, p in enumerate(found.profiles) if p.step <= at_step]
    _check_complete(found, used)
    labels = [label for label, _ in wanted] if len(wanted) > 1 else [""]
    outputs = output_paths(options, labels)
    if is_folder(outputs[0]):
        raise ConfigurationError(f"-o {outputs[0]}: post-hoc EMA writes .safetensors files; name one")
    sources = [found.snapshots[i].checkpoint for i in used]
    for output in outputs:
        check_not_an_input(output, [s.checkpoint.path for s in found.snapshots])
    threads = options.threads or streaming.default_threads(device)
    plan = _plan(options, sources, solved, used, labels, device, found)
    check_names(plan.outputs, sources[0])
    check_sizes(plan, sources[0], outputs[0], threads)
    for output in outputs:
        if output.exists() and not options.overwrite:
            if not dry_run:
                raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
            plan.notes.append(f"{output} already exists: a real run needs --overwrite")
    run = Run(found.folder, sources, list(found.notes), [s.checkpoint.path for s in found.snapshots])
    prepared = PreparedRun(options, run, sources, plan, outputs, device, threads, None, options.overwrite)
    return PosthocRun(prepared, found, solved, at_step)


def _refuse_offline_only(options: RunOptions) -> None:
    if options.resume is not None:
        raise ConfigurationError("--resume continues an EMA of checkpoints; post-hoc EMA is solved whole")
    chosen = options.checkpoints
    if any(v is not None for v in (chosen.from_step, chosen.to_step, chosen.every, chosen.last)):
        raise ConfigurationError(
            "post-hoc EMA uses every snapshot at or before --at-step: --from-step, --to-step, --every and "
            "--last do not apply"
        )
    if options.threads is not None and options.threads < 1:
        raise ConfigurationError(f"--threads must be at least 1, got {options.threads}")


def _check_complete(found: SnapshotSet, used: Sequence[int]) -> None:
    """Every step used holds a snapshot of every profile: a missing one (a run killed between two
    profiles' files, a file deleted) is named rather than silently fitted around."""
    profiles = found.profiles
    gammas = sorted({profiles[i].gamma for i in used})
    by_step: dict[int, set[float]] = {}
    for i in used:
        by_step.setdefault(profiles[i].step, set()).add(profiles[i].gamma)
    for step, held in by_step.items():
        missing = [g for g in gammas if g not in held]
        if missing:
            width = Profile(step, missing[0]).sigma_rel
            raise ConfigurationError(
                f"{found.folder}: step {step} has no snapshot of the profile sigma_rel {width:.4g} that other "
                "steps have: a snapshot is missing. --at-step before it reconstructs from the complete steps"
            )


def _plan(
    options: RunOptions,
    sources: list,
    solved: list[Reconstruction],
    used: list[int],
    labels: list[str],
    device: torch.device,
    found: SnapshotSet,
) -> Plan:
    first = sources[0]
    outputs = output_tensors(first.specs(), first.aliases(), options.selection, options.dtype)
    split = all(streaming.reads_ranges(s) for s in sources)
    numel = options.chunk_numel or streaming.chunk_numel(device)
    chunks = chunk_layout(outputs, {}, numel, split=split)
    notes = list(found.notes)
    averages = []
    for reconstruction, label in zip(solved, labels, strict=True):
        weights = [reconstruction.coefficients[i] for i in used]
        settings = AverageSettings("power", schedule="step", gamma=reconstruction.target.gamma)
        averages.append(
            PlannedAverage(
                settings, [None] * len(sources), weights, label, sums=True, metadata=_recorded(reconstruction)
            )
        )
        notes += [f"{label}: {w}" if label else w for w in reconstruction.warnings]
    narrow = sorted({str(s.dtype).removeprefix("torch.") for s in first.specs().values() if s.is_floating})
    if any(d in ("float16", "bfloat16") for d in narrow):
        worst = max(r.amplification for r in solved)
        notes.append(
            f"the snapshots are stored as {', '.join(narrow)}: each value carries its rounding (bfloat16 "
            f"2^-8, float16 2^-11 relative), which the coefficients can multiply by up to {worst:.3g}"
        )
    steps = [s.step or 0 for s in sources]
    return Plan(steps, averages, outputs, chunks, notes)


def _recorded(reconstruction: Reconstruction) -> dict[str, str]:
    """What a reconstruction's output records beside the run's metadata: it is post-hoc (so ``--resume``
    does not take it for an EMA of checkpoints), its target, fit and coefficients."""
    target = reconstruction.target
    return {
        "method": METHOD,
        "posthoc_target_sigma_rel": repr(target.sigma_rel),
        "posthoc_target_gamma": repr(target.gamma),
        "posthoc_target_step": str(target.step),
        "posthoc_fit_error": repr(reconstruction.fit_error),
        "posthoc_coefficients": json.dumps(list(reconstruction.coefficients)),
    }
