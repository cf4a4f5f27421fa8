"""What the command prints: the plan table, the progress bar around a run, the summary line, each error as
one line.

File names are data, never rich markup or emoji codes, and every message stays on one line, whatever a
name holds. Rich's tables and progress bar are imported only when shown, so ``--help`` stays quick.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console

from ema_average._platform import process

if TYPE_CHECKING:  # the modules behind the command import torch: loaded only once a run starts
    from ema_average.offline.run import PreparedRun, Summary
    from ema_average.offline.torchrun import Ranks

# File names are data, never rich markup or emoji codes (a file named "[bold]x.pt" must print as such).
# Piped output (logs, CI) gets wide lines rather than rich's 80-column default, so nothing is folded.
out = Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False, emoji=False)


def one_line(text: str) -> str:
    """``text`` with control and unprintable characters escaped, so a message is always one line (a file
    name may hold a newline, or undecodable bytes that the terminal's encoding cannot print)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text.strip())


def execute_with_progress(prepared: PreparedRun, *, show: bool, ranks: Ranks | None = None) -> Summary:
    """The run executed (on this process, or its share under torchrun), with a progress bar when ``show``;
    Ctrl-C is ignored once the outputs are about to be named (:func:`ema_average._platform.process.ignore_interrupts`)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ema_average.offline import run as pipeline

    def execute(prepared: PreparedRun, on_progress: Callable[[int], None] | None = None) -> Summary:
        if ranks is None:
            return pipeline.execute(prepared, on_progress, on_committed=process.ignore_interrupts)
        from ema_average.offline import torchrun as distributed

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

    from ema_average.offline.plan import effective_count
    from ema_average.output.sizes import format_bytes

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
    from ema_average.output.sizes import format_bytes

    paths = ", ".join(str(p) for p in summary.outputs)
    out.print(
        f"wrote {paths}: {summary.tensors} tensors, {format_bytes(summary.bytes_written)}; read "
        f"{format_bytes(summary.bytes_read)} in {summary.seconds:.2f} s ({format_bytes(summary.throughput)}/s); "
        f"peak memory {format_bytes(summary.peak_rss)}",
        soft_wrap=True,
    )
