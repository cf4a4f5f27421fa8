"""``ema-average CKPT_DIR``: the command line, a thin layer over :mod:`ema_average.offline.run`.

This module holds the command: it turns the options into a run (one process, torchrun's ranks, or
``--watch``) and the package's errors into one-line messages and exit codes (0 ok, 1 bad input, 2 usage;
a traceback only with --debug); under torchrun only rank 0 speaks. The options are declared and parsed in
:mod:`ema_average.cli.options`, what is printed is in :mod:`ema_average.cli.report`, and the process's
signal dispositions in :mod:`ema_average._platform.process`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import typer

from ema_average._platform import process
from ema_average._platform.signals import deferred
from ema_average.cli import options as opt
from ema_average.cli.report import err, execute_with_progress, one_line, out, show_plan, show_summary
from ema_average.errors import ConfigurationError, EmaAverageError, TrustPickleWarning, interrupted

if TYPE_CHECKING:  # the modules behind the command import torch: loaded only once a run starts
    from ema_average.offline.options import RunOptions
    from ema_average.offline.run import PreparedRun, Summary
    from ema_average.offline.torchrun import Ranks

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(
    help="Average a training run's checkpoints with an exponential moving average into safetensors. "
    "Launched by torchrun (torchrun --nproc-per-node N -m ema_average CKPT_DIR -o OUT.safetensors), the ranks "
    "split the work and write one file."
)
def average(
    ctx: typer.Context,
    checkpoint_dir: opt.CheckpointDir,
    last: opt.Last = None,
    from_step: opt.FromStep = None,
    to_step: opt.ToStep = None,
    every: opt.Every = None,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    state_dict_key: opt.StateDictKey = None,
    steps_from: opt.StepsFromOption = opt.DEFAULT_STEPS_FROM,
    submodel: opt.Submodel = None,
    step_every: opt.StepEvery = None,
    steps: opt.StepList = None,
    glob: opt.Glob = None,
    method: opt.Method = "exponential",
    schedule: opt.ScheduleOption = opt.DEFAULT_SCHEDULE,
    decay: opt.Decay = None,
    half_life: opt.HalfLife = None,
    gamma: opt.Gamma = None,
    sigma_rel: opt.SigmaRel = None,
    numerator: opt.Numerator = None,
    denominator: opt.Denominator = None,
    set_: opt.SetAssignments = None,
    at_step: opt.AtStep = None,
    snapshot_sigma_rel: opt.SnapshotSigmaRel = None,
    resume: opt.Resume = None,
    watch: opt.Watch = False,
    poll: opt.Poll = 30.0,
    output: opt.Output = None,
    dtype: opt.Dtype = opt.DEFAULT_DTYPE,
    overwrite: opt.Overwrite = False,
    dry_run: opt.DryRun = False,
    max_shard_size: opt.MaxShardSize = None,
    strip_prefix: opt.StripPrefix = "",
    trust_pickle: opt.TrustPickle = False,
    allow_nonfinite: opt.AllowNonfinite = False,
    device: opt.Device = "cpu",
    threads: opt.Threads = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
    version: opt.Version = None,
) -> None:
    if not debug:
        _only_our_warnings(ctx)
    try:
        from ema_average.offline.options import RunOptions
        from ema_average.offline.plan import (
            AverageSettings,
            CheckpointSelection,
            TensorSelection,
            settings_sweep,
        )
        from ema_average.offline.run import prepare

        flags: dict[str, Sequence[float] | None] = {
            "decay": decay,
            "half_life": half_life,
            "gamma": gamma,
            "sigma_rel": sigma_rel,
        }
        flags |= {"numerator": opt.one(numerator), "denominator": opt.one(denominator)}
        given = opt.settings_given(flags, set_ or [])
        posthoc = method == "posthoc"
        if not posthoc and (at_step is not None or snapshot_sigma_rel is not None):
            raise ConfigurationError("--at-step and --snapshot-sigma-rel apply to --method posthoc only")
        settings = (
            [AverageSettings()] if posthoc else settings_sweep(given, method=method, schedule=schedule.value)
        )
        options = RunOptions(
            checkpoint_dir=checkpoint_dir,
            output=output,
            device=device,
            settings=settings,
            dtype=dtype.value,
            overwrite=overwrite,
            threads=threads,
            max_shard_size=max_shard_size,
            selection=TensorSelection(tuple(include or ()), tuple(exclude or ()), strip_prefix),
            state_dict_key=state_dict_key,
            steps_from=steps_from.value,  # type: ignore[arg-type]  # a word of choices.STEPS_FROM (click checked)
            trust_pickle=trust_pickle,
            submodel=submodel,
            step_every=step_every,
            steps=steps,
            globs=tuple(glob or ()),
            checkpoints=CheckpointSelection(from_step, to_step, every, last),
            resume=resume,
            allow_nonfinite=allow_nonfinite,
        )
        if posthoc:
            _posthoc(options, given, at_step, snapshot_sigma_rel, watch=watch, dry_run=dry_run, quiet=quiet)
            return
        if _launched():
            _run_on_ranks(options, watch=watch, dry_run=dry_run, quiet=quiet)
            return
        if watch:
            _watch(options, poll, quiet)
            return
        _run_prepared(prepare(options, dry_run=dry_run), dry_run=dry_run, speak=not quiet)
    except (KeyboardInterrupt, Exception) as exc:
        if not interrupted(exc):  # a bug or an unforeseen input: still one line, the traceback with --debug
            _fail(_describe(exc), exc, debug)
        if _speaks():  # a Ctrl-C, also one that a library's import or a class definition wrapped
            err.print("ema-average: interrupted; no output written")
        raise typer.Exit(130) from None


def _posthoc(
    options: RunOptions,
    given: dict[str, list[float]],
    at_step: int | None,
    snapshot_sigma_rel: tuple[float, ...] | None,
    *,
    watch: bool,
    dry_run: bool,
    quiet: bool,
) -> None:
    """--method posthoc: the power EMAs named by --sigma-rel or --gamma, reconstructed from snapshots."""
    from ema_average.cli.posthoc import run_prepared
    from ema_average.offline.posthoc_job import Targets, prepare

    other = sorted(set(given) - {"sigma_rel", "gamma"})
    if other or watch or _launched():
        what = ", ".join(f"--{name.replace('_', '-')}" for name in other) or (
            "--watch" if watch else "torchrun"
        )
        raise ConfigurationError(f"{what} does not apply to --method posthoc")
    sigma, gamma = given.get("sigma_rel"), given.get("gamma")
    targets = Targets(
        tuple(sigma) if sigma else None,
        tuple(gamma) if gamma else None,
        at_step,
        tuple(snapshot_sigma_rel) if snapshot_sigma_rel is not None else None,
    )
    run_prepared(prepare(options, targets, dry_run=dry_run), dry_run=dry_run, speak=not quiet)


def _describe(exc: BaseException) -> str:
    """An error as its one-line message: ours and the OS's as they are, anything else as unexpected."""
    if isinstance(exc, EmaAverageError | OSError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (--debug shows where)"


def _launched() -> bool:
    """One of several ranks started by torchrun (the rank logic itself is in ema_average.offline.torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _speaks() -> bool:
    """Only rank 0 of a torchrun launch prints: every rank reaches the same plan, summary and error."""
    return not _launched() or os.environ.get("RANK", "0") == "0"


def _run_on_ranks(options: RunOptions, *, watch: bool, dry_run: bool, quiet: bool) -> None:
    """The run under torchrun: every rank prepares, they agree, each writes its share of the one output."""
    from ema_average.offline import torchrun as distributed

    ranks = distributed.Ranks.start(options.device, _describe)
    finished = False
    try:
        _rank_job(ranks, options, watch=watch, dry_run=dry_run, quiet=quiet)
        finished = True
    finally:
        ranks.close(clean=finished)


def _rank_job(ranks: Ranks, options: RunOptions, *, watch: bool, dry_run: bool, quiet: bool) -> None:
    from ema_average.offline import torchrun as distributed

    mine = ranks.together(lambda: distributed.rank_options(options, ranks, watch=watch))
    prepared = ranks.together(lambda: distributed.prepare(mine, ranks, dry_run=dry_run))
    _run_prepared(prepared, dry_run=dry_run, speak=ranks.lead and not quiet, ranks=ranks)


def _run_prepared(prepared: PreparedRun, *, dry_run: bool, speak: bool, ranks: Ranks | None = None) -> None:
    """Plan shown, then (unless a dry run, or nothing newer to add) executed with progress and summed up;
    ``speak`` False (``-q``, or a rank other than 0) prints nothing."""
    if speak:
        show_plan(prepared)
    if dry_run:
        return
    if prepared.up_to_date:
        if speak:
            out.print(
                f"{prepared.output} is up to date: no checkpoint newer than step {prepared.plan.steps[-1]}"
            )
        return
    summary = execute_with_progress(prepared, show=speak and out.is_terminal, ranks=ranks)
    if speak:
        show_summary(summary)


def _watch(options: RunOptions, poll: float, quiet: bool) -> None:
    """--watch: refresh the output as checkpoints arrive; Ctrl-C (or SIGTERM) stops cleanly, exit 0."""
    from ema_average.offline.watch import watch as watch_run

    # A Ctrl-C that lands inside a print leaves the line in rich's buffer, to be printed again before
    # "stopped watching": interrupts wait until the line is out (signals.deferred).
    def refreshed(prepared: PreparedRun, summary: Summary) -> None:
        if not quiet:
            with deferred():
                out.print(f"step {prepared.plan.steps[-1]}: ", end="")
                show_summary(summary)

    def notice(text: str) -> None:
        if not quiet:
            with deferred():
                out.print(f"note: {text}", soft_wrap=True)

    if not quiet:
        out.print(f"watching {options.checkpoint_dir} every {poll:g} s; Ctrl-C stops")
    try:
        watch_run(options, poll=poll, on_refresh=refreshed, on_notice=notice)
    except KeyboardInterrupt:
        if not quiet:
            out.print("stopped watching")


def _only_our_warnings(ctx: typer.Context) -> None:
    """Libraries' warnings (torch deprecations and the like) are not the user's business and would break
    the one-line error promise; ours (--trust-pickle) are, one line each. --debug shows everything.

    In the command's own process this holds until it exits (its shutdown included); in a host's (a test
    runner, a notebook) only while the command runs: the host's filters and ``showwarning`` come back."""
    if not process.owned():
        ctx.with_resource(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    warnings.simplefilter("always", TrustPickleWarning)

    def show(message: Warning | str, *_: object, **__: object) -> None:
        if not _speaks():
            return
        err.print(f"ema-average: warning: {one_line(str(message))}", soft_wrap=True)

    warnings.showwarning = show


def _fail(message: str, exc: BaseException, debug: bool) -> NoReturn:
    """One line, then exit 2 for settings the command line gave that cannot be used together or as given
    (a usage error, as click's own), 1 for anything about the files."""
    if debug:
        raise exc
    if _speaks():
        err.print(f"ema-average: error: {one_line(message)}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, ConfigurationError) else 1)


def main() -> None:
    """Console-script entry point."""
    process.own()  # SIGTERM unwinds like Ctrl-C from here: the story is in ema_average._platform.process
    with contextlib.suppress(BrokenPipeError):
        app()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
