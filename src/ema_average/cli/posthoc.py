"""What ``--method posthoc`` prints, beside :mod:`ema_average.cli.report`: the snapshots with each target's
coefficient, each target's fit, then the offline job's own progress and summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ema_average.cli.report import execute_with_progress, out, show_summary
from ema_average.offline.posthoc_job import PosthocRun

if TYPE_CHECKING:  # rich itself is imported where a table is shown
    from rich.console import JustifyMethod


def show_plan(run: PosthocRun) -> None:
    """One row per snapshot used (file, step, its profile), one coefficient column per target; then each
    target's fit, how far its coefficients can amplify errors, and the system's condition number."""
    from rich.table import Table

    prepared = run.prepared
    plan = prepared.plan
    table = Table(
        title=f"{len(prepared.checkpoints)} {run.snapshots.kind} snapshots in {run.snapshots.folder}, "
        f"read at step {run.at_step}",
        title_justify="left",
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("#", "right"),
        ("snapshot", "left"),
        ("step", "right"),
        ("sigma_rel", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for average in plan.averages:
        table.add_column(f"coefficient {average.label}".rstrip(), justify="right")
    used = [s for s in run.snapshots.snapshots if s.profile.step <= run.at_step]
    for i, snapshot in enumerate(used):
        row = [str(i + 1), snapshot.checkpoint.path.name, str(snapshot.profile.step)]
        row.append(f"{snapshot.profile.sigma_rel:.4g}")
        row += [f"{average.weights[i]:+.6f}" for average in plan.averages]
        table.add_row(*row)
    out.print(table)
    for average, solved in zip(plan.averages, run.reconstructions, strict=True):
        target = solved.target
        out.print(
            (f"{average.label}: " if average.label else "")
            + f"power EMA sigma_rel {target.sigma_rel:.4g} (gamma {target.gamma:.6g}) at step {target.step}; "
            f"fit error {solved.fit_error:.3%}; sum |coefficient| {solved.amplification:.3g}; "
            f"condition number {solved.condition:.3g}",
            soft_wrap=True,
        )
    outputs = ", ".join(str(path) for path in prepared.outputs)
    out.print(f"output{'s' if len(prepared.outputs) > 1 else ''} {outputs} ({prepared.options.dtype})")
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True)


def run_prepared(run: PosthocRun, *, dry_run: bool, speak: bool) -> None:
    """The plan shown, then (unless a dry run) every target written in one pass, with progress."""
    if speak:
        show_plan(run)
    if dry_run:
        return
    summary = execute_with_progress(run.prepared, show=speak and out.is_terminal)
    if speak:
        show_summary(summary)
