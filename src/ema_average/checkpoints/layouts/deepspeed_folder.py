"""DeepSpeed checkpoint folders (``global_stepN/``), every ZeRO stage, read lazily without DeepSpeed.

``engine.save_checkpoint`` writes ``mp_rank_00_model_states.pt`` (the ``module`` state dict, ``global_steps``,
``param_shapes``, ``buffer_names``, ``shared_params``, frozen parameters) and, with ZeRO, one
``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank holding that rank's partition
of the fp32 master weights. Under ZeRO-3 the model states are per rank too
(``zero_pp_rank_R_mp_rank_00_model_states.pt``) and ``module`` holds only placeholders of shape (0,).

Two models may be read: ``module`` (the weights as the model held them, e.g. bf16; ZeRO-0/1/2 only, the
default there) and ``fp32`` (the master weights, each parameter rebuilt from the rank partitions exactly
as DeepSpeed's ``zero_to_fp32.py`` does, the only choice under ZeRO-3). The rebuild is lazy: each file is
unpickled onto the meta device, each piece of a parameter (a module tensor, a slice of a flat fp32 group, a
frozen fragment) is kept as where its bytes lie in its file, and a read copies them with ``pread`` into the
caller's buffer, checking the file is still the one planned: nothing is mapped, so a partition cut short
while it is read is a clear error, never a SIGBUS, and nobody has to run ``zero_to_fp32`` per checkpoint.
Files that cannot be laid out so (legacy, big-endian, repacked zips) are loaded or mapped, as the plan
notes. Tensor-, pipeline- and expert-parallel saves and NVMe offload are refused with one line.

Where each parameter's values lie (the ZeRO partition geometry) is :mod:`deepspeed_zero`'s; this module
finds the files, opens them and reads.

The files are untrusted: every tensor used is checked as torch files' are (an expanded view is a few bytes of
file and any size of output; meta, sparse, complex and quantized tensors cannot be averaged), and the counts
and shapes the files claim are checked against the files present before anything is built from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    ModelChoice,
    OpenOptions,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.steps import checked_step
from ema_average.checkpoints.contents.torch_objects import checked_name
from ema_average.checkpoints.layouts.deepspeed_zero import (
    FlatSlice,
    NotLaidOutIn,
    Opened,
    Source,
    alignment_paddings,
    buffer_names,
    check_ranks,
    checked_shape,
    flat_groups,
    frozen_fragment,
    frozen_whole,
    module_aliases,
    module_sources,
    one_dtype,
    optimizer_state,
    param_shapes,
    partition_count,
    shared_aliases,
    shared_names,
    trim,
    whole_source,
    zero2_params,
    zero3_params,
)
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import open_torch_file
from ema_average.checkpoints.reading.tensor_state import numel_of
from ema_average.checkpoints.reading.zip_offsets import file_offset
from ema_average.errors import CheckpointError

_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_UNSUPPORTED = (
    (re.compile(r"^(?:layer_\d+-|expert_|expp_rank_)"), "pipeline- or expert-parallel files"),
    (re.compile(r"^offloaded_tensors$"), "NVMe-offloaded optimizer state (offloaded_tensors/)"),
)
_AUTOEP_KEYS = ("ds_autoep_layers", "autoep_layers")


def is_deepspeed_folder(path: Path) -> bool:
    """A folder holding DeepSpeed model states (one tag of ``save_checkpoint``)."""
    try:
        return path.is_dir() and any(_MODEL_STATES.match(p.name) for p in path.iterdir())
    except OSError:
        return False


@dataclass
class _Files:
    model: dict[int, Path]  # data-parallel rank -> model states (one file, rank 0, below ZeRO-3)
    optim: dict[int, Path]  # data-parallel rank -> optimizer partition
    partitioned: bool  # ZeRO-3: model states per rank


def _files(path: Path) -> _Files:
    """The folder's DeepSpeed files by rank; what this reader does not support is refused by name."""
    model: dict[int, Path] = {}
    optim: dict[int, Path] = {}
    partitioned = False
    for entry in sorted(path.iterdir()):
        for pattern, what in _UNSUPPORTED:
            if pattern.match(entry.name):
                raise CheckpointError(path, f"holds {what}, which this tool does not read; refused")
        found = _MODEL_STATES.match(entry.name)
        if found:
            _check_mp_rank(path, found.group(2))
            partitioned = partitioned or found.group(1) is not None
            model[int(found.group(1) or 0)] = entry
        found = _OPTIM_STATES.match(entry.name)
        if found:
            _check_mp_rank(path, found.group(2))
            optim[int(found.group(1))] = entry
    return _Files(model, optim, partitioned)


def _check_mp_rank(path: Path, mp_rank: str) -> None:
    if int(mp_rank) != 0:
        raise CheckpointError(
            path,
            f"is a tensor-parallel DeepSpeed save (mp_rank_{mp_rank}); "
            "merge the model-parallel ranks first, this tool reads mp_rank_00 only",
        )


class DeepSpeedCheckpoint(Checkpoint):
    """One DeepSpeed checkpoint tag folder; ``submodel`` ``"module"`` or ``"fp32"`` picks what is read."""

    layout = "deepspeed"

    def __init__(self, path: Path, *, trust_pickle: bool = False, submodel: str | None = None) -> None:
        super().__init__(path)
        self._trust_pickle = trust_pickle
        self._files = _files(path)
        if 0 not in self._files.model:
            raise CheckpointError(path, "has no rank-0 model states file (mp_rank_00_model_states.pt)")
        self._mapped: dict[Path, str] = {}  # files read through a mapping, and why
        self._preads: list[PreadFile] = []
        self._in_memory = False  # some piece is a tensor in memory: dropped by close
        main = self._load(self._files.model[0])
        self.stage = 3 if self._files.partitioned else (2 if self._files.optim else 0)
        self._step = _global_steps(main)
        models = ["fp32"] if self.stage == 3 else (["module", "fp32"] if self._files.optim else ["module"])
        if submodel == "module" and self.stage == 3:
            raise CheckpointError(
                path,
                "is a ZeRO-3 save: its module holds only placeholders; the weights are rebuilt from the "
                "optimizer partitions (--submodel fp32, the default)",
            )
        self.model_name = submodel if submodel in models else models[0]
        if len(models) > 1 or self.stage == 3:
            others = {m: f"--submodel {m}" for m in models if m != self.model_name}
            self.choices = [ModelChoice(self.model_name, others)]
        self._sources: dict[str, Source] | None = None
        self._aliases: dict[str, str] = {}
        self._specs = {name: TensorSpec(s.shape, s.dtype) for name, s in self._index(main).items()}
        self._note_how_read()
        self.close()  # a run may have hundreds of these: descriptors are reopened on the first read

    def _load(self, file: Path) -> Opened:
        contents = open_torch_file(
            file, trust_pickle=self._trust_pickle, mapped_because=self._mapped.get(file)
        )
        obj = contents.obj
        if not isinstance(obj, Mapping):
            raise CheckpointError(file, f"holds a {type(obj).__name__}, not DeepSpeed's state dict")
        if any(key in obj for key in _AUTOEP_KEYS):
            raise CheckpointError(
                file, "is an AutoEP (expert-partitioned) save, which this tool does not read"
            )
        if contents.mapped_because is not None:
            self._mapped[file] = contents.mapped_because
        pread = PreadFile(file, contents.planned) if contents.lazy else None
        if pread is not None:
            self._preads.append(pread)
        else:
            self._in_memory = True
        return Opened(file, obj, contents, pread)

    def _note_how_read(self) -> None:
        """The plan says which files are mapped or loaded whole rather than read with ``pread``."""
        for file, because in sorted(self._mapped.items()):
            self.notes.append(f"{file.name} read through a mapping of the file: {because}")
        if self._in_memory and not self._mapped:
            self.lazy = False
            self.notes.append("legacy (non-zip) torch format: loaded whole, not lazily")

    def _index(self, main: Opened | None = None) -> dict[str, Source]:
        """Every tensor's source, built once per opening; a file whose zip is not laid out as torch.save
        writes it is read again through a mapping (at most once per file)."""
        while self._sources is None:
            try:
                self._sources = self._build(main)
            except NotLaidOutIn as exc:
                self.close()
                self._preads, self._in_memory, main = [], False, None
                self._mapped[exc.file] = f"its zip is not laid out as torch.save writes it ({exc})"
        return self._sources

    def _build(self, main: Opened | None) -> dict[str, Source]:
        main = main if main is not None else self._load(self._files.model[0])
        module = main.obj.get("module")
        if not isinstance(module, Mapping) or not module:
            raise CheckpointError(self._files.model[0], "has no 'module' state dict")
        if self.model_name == "module":
            sources = module_sources(main, module)
            self._aliases = module_aliases(main, module)
        else:
            sources = self._fp32_sources(main, module)
            self._aliases = {}
        self._aliases.update(shared_aliases(main.obj, sources))
        return sources

    def _fp32_sources(self, main: Opened, module: Mapping[str, Any]) -> dict[str, Source]:
        file = self._files.model[0]
        if not self._files.optim:
            raise CheckpointError(
                self.path,
                "is a ZeRO-3 save without its optimizer partitions (*optim_states.pt), which hold "
                "the weights",
            )
        first = self._load(self._files.optim[min(self._files.optim)])
        states = [optimizer_state(first)]
        world = partition_count(first.path, states[0])  # checked against the files before anything is built
        check_ranks(self.path, "optimizer partitions", self._files.optim, world)
        if self.stage == 3:
            check_ranks(self.path, "model states", self._files.model, world)
        optim = [first] + [self._load(self._files.optim[r]) for r in range(1, world)]
        states += [optimizer_state(opened) for opened in optim[1:]]
        shapes = param_shapes(file, main.obj)
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        partitions = [flat_groups(opened, state, key) for opened, state in zip(optim, states, strict=True)]
        one_dtype([o.path for o in optim], key, [groups[0] for groups in partitions])
        if self.stage == 3:
            trainable = zero3_params(file, shapes, partitions, world)
        else:
            paddings = alignment_paddings(first.path, states[0].get("param_alignment_paddings"), shapes)
            trainable = zero2_params(file, shapes, partitions, world, paddings)
        frozen = self._frozen(main)
        buffers = set(buffer_names(file, main.obj.get("buffer_names")))
        sources: dict[str, Source] = {}
        for key_, tensor in module.items():
            name = checked_name(file, key_)
            if name in trainable:
                sources[name] = trainable[name]
            elif name in frozen:
                sources[name] = frozen[name]
            elif isinstance(tensor, torch.Tensor) and (name in buffers or self.stage < 3):
                # buffers (read as float32, as zero_to_fp32 does); frozen parameters ZeRO-1 keeps in module
                sources[name] = whole_source(main, name, tensor, to_fp32=name in buffers)
            elif name not in shared_names(main.obj):
                raise CheckpointError(file, f"has no data for parameter {name!r} (a ZeRO-3 placeholder)")
        for name, source in trainable.items():  # in the optimizer but not in module: kept all the same
            sources.setdefault(name, source)
        return sources

    def _frozen(self, main: Opened) -> dict[str, Source]:
        """Parameters the optimizer does not hold (requires_grad=False), saved beside it from ZeRO-2 on
        (in rank 0's model states; under ZeRO-3 in every rank's, the ranks already checked)."""
        shapes = main.obj.get("frozen_param_shapes")
        if not isinstance(shapes, Mapping) or not shapes:
            return {}
        files = [self._files.model[r] for r in sorted(self._files.model)] if self.stage == 3 else []
        ranks = [main] + [self._load(f) for f in files[1:]]
        found: dict[str, Source] = {}
        for key, shape in shapes.items():
            name = checked_name(main.path, key)
            dims = checked_shape(main.path, name, shape)
            frags = [frozen_fragment(opened, name) for opened in ranks]
            one_dtype([o.path for o in ranks], name, frags)
            if self.stage < 3:
                found[name] = frozen_whole(main.path, name, frags[0], dims)
            else:  # each fragment flattened, end to end: a read copies at most what the files hold
                pieces = [FlatSlice(f, 0, f.numel()) for f in frags]
                found[name] = Source(dims, frags[0].dtype, trim(main.path, name, pieces, math.prod(dims)))
        return found

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.read_range_into(name, 0, out.view(-1))
        return out

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of ``name`` (flattened) into ``out``, each piece read from its file."""
        done, skip = 0, start
        for piece in self._index()[name].pieces:
            if done == out.numel():
                break
            if skip >= piece.length:
                skip -= piece.length
                continue
            take = min(piece.length - skip, out.numel() - done)
            target = out[done : done + take]
            if piece.flat.dtype == out.dtype:
                piece.flat.read_range_into(piece.start + skip, target)
            else:  # a buffer read as float32: read as saved, then converted
                target.copy_(
                    piece.flat.read_range_into(piece.start + skip, torch.empty(take, dtype=piece.flat.dtype))
                )
            done, skip = done + take, 0
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def close(self) -> None:
        """Hands back the descriptors (reopened by the next read); tensors held in memory (legacy or
        mapped files) are dropped and loaded again on the next read."""
        for pread in self._preads:
            pread.close()
        if self._in_memory:
            self._sources, self._preads, self._in_memory = None, [], False


def _global_steps(main: Opened) -> StepInfo | None:
    value = main.obj.get("global_steps")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and numel_of(value) == 1 and file_offset(value) is not None:
        value = main.held("global_steps", value).read_range_into(0, torch.empty(1, dtype=value.dtype))
    return StepInfo(checked_step(main.path, value, "metadata:global_steps"), "metadata:global_steps")


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return DeepSpeedCheckpoint(path, trust_pickle=options.trust_pickle, submodel=options.submodel)


LAYOUT = Layout(
    "deepspeed",
    "folder",
    "DeepSpeed folders (global_stepN/ with *model_states.pt, ZeRO *optim_states.pt)",
    is_deepspeed_folder,
    _open,
)
