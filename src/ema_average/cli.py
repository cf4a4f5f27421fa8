"""``ema-average CKPT_DIR``: the command line, a thin layer over :mod:`ema_average.pipeline`.

Parses options, shows the plan, progress and summary with rich, and turns the package's errors into
one-line messages and exit codes (0 ok, 1 bad input, 2 usage; a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from ema_average import options as choices
from ema_average import process
from ema_average._version import __version__
from ema_average.decay_rules import DecayRule, ExponentialRule, PowerRule, flag_of
from ema_average.errors import ConfigurationError, EmaAverageError, TrustPickleWarning, interrupted
from ema_average.signals import deferred

if TYPE_CHECKING:  # the modules behind the command import torch: loaded only once a run starts
    from ema_average.distributed import Ranks
    from ema_average.pipeline import PreparedRun, RunOptions, Summary


def _choices(name: str, names: tuple[str, ...]) -> type[Enum]:
    """A typer choice type made from one of the real lists in :mod:`ema_average.options`."""
    return Enum(name, {n: n for n in names}, type=str)  # type: ignore[return-value]


Schedule = _choices("Schedule", choices.SCHEDULES)
OutputDtype = _choices("OutputDtype", choices.OUTPUT_DTYPES)
StepsFrom = _choices("StepsFrom", choices.STEPS_FROM)
DEFAULT_SCHEDULE = Schedule(choices.SCHEDULES[0])
DEFAULT_DTYPE = OutputDtype(choices.OUTPUT_DTYPES[0])
DEFAULT_STEPS_FROM = StepsFrom(choices.STEPS_FROM[0])

_LIST = "FLOAT[,FLOAT...]"  # one average per value, in one pass
# --help groups the options by what they are for (rich help panels).
_READ, _AVERAGE, _OUTPUT, _SAFETY, _SPEED = (
    "What to read",
    "How to average",
    "Output",
    "Safety",
    "Performance",
)


class Numbers(tuple):  # a tuple subclass typer does not take for a multi-value option
    """A comma list of numbers as given on the command line: one average per value."""


class Steps(tuple):
    """A comma list of whole training steps (``--steps 500,1000``)."""


def _numbers(text: str) -> Numbers:
    """``0.999,0.9999``; parsed where typer parses options, so a bad list is a usage error (exit 2)."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            raise typer.BadParameter(f"{item.strip()!r} is not a number (give e.g. 0.999,0.9999)") from None
    return Numbers(values)


@dataclass(frozen=True)
class Assignment:
    """One ``--set NAME=VALUE[,VALUE...]``: a setting of the chosen average, by its declared name."""

    name: str
    values: Numbers


def _assignment(text: str) -> Assignment:
    """``keep=0.25`` or ``half-life=50,500``; parsed where typer parses options, so a bad one exits 2."""
    name, equals, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not (equals and name.isidentifier()):
        raise typer.BadParameter(f"takes NAME=VALUE (e.g. decay=0.999), got {text!r}")
    return Assignment(name, _numbers(values))


def _setting_help(rule: type[DecayRule], name: str) -> str:
    """A built-in setting's help as its rule declares it, with the rule's default."""
    setting = rule.setting(name)
    assert setting is not None, name
    shown = "" if setting.default is None else f" \\[default: {setting.default}]"  # \\[: not rich markup
    return setting.help + shown


def _settings_given(
    flags: dict[str, Sequence[float] | None], assignments: list[Assignment]
) -> dict[str, list[float]]:
    """The settings given by their own flags and by ``--set``, by name; one given twice is refused."""
    given = {name: list(values) for name, values in flags.items() if values is not None}
    for assignment in assignments:
        if assignment.name in given:
            raise ConfigurationError(f"{flag_of(assignment.name)} is given twice (by its flag or --set)")
        given[assignment.name] = list(assignment.values)
    return given


def _steps(text: str) -> Steps:
    try:
        return Steps(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"takes whole numbers separated by commas, got {text!r}") from None


def _size(text: str) -> int:
    from ema_average.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# File names are data, never rich markup or emoji codes (a file named "[bold]x.pt" must print as such).
# Piped output (logs, CI) gets wide lines rather than rich's 80-column default, so nothing is folded.
out = Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False, emoji=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"ema-average {__version__}")
        raise typer.Exit()


@app.command(
    help="Average a training run's checkpoints with an exponential moving average into safetensors. "
    "Launched by torchrun (torchrun --nproc-per-node N -m ema_average CKPT_DIR -o OUT.safetensors), the ranks "
    "split the work and write one file."
)
def average(
    checkpoint_dir: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT_DIR", help="Folder holding the run's checkpoints (searched recursively)."
        ),
    ],
    last: Annotated[
        int | None, typer.Option(help="Use only the newest N checkpoints.", rich_help_panel=_READ)
    ] = None,
    from_step: Annotated[
        int | None, typer.Option(help="Use checkpoints from this step on.", rich_help_panel=_READ)
    ] = None,
    to_step: Annotated[
        int | None, typer.Option(help="Use checkpoints up to this step.", rich_help_panel=_READ)
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(help="Use every K-th checkpoint, counted back from the newest.", rich_help_panel=_READ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Only tensors matching this glob (repeatable).", rich_help_panel=_READ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Leave out tensors matching this glob (repeatable).", rich_help_panel=_READ),
    ] = None,
    state_dict_key: Annotated[
        str | None,
        typer.Option(
            help="Key of the weights inside torch files (e.g. ema); default: found automatically.",
            rich_help_panel=_READ,
        ),
    ] = None,
    steps_from: Annotated[
        StepsFrom,
        typer.Option(
            help="Where steps come from: metadata, filename, or auto (metadata, then filename).",
            rich_help_panel=_READ,
        ),
    ] = DEFAULT_STEPS_FROM,
    submodel: Annotated[
        str | None,
        typer.Option(
            help="In a checkpoint holding several models (diffusers unet/unet_ema, an adapter beside the full "
            "model, DeepSpeed's module vs fp32 master weights), read this one; the plan names the others.",
            rich_help_panel=_READ,
        ),
    ] = None,
    step_every: Annotated[
        int | None,
        typer.Option(
            help="Checkpoints numbered by a count of saves or epochs (accelerate checkpoint_K, timm/torchtune "
            "epochs): training steps between saves. step = (count + 1) x N for counts from 0 (timm, "
            "ultralytics, torchtune, accelerate), count x N for epochs completed counted from 1 (open_clip, "
            "mmengine); the plan says which.",
            rich_help_panel=_READ,
        ),
    ] = None,
    steps: Annotated[
        Steps | None,
        typer.Option(
            parser=_steps,
            metavar="INT[,INT...]",
            help="Each checkpoint's training step, oldest first, comma-separated (e.g. 500,1000,1500).",
            rich_help_panel=_READ,
        ),
    ] = None,
    glob: Annotated[
        list[str] | None,
        typer.Option(
            help="Use only checkpoints whose name matches (repeatable), e.g. 'checkpoint_*_*.pt' (fairseq's "
            "update checkpoints).",
            rich_help_panel=_READ,
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="A registered moving average: exponential (EMA), uniform (mean of the checkpoints), power "
            "(EDM2 power-function EMA), one added with @MovingAverage.register, or one another installed package "
            "declares (entry-point group ema_average.averages); its settings by --set NAME=VALUE.",
            rich_help_panel=_AVERAGE,
        ),
    ] = "exponential",
    schedule: Annotated[
        Schedule,
        typer.Option(
            help="checkpoint: one update per checkpoint (num_updates = its step); step: the per-step rule over "
            "every training step between checkpoints, as an online EMA would have applied it.",
            rich_help_panel=_AVERAGE,
        ),
    ] = DEFAULT_SCHEDULE,
    decay: Annotated[
        Numbers | None,
        typer.Option(
            parser=_numbers,
            metavar=_LIST,
            help=_setting_help(ExponentialRule, "decay"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    half_life: Annotated[
        Numbers | None,
        typer.Option(
            parser=_numbers,
            metavar=_LIST,
            help=_setting_help(ExponentialRule, "half_life"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    gamma: Annotated[
        Numbers | None,
        typer.Option(
            parser=_numbers,
            metavar=_LIST,
            help=_setting_help(PowerRule, "gamma"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    sigma_rel: Annotated[
        Numbers | None,
        typer.Option(
            parser=_numbers,
            metavar=_LIST,
            help=_setting_help(PowerRule, "sigma_rel"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    numerator: Annotated[
        float | None,
        typer.Option(
            help=_setting_help(ExponentialRule, "numerator"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    denominator: Annotated[
        float | None,
        typer.Option(
            help=_setting_help(ExponentialRule, "denominator"),
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    set_: Annotated[
        list[Assignment] | None,
        typer.Option(
            "--set",
            parser=_assignment,
            metavar="NAME=VALUE[,VALUE...]",
            help="Any setting the --method's rule declares, by name (e.g. --set decay=0.999, or a setting of an "
            "average another package adds); repeatable; a comma list where the setting takes one.",
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue this earlier output with the newer checkpoints only (same settings). Default output: itself.",
            rich_help_panel=_AVERAGE,
        ),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Keep running: take each new checkpoint when complete, refresh the output; Ctrl-C stops.",
            rich_help_panel=_AVERAGE,
        ),
    ] = False,
    poll: Annotated[
        float,
        typer.Option(
            help="With --watch: seconds between looks (a file must hold still this long).",
            rich_help_panel=_AVERAGE,
        ),
    ] = 30.0,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output .safetensors file, or (any other name) a folder that the producing library's "
            "from_pretrained loads: weights named as the input's, with its config and tokenizer files. "
            "Default: CKPT_DIR-ema.safetensors beside CKPT_DIR. With several averages each output is named "
            "for its setting: OUT-decay0.999.safetensors.",
            rich_help_panel=_OUTPUT,
        ),
    ] = None,
    dtype: Annotated[
        OutputDtype,
        typer.Option(
            help="Output dtype of averaged tensors; as-input keeps each tensor's saved dtype.",
            rich_help_panel=_OUTPUT,
        ),
    ] = DEFAULT_DTYPE,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.", rich_help_panel=_OUTPUT)
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the plan and stop; write nothing.", rich_help_panel=_OUTPUT),
    ] = False,
    max_shard_size: Annotated[
        int | None,
        typer.Option(
            parser=_size,
            metavar="SIZE",
            help="Write the output folder in shards of at most this size (e.g. 5GB) with an index.json.",
            rich_help_panel=_OUTPUT,
        ),
    ] = None,
    strip_prefix: Annotated[
        str,
        typer.Option(help="Remove this prefix from output names (e.g. 'model.').", rich_help_panel=_OUTPUT),
    ] = "",
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="UNSAFE: fully unpickle torch files that need it (runs their code).",
            rich_help_panel=_SAFETY,
        ),
    ] = False,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite",
            help="Average NaN/Inf values instead of refusing the checkpoint holding them.",
            rich_help_panel=_SAFETY,
        ),
    ] = False,
    device: Annotated[
        str, typer.Option(help="Where the averages live: cpu, cuda, cuda:N or mps.", rich_help_panel=_SPEED)
    ] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(
            help="Worker threads, each reading, averaging and writing chunks of its own. Default: one per core.",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No plan, progress or summary; errors only.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    if not debug:
        _only_our_warnings()
    try:
        from ema_average.pipeline import RunOptions, prepare
        from ema_average.plan import CheckpointSelection, TensorSelection, settings_sweep

        flags = {"decay": decay, "half_life": half_life, "gamma": gamma, "sigma_rel": sigma_rel}
        flags |= {"numerator": _one(numerator), "denominator": _one(denominator)}
        given = _settings_given(flags, set_ or [])
        settings = settings_sweep(given, method=method, schedule=schedule.value)
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
            steps_from=steps_from.value,  # type: ignore[arg-type]
            trust_pickle=trust_pickle,
            submodel=submodel,
            step_every=step_every,
            steps=steps,
            globs=tuple(glob or ()),
            checkpoints=CheckpointSelection(from_step, to_step, every, last),
            resume=resume,
            allow_nonfinite=allow_nonfinite,
        )
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


def _one(value: float | None) -> tuple[float] | None:
    return None if value is None else (value,)


def _describe(exc: BaseException) -> str:
    """An error as its one-line message: ours and the OS's as they are, anything else as unexpected."""
    if isinstance(exc, EmaAverageError | OSError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (--debug shows where)"


def _launched() -> bool:
    """One of several ranks started by torchrun (the rank logic itself is in ema_average.distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _speaks() -> bool:
    """Only rank 0 of a torchrun launch prints: every rank reaches the same plan, summary and error."""
    return not _launched() or os.environ.get("RANK", "0") == "0"


def _run_on_ranks(options: RunOptions, *, watch: bool, dry_run: bool, quiet: bool) -> None:
    """The run under torchrun: every rank prepares, they agree, each writes its share of the one output."""
    from ema_average import distributed

    ranks = distributed.Ranks.start(options.device, _describe)
    finished = False
    try:
        _rank_job(ranks, options, watch=watch, dry_run=dry_run, quiet=quiet)
        finished = True
    finally:
        ranks.close(clean=finished)


def _rank_job(ranks: Ranks, options: RunOptions, *, watch: bool, dry_run: bool, quiet: bool) -> None:
    from ema_average import distributed

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
    summary = _execute_with_progress(prepared, show=speak and out.is_terminal, ranks=ranks)
    if speak:
        show_summary(summary)


def _watch(options: RunOptions, poll: float, quiet: bool) -> None:
    """--watch: refresh the output as checkpoints arrive; Ctrl-C (or SIGTERM) stops cleanly, exit 0."""
    from ema_average.watch import watch as watch_run

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


def _only_our_warnings() -> None:
    """Libraries' warnings (torch deprecations and the like) are not the user's business and would break
    the one-line error promise; ours (--trust-pickle) are, one line each. --debug shows everything."""
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


def one_line(text: str) -> str:
    """``text`` with control and unprintable characters escaped, so a message is always one line (a file
    name may hold a newline, or undecodable bytes that the terminal's encoding cannot print)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text.strip())


def _execute_with_progress(prepared: PreparedRun, *, show: bool, ranks: Ranks | None = None) -> Summary:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ema_average import pipeline

    def execute(prepared: PreparedRun, on_progress: Callable[[int], None] | None = None) -> Summary:
        if ranks is None:
            return pipeline.execute(prepared, on_progress, on_committed=process.ignore_interrupts)
        from ema_average import distributed

        return distributed.execute(prepared, ranks, on_progress, on_committed=process.ignore_interrupts)

    if not show:
        return execute(prepared)
    columns = (
        TextColumn("[bold]averaging"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task("averaging", total=prepared.total_bytes)
        return execute(prepared, lambda n: progress.advance(task, n))


def show_plan(prepared: PreparedRun) -> None:
    """The checkpoints in order with their steps, decays and weights: exactly what will be applied.

    With several averages, one weight column per average, headed by its label."""
    from rich.table import Table

    from ema_average.plan import effective_count
    from ema_average.sizes import format_bytes

    plan = prepared.plan
    several = len(plan.averages) > 1
    title = f"{len(prepared.checkpoints)} checkpoints in {prepared.run.root}"
    if prepared.resumed is not None:
        title += f", continuing {prepared.resumed.average.path.name}"
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("checkpoint", overflow="fold")
    table.add_column("step", justify="right")
    table.add_column("step from", overflow="fold")
    if several:
        for average in plan.averages:
            table.add_column(f"weight {average.label}", justify="right")
    else:
        table.add_column("decay", justify="right")
        table.add_column("weight", justify="right")
        table.add_column("", justify="left")
    top = max(plan.weights)
    for i, (source, step) in enumerate(zip(prepared.sources, plan.steps, strict=True)):
        resumed = prepared.resumed is not None and i == 0
        row = [
            str(i + 1),
            source.path.name + (" (earlier average)" if resumed else ""),
            str(step),
            "metadata:last_step" if resumed else source.step_origin,
        ]
        if several:
            row += [f"{average.weights[i]:.4%}" for average in plan.averages]
        else:
            decay, weight = plan.decays[i], plan.weights[i]
            bar = "█" * round(20 * weight / top) if top > 0 else ""
            row += ["start" if decay is None else f"{decay:.6g}", f"{weight:.4%}", bar]
        table.add_row(*row)
    out.print(table)
    for average in plan.averages:
        settings = average.settings
        rule = ", ".join(f"{k} {v:.6g}" for k, v in settings.rule().settings().items())
        out.print(
            (f"{average.label}: " if several else "")
            + f"method {settings.method}{' (' + rule + ')' if rule else ''}, schedule {settings.schedule}; "
            f"effective number of checkpoints {effective_count(average.weights):.2f}"
        )
    averaged = plan.averaged
    copied = [t for t in plan.outputs if not t.averaged]
    layouts = sorted({c.layout + ("" if c.lazy else " (not lazy)") for c in prepared.checkpoints})
    out.print(
        f"layout {', '.join(layouts)}; {len(averaged)} tensors averaged ({format_bytes(sum(t.spec.nbytes for t in averaged))}"
        f" each checkpoint), {len(copied)} copied from the latest; device {prepared.device}; "
        f"{len(plan.chunks)} chunks of up to {format_bytes(prepared.chunk_bytes)} on {prepared.threads} thread(s)"
    )
    outputs = ", ".join(str(path) for path in prepared.outputs)
    out.print(f"output{'s' if several else ''} {outputs} ({prepared.options.dtype})")
    if prepared.folder is not None:
        shown = prepared.folder.describe(prepared.options.max_shard_size)
        out.print(f"folder{'s' if several else ''} of {shown}", soft_wrap=True)
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True)


def show_summary(summary: Summary) -> None:
    from ema_average.sizes import format_bytes

    paths = ", ".join(str(p) for p in summary.outputs)
    out.print(
        f"wrote {paths}: {summary.tensors} tensors, {format_bytes(summary.bytes_written)}; read "
        f"{format_bytes(summary.bytes_read)} in {summary.seconds:.2f} s ({format_bytes(summary.throughput)}/s); "
        f"peak memory {format_bytes(summary.peak_rss)}",
        soft_wrap=True,
    )


def main() -> None:
    """Console-script entry point."""
    process.own()  # SIGTERM unwinds like Ctrl-C from here: the story is in ema_average.process
    with contextlib.suppress(BrokenPipeError):
        app()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
