"""``ema-average CKPT_DIR``: the command line, a thin layer over :mod:`ema_average.pipeline`.

Parses options, shows the plan, progress and summary with rich, and turns the package's errors into
one-line messages and exit codes (0 ok, 1 bad input, 2 usage; a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ema_average._version import __version__
from ema_average.errors import EmaAverageError
from ema_average.pipeline import AverageOptions, PreparedRun, Summary, execute, prepare
from ema_average.plan import AverageSettings, Selection, format_bytes, parse_size, relative_spread

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# Piped output (logs, CI) gets wide lines rather than rich's 80-column default, so nothing is folded.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


class OutputDtype(str, Enum):
    as_input = "as-input"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StepsFrom(str, Enum):
    auto = "auto"
    metadata = "metadata"
    filename = "filename"


def _version(value: bool) -> None:
    if value:
        out.print(f"ema-average {__version__}")
        raise typer.Exit()


@app.command(help="Average a training run's checkpoints with an exponential moving average into safetensors.")
def average(
    checkpoint_dir: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT_DIR", help="Folder holding the run's checkpoints (searched recursively)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output .safetensors file. Default: CKPT_DIR-ema.safetensors beside CKPT_DIR.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Where the averages live: cpu, cuda, cuda:N or mps.")] = "cpu",
    decay: Annotated[float, typer.Option(help="EMA decay (upper bound when steps are known).")] = 0.9999,
    numerator: Annotated[
        float, typer.Option(help="Warm-up: decay = min(decay, (numerator + step) / (denominator + step)).")
    ] = 1.0,
    denominator: Annotated[float, typer.Option(help="Warm-up denominator (see --numerator).")] = 10.0,
    dtype: Annotated[
        OutputDtype,
        typer.Option(help="Output dtype of averaged tensors; as-input keeps each tensor's saved dtype."),
    ] = OutputDtype.as_input,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan and stop; write nothing.")
    ] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory for averages and reads, e.g. 4GiB; bigger models run in groups. Default: 1/4 of RAM."
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            help="Write shards of at most this size (e.g. 5GB) with a model.safetensors.index.json."
        ),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Only tensors matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Leave out tensors matching this glob (repeatable).")
    ] = None,
    strip_prefix: Annotated[
        str, typer.Option(help="Remove this prefix from output names (e.g. 'model.').")
    ] = "",
    state_dict_key: Annotated[
        str | None,
        typer.Option(help="Key of the weights inside torch files (e.g. ema); default: found automatically."),
    ] = None,
    steps_from: Annotated[
        StepsFrom,
        typer.Option(help="Where steps come from: metadata, filename, or auto (metadata, then filename)."),
    ] = StepsFrom.auto,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle", help="UNSAFE: fully unpickle torch files that need it (runs their code)."
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No plan, progress or summary; errors only.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        options = AverageOptions(
            checkpoint_dir=checkpoint_dir,
            output=output,
            device=device,
            settings=AverageSettings("exponential", decay, numerator, denominator),
            dtype=dtype.value,
            overwrite=overwrite,
            memory_budget=parse_size(memory_budget) if memory_budget else None,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
            selection=Selection(tuple(include or ()), tuple(exclude or ()), strip_prefix),
            state_dict_key=state_dict_key,
            steps_from=steps_from.value,  # type: ignore[arg-type]
            trust_pickle=trust_pickle,
        )
        prepared = prepare(options)
        if not quiet:
            show_plan(prepared)
        if dry_run:
            return
        summary = _execute_with_progress(prepared, show=not quiet and out.is_terminal)
        if not quiet:
            show_summary(summary)
    except EmaAverageError as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        err.print("ema-average: interrupted; no output written")
        raise typer.Exit(130) from None
    except OSError as exc:
        _fail(exc, debug)


def _terminate(signum: int, _frame: object) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C, so the temporary output is removed on the way out."""
    raise KeyboardInterrupt


def _fail(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        raise exc
    err.print(f"ema-average: error: {exc}", soft_wrap=True)
    raise typer.Exit(1)


def _execute_with_progress(prepared: PreparedRun, *, show: bool) -> Summary:
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
    """The checkpoints in order with their steps, decays and weights: exactly what will be applied."""
    plan, settings = prepared.plan, prepared.options.settings
    table = Table(
        title=f"{len(prepared.checkpoints)} checkpoints in {prepared.run.root}", title_justify="left"
    )
    table.add_column("#", justify="right")
    table.add_column("checkpoint", overflow="fold")
    table.add_column("step", justify="right")
    table.add_column("step from", overflow="fold")
    table.add_column("decay", justify="right")
    table.add_column("weight", justify="right")
    table.add_column("", justify="left")
    top = max(plan.weights)
    for i, (ckpt, decay, weight) in enumerate(
        zip(prepared.checkpoints, plan.decays, plan.weights, strict=True)
    ):
        bar = "█" * round(20 * weight / top) if top > 0 else ""
        table.add_row(
            str(i + 1),
            ckpt.path.name,
            str(ckpt.step),
            ckpt.step_source,
            "start" if decay is None else f"{decay:.6g}",
            f"{weight:.4%}",
            bar,
        )
    out.print(table)
    averaged = plan.averaged
    copied = [t for t in plan.outputs if not t.averaged]
    layouts = sorted({c.layout + ("" if c.lazy else " (not lazy)") for c in prepared.checkpoints})
    out.print(
        f"method exponential, decay {settings.decay}, warm-up ({settings.numerator} + step) / "
        f"({settings.denominator} + step); effective number of checkpoints {relative_spread(plan.weights):.2f}"
    )
    out.print(
        f"layout {', '.join(layouts)}; {len(averaged)} tensors averaged ({format_bytes(sum(t.spec.nbytes for t in averaged))}"
        f" each checkpoint), {len(copied)} copied from the latest; device {prepared.device}; "
        f"{len(plan.groups)} group(s) under a {format_bytes(prepared.budget)} budget"
    )
    out.print(f"output {prepared.output} ({prepared.options.dtype})")
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True)


def show_summary(summary: Summary) -> None:
    paths = ", ".join(str(p) for p in summary.outputs)
    out.print(
        f"wrote {paths}: {summary.tensors} tensors, {format_bytes(summary.bytes_written)}; read "
        f"{format_bytes(summary.bytes_read)} in {summary.seconds:.2f} s ({format_bytes(summary.throughput)}/s); "
        f"peak memory {format_bytes(summary.peak_rss)}",
        soft_wrap=True,
    )


def main() -> None:
    """Console-script entry point."""
    with contextlib.suppress(BrokenPipeError):
        app()
    sys.stdout.flush()
