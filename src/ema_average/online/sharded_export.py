"""One ordinary safetensors file of an average kept on many ranks (FSDP2, tensor parallel, or one process).

Every rank calls :func:`save_safetensors` together. The averages are gathered one tensor at a time, in the
same order on every rank (``full_tensor()`` is a collective), and rank 0 streams each into the file through
the project's writer, so no rank ever holds more than one whole tensor. The file records what the offline
command records of its own outputs, so ``ema-average RUN --resume ema.safetensors`` continues the average
with the run's newer checkpoints.

Above the engine (which knows nothing of files) and beside the pipeline: it imports both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ema_average.checkpoints.safetensors_format import TensorSpec
from ema_average.engine.averages import MovingAverage, check_fits, is_dtensor, local_part
from ema_average.errors import ConfigurationError, OutputError
from ema_average.offline.plan import AverageSettings
from ema_average.offline.resume import output_metadata
from ema_average.output import SafetensorsWriter, TensorEntry

__all__ = ["resume_metadata", "save_safetensors"]


def save_safetensors(
    average: MovingAverage,
    path: str | Path,
    *,
    step: int,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``average`` as one safetensors file from rank 0; call it on every rank, in step.

    ``step`` is the training step of the last update (what ``--resume`` continues from); ``dtype`` the
    dtype to write (the averages' own, float32, by default): a finite average it cannot hold (above 65504
    in float16) is refused with ``OutputRangeError`` naming the tensor, never written as Inf. Every rank
    raises if rank 0 cannot write; then no file is left.
    """
    path = Path(path)
    metadata = resume_metadata(average, step, dtype)  # same settings everywhere: all raise, or none
    averages = average.averages()
    entries = [
        TensorEntry(name, TensorSpec(tuple(t.shape), dtype or t.dtype)) for name, t in averages.items()
    ]
    writer, failure = None, None
    if _rank() == 0:
        try:
            writer = SafetensorsWriter(path, entries, metadata, overwrite=overwrite)
        except Exception as exc:
            failure = exc
    _raise_on_every_rank(path, failure)
    for entry in entries:
        whole = _whole(averages[entry.name])  # a collective for a DTensor: every rank, same order
        if writer is not None and failure is None:
            try:
                check_fits(entry.name, whole, entry.dtype)  # before the rounding that would hide it
                writer.write(entry.name, whole.to(entry.dtype))
            except Exception as exc:  # keep gathering with the others, or they would wait forever
                failure = exc
        del whole
    if writer is not None:
        failure = _finish(writer, failure)
    _raise_on_every_rank(path, failure)
    return path


def resume_metadata(average: MovingAverage, step: int, dtype: torch.dtype | None = None) -> dict[str, str]:
    """The offline command's output record for an online average whose last update was at ``step``.

    Rules with a per-step meaning (exponential, power) continue from the last step alone, under the
    gap-aware "step" schedule. The uniform average needs the number of values it holds: it records that
    count beside its last step (one entry per value would outgrow the header on a long run).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < average.num_applied:
        raise ConfigurationError(
            f"step must be a whole number of at least num_applied ({average.num_applied}), got {step!r}"
        )
    gaps = average.rule.has_gap_product
    settings = AverageSettings(
        method=average.registered_name, schedule="step" if gaps else "checkpoint", **average.settings()
    )
    try:
        settings.rule()  # the settings the rule declares: what the command reads back on --resume
    except ConfigurationError:
        raise ConfigurationError(
            f"the {average.registered_name!r} average's settings {sorted(average.settings())} are not ones "
            "the offline command takes, so its output could not be resumed"
        ) from None
    count = average.num_applied + 1
    files = [f"online average of {count} values, up to step {step}"]
    written = dtype or _stored_dtype(average)
    return output_metadata(
        settings, str(written).removeprefix("torch."), [step], files, None if gaps else count
    )


def _stored_dtype(average: MovingAverage) -> torch.dtype:
    return next(iter(average.averages().values())).dtype


def _whole(value: torch.Tensor) -> torch.Tensor:
    """The whole average: a DTensor's gathered from its ranks (onto its mesh's device first when its shard
    is kept in host memory, which a GPU collective cannot read), any other tensor as it is."""
    if not is_dtensor(value):
        return value
    local, mesh = local_part(value), value.device_mesh
    if local.device.type != mesh.device_type:
        value = type(value).from_local(
            local,
            mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    return value.full_tensor()


def _finish(writer: SafetensorsWriter, failure: Exception | None) -> Exception | None:
    """Commit the file if every write went through, else remove it; the commit's own failure if any."""
    if failure is not None:
        writer.abort()
        return failure
    try:
        writer.commit()  # removes its temporary file itself when it fails
    except Exception as exc:
        return exc
    return None


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _raise_on_every_rank(path: Path, failure: Exception | None) -> None:
    """Rank 0's failure raised everywhere (its own error there, an ``OutputError`` naming it elsewhere), so
    no rank goes on to a collective that rank 0 has left."""
    problem = None if failure is None else str(failure) or type(failure).__name__
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if failure is not None:
        raise failure
    if problem is not None:
        raise OutputError(f"{path}: rank 0 could not write the average: {problem}")
