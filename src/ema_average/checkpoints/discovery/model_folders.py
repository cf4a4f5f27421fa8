"""A checkpoint that is a folder of models: one step of a run whose weights sit in sub-folders or files.

diffusers training scripts save ``checkpoint-N/unet/`` and ``checkpoint-N/unet_ema/``; accelerate with
DeepSpeed saves ``checkpoint_K/pytorch_model/`` (a DeepSpeed tag); the HF Trainer with DeepSpeed saves
``checkpoint-N/global_stepN/`` beside ``model.safetensors``; a loop may save ``step_100/model.pt``. Discovery
groups such models under their step's folder; this reads one of them: the raw training weights by default
(names without ``ema``, the folder's own weights first), another with ``--submodel NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    ModelChoice,
    OpenOptions,
    SavedModel,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import is_ema_name
from ema_average.checkpoints.discovery.run_folder import is_rank_folder
from ema_average.checkpoints.registry import models_in, name_step, open_leaf, own_model, side_step
from ema_average.errors import CheckpointError, NoWeightsError

# Which sub-model of a diffusers checkpoint is "the" model, when several are trained together.
_PREFERRED = ("unet", "transformer", "prior", "decoder", "controlnet", "text_encoder")

OWN = "."  # the folder's own weights (files directly in it), as a model name


def model_name(unit: Path, model: Path) -> str:
    """How a model of ``unit`` is named for ``--submodel``: its folder or file stem; the unit's own weights
    by their file's stem (``model``, ``adapter_model``)."""
    if model == unit:
        sets = models_in(unit)
        return sets[0][0] if sets else OWN
    name = model.name.split(".")[0] if model.is_file() else model.name
    inner = model.parent.relative_to(unit).parts if model.parent.is_relative_to(unit) else ()
    return "/".join((*inner, name))  # a rank's model by its folder: mp_rank_00/model_optim_rng


def _order(unit: Path, models: list[Path]) -> list[Path]:
    """Raw weights before averages, the folder's own first, then the usual diffusers model, then by name."""

    def rank(model: Path) -> tuple[bool, bool, int, int, str]:
        name = model_name(unit, model)
        preferred = _PREFERRED.index(name) if name in _PREFERRED else len(_PREFERRED)
        return (is_ema_name(name), model != unit, preferred, -_file_size(model), name)

    return sorted(models, key=rank)


def _refuse_ranks(path: Path, names: list[str], wanted: str | None) -> None:
    """Several ranks' parts of one model-parallel save (``mp_rank_00/``, ``mp_rank_01/``): each holds a
    shard of the model, whose merging only its layout knows (DeepSpeed's is read); refused in one line,
    unless one rank is asked for (each rank's shard averages on its own)."""
    ranks = sorted({n.partition("/")[0] for n in names if "/" in n and is_rank_folder(n.partition("/")[0])})
    if len(ranks) < 2 or wanted in ranks:
        return
    shown = ", ".join(ranks[:4]) + (" ..." if len(ranks) > 4 else "")
    raise CheckpointError(
        path,
        f"holds {len(ranks)} model-parallel ranks ({shown}), each a shard of the model: merging them needs "
        f"the layout's split rules, which are not known here; average one rank's shard with --submodel {ranks[0]}",
    )


def _file_size(model: Path) -> int:
    """A loose weights file's size: of several files in a step folder the model is the largest (a loss
    function's or a metric's state beside it is a few bytes); 0 for folders, which rank by name."""
    try:
        return model.stat().st_size if model.is_file() else 0
    except OSError:
        return 0


@dataclass
class _FolderChoice(ModelChoice):
    """A model of a step's folder; one whose name says it is an average (``ema``, ``unet_ema``) is named in the
    plan as the EMA kept while training, so the user sees which copy the output averages."""

    def describe(self) -> str:
        text = super().describe()
        if not is_ema_name(self.read):
            return text
        return text.replace(f"read {self.read}", f"read {self.read} (the EMA kept while training)", 1)


class FolderUnit(Checkpoint):
    """One step's folder holding several models (or one model under a name that is not the step's)."""

    def __init__(self, path: Path, models: list[Path], options: OpenOptions) -> None:
        super().__init__(path)
        ordered = _order(path, models)
        names = [model_name(path, m) for m in ordered]
        wanted = options.submodel
        _refuse_ranks(path, names, wanted)
        picked = [m for m, n in zip(ordered, names, strict=True) if wanted in (n, n.partition("/")[0])]
        candidates = picked[:1] or ordered
        inner: Checkpoint | None = None
        skipped: list[str] = []
        for model in candidates:
            try:
                inner = open_leaf(model, replace(options, submodel=None) if picked else options)
            except NoWeightsError as exc:  # an empty state dict beside the model: a side file
                if model is candidates[-1]:
                    raise
                skipped.append(f"skipped {model.name}: no model weights ({exc.problem.split(';')[0]})")
                continue
            reached = wanted is None or bool(picked) or wanted in inner.model.split("/")
            if inner.specs() and reached:
                break
            inner.close()  # empty (a ZeRO-3 model.safetensors), or not the one asked for: the next
            if wanted is not None and not reached and model is candidates[-1]:
                raise CheckpointError(
                    path, f"has no model {wanted!r} (--submodel); its models: {', '.join(names)}"
                )
        assert inner is not None
        self.inner = inner
        self.layout = inner.layout
        self.lazy = inner.lazy
        self.notes = [*inner.notes, *skipped]
        read = model_name(path, inner.path)
        others = {
            name: f"--submodel {name}" for m, name in zip(ordered, names, strict=True) if m != inner.path
        }
        self.choices = ([_FolderChoice(read, others)] if others or picked else []) + inner.choices

    @property
    def saved_model(self) -> SavedModel | None:
        """The model read's own folder (``checkpoint-N/unet``), not the step's; where the model read has
        none (a DeepSpeed tag, a DCP folder), the step folder's own save, when a layout says it is that
        model (the HF Trainer's ``checkpoint-N/`` around its DeepSpeed tag: ``layouts.own_model``)."""
        saved = self.inner.saved_model
        if saved is None:
            return own_model(self.path, set(self.inner.specs()) | set(self.inner.aliases()))
        return saved

    def specs(self) -> dict[str, TensorSpec]:
        return self.inner.specs()

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_into(name, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_range_into(name, start, out)

    def aliases(self) -> dict[str, str]:
        return self.inner.aliases()

    def metadata_step(self) -> StepInfo | None:
        """The model's own record, else the folder's (trainer_state.json), else a diffusers EMAModel's
        ``optimization_step`` saved beside the model (``unet_ema/config.json``)."""
        found = self.inner.metadata_step() or side_step(self.path)
        if found is None:
            for sibling in sorted(p for p in self.path.iterdir() if p.is_dir() and is_ema_name(p.name)):
                info = side_step(sibling)
                if info is not None:
                    return StepInfo(info.step, f"{sibling.name}/{info.origin}", info.counter)
        return found

    def name_step(self) -> StepInfo | None:
        return name_step(self.path)

    def close(self) -> None:
        self.inner.close()


def open_unit(path: Path, models: list[Path], options: OpenOptions) -> Checkpoint:
    """The checkpoint of a step's folder holding ``models``; raises when none can be read."""
    if not models:
        raise CheckpointError(path, "holds no model weights")
    return FolderUnit(path, models, options)
