"""Where a run's outputs go and whether they can be written, decided before any work: the output paths
(a file or a folder, one per average), what a folder output holds, and the checks that refuse an output that
would overwrite an input, a tensor name safetensors cannot store, or a tensor that cannot fit on disk or in
memory. Split from :mod:`.run`, which runs the job.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from ema_average.checkpoints import Checkpoint
from ema_average.errors import CheckpointError, ConfigurationError, OutputError
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import OutputTensor, Plan
from ema_average.output import name_problem
from ema_average.output.folder_plan import OutputFolder, is_folder, plan_folder
from ema_average.output.sizes import physical_memory


def default_output(checkpoint_dir: Path, *, folder: bool = False) -> Path:
    """Beside the run's folder, never inside it, where a later run would find it as an input."""
    run = checkpoint_dir.resolve()
    return run.parent / (f"{run.name}-ema" if folder else f"{run.name}-ema.safetensors")


def output_paths(options: RunOptions, labels: list[str]) -> list[Path]:
    """The outputs: .safetensors files, or folders that ``from_pretrained`` loads (``-o`` naming anything
    else, or ``--max-shard-size``); with several averages, each named for its label
    (``out.safetensors`` -> ``out-decay0.999.safetensors``, ``out/`` -> ``out-decay0.999/``)."""
    sharded = options.max_shard_size is not None
    output = options.output or options.resume or default_output(options.checkpoint_dir, folder=sharded)
    if sharded and not is_folder(output):
        raise ConfigurationError(
            f"--max-shard-size writes a folder of shards and an index: give -o FOLDER, not {output.name}"
        )
    folder = is_folder(output)
    if folder and output.name in ("", ".."):
        raise ConfigurationError(f"-o {output}: name the output folder (e.g. -o run-ema/)")
    if folder and options.resume is not None:
        raise ConfigurationError(
            f"--resume continues a single .safetensors file; {output.name} would be a folder "
            "(give -o OUT.safetensors, and no --max-shard-size)"
        )
    outputs = [output] if len(labels) == 1 else [labelled(output, label) for label in labels]
    for path in outputs:
        if not folder and path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name ending .safetensors")
    return outputs


def output_folder(outputs: list[Path], checkpoints: list[Checkpoint]) -> OutputFolder | None:
    """For folder outputs, what each holds besides the averages: the input's weights name and the latest
    checkpoint's side files (checked now, before any work); None for .safetensors files."""
    if not is_folder(outputs[0]):
        return None
    return plan_folder(checkpoints[-1]) if checkpoints else OutputFolder()


def labelled(output: Path, label: str) -> Path:
    """``output`` with an average's label before its suffix: where that average of several is written."""
    if output.suffix == ".safetensors":
        return output.with_name(f"{output.stem}-{label}.safetensors")
    return output.with_name(f"{output.name}-{label}")


def check_not_an_input(output: Path, units: list[Path]) -> None:
    """Writing over a checkpoint (``-o`` naming one, with ``--overwrite``) would destroy the user's data.

    Every candidate counts, including those discovery skipped (copies such as checkpoint_last.pt).
    """
    target = output.resolve()
    for path in units:
        unit = path.resolve()
        if target == unit or unit in target.parents or target in unit.parents:
            raise OutputError(
                f"{output}: is (or is inside, or holds) the checkpoint {path}; write the average somewhere else"
            )


def check_names(outputs: list[OutputTensor], first: Checkpoint) -> None:
    """Names safetensors cannot store are refused now, not found out after the work."""
    for t in outputs:
        problem = name_problem(t.name)
        if problem is not None:
            raise CheckpointError(
                first.path, f"tensor {t.name!r} cannot be written to safetensors: {problem}"
            )


def check_sizes(plan: Plan, first: Checkpoint, output: Path, threads: int) -> None:
    """A tensor that cannot fit is refused now, naming it, rather than failing midway: chunks bound the
    memory, but a tensor kept whole (sources that read only whole tensors) needs it once per worker, and
    every tensor needs its room on disk (a sparse file of a few KB can claim terabytes)."""
    largest = max(plan.outputs, key=lambda t: t.spec.numel * t.out_dtype.itemsize)
    needed = largest.spec.numel * largest.out_dtype.itemsize
    folder = _existing_parent(output)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise CheckpointError(
                first.path,
                f"tensor {largest.input_name!r} ({list(largest.spec.shape)}) needs {needed} bytes of output, "
                f"more than the {free} bytes free in {folder}",
            )
    whole = max((c.numel * 3 * 8 for c in plan.chunks), default=0) * threads  # staging, shadow, scratch
    total = physical_memory()
    if total is not None and whole > total:
        chunk = max(plan.chunks, key=lambda c: c.numel)
        raise CheckpointError(
            first.path,
            f"tensor {chunk.pieces[0].input_name!r} is read whole by this layout and needs about {whole} bytes of "
            f"working memory on {threads} thread(s), more than this machine's {total}",
        )


def _existing_parent(path: Path) -> Path:
    folder = path.resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
