"""torch files (``.pt .pth .bin .ckpt .th .pth.tar``): a bare state dict, or a dict holding one, with a step.

Covers plain ``torch.save(model.state_dict())``, Lightning ``.ckpt`` (``state_dict``, ``global_step``),
fairseq (``model``, ``optimizer_history[-1]["num_updates"]``), timm's ``CheckpointSaver`` (``state_dict``,
``epoch``), MosaicML composer (``state.model``, ``state.timestamp``), and the usual trainer dicts
(``model``, ``module``, ``model_state_dict``...). Where a file holds an average beside the raw weights
(timm ``state_dict_ema``, fairseq ``extra_state.ema``, Lightning EMAWeightAveraging, composer's EMA
algorithm), the raw weights are read and the average is named with the ``--state-dict-key`` that reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import (
    CHECKPOINT_SUFFIXES,
    is_side_file,
)
from ema_average.checkpoints.contents.recorded_steps import final_copy, find_step
from ema_average.checkpoints.contents.torch_objects import NeedsFullUnpickling, as_mapping, find_state_dict
from ema_average.checkpoints.reading.positioned import PreadFile
from ema_average.checkpoints.reading.safe_unpickle import TorchFile, ZipMember, open_torch_file
from ema_average.checkpoints.reading.tensor_checks import (
    first_names,
    named_bytes_problem,
    storage_aliases,
    tensor_problem,
)
from ema_average.checkpoints.reading.tensor_state import numel_of
from ema_average.checkpoints.reading.zip_offsets import NotLaidOut as _NotLaidOut
from ema_average.checkpoints.reading.zip_offsets import Stored as _Stored
from ema_average.checkpoints.reading.zip_offsets import file_offset as _file_offset
from ema_average.checkpoints.reading.zip_offsets import fill
from ema_average.checkpoints.reading.zip_offsets import stored as _stored
from ema_average.errors import CheckpointError


class TorchCheckpoint(Checkpoint):
    """A torch-saved file. Zip files (torch >= 1.6) are unpickled onto the meta device and each tensor's
    bytes read with ``pread`` from where its storage lies in the file, like safetensors: nothing is
    mapped, so a file cut short while it is read is a clear error, never a SIGBUS. Legacy files are
    loaded whole."""

    layout = "torch"

    def __init__(self, path: Path, *, state_dict_key: str | None = None, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self._state_dict_key = state_dict_key
        self._trust_pickle = trust_pickle
        self._tensors: dict[str, torch.Tensor] | None = None  # legacy files: the tensors, in memory
        self._stored: dict[str, _Stored] = {}  # zip files: where each tensor lies in the file
        self._file: PreadFile | None = None
        self._mapped_because: str | None = None
        self._step: StepInfo | None = None
        self._full = False  # fully unpickled: the weights are a pickled model (--trust-pickle)
        self._weights_wanted = False  # a final copy's weights are looked for only when it is read
        self._weights_found = False
        self._open()
        if self._raw_is_lightning:
            self.layout = "lightning"

    def _open(self, mapped_because: str | None = None) -> None:
        contents = self._unpickled(mapped_because)
        try:
            self._take(contents)
        except _NotLaidOut as exc:  # repacked by another zip tool: torch's own offsets do not hold
            self._open(f"its zip is not laid out as torch.save writes it ({exc})")
            return
        except NeedsFullUnpickling:  # the weights are a pickled model, and the user trusts the file
            self._full = True
            self._open(mapped_because)
            return
        self._mapped_because = contents.mapped_because
        note = None
        if contents.mapped_because is not None:
            note = f"read through a mapping of the file: {contents.mapped_because}"
        elif not contents.lazy:
            self.lazy = False
            note = "legacy (non-zip) torch format: loaded whole, not lazily"
        if note is not None and note not in self.notes:
            self.notes.append(note)

    def _unpickled(self, mapped_because: str | None) -> TorchFile:
        return open_torch_file(
            self.path, trust_pickle=self._trust_pickle, mapped_because=mapped_because, full=self._full
        )

    def _take(self, contents: TorchFile) -> None:
        """The state dict and step of ``contents``; where each tensor lies in the file (zip files)."""
        obj = as_mapping(self.path, contents.obj, trust_pickle=self._trust_pickle, trusted=contents.trusted)
        self._file = PreadFile(self.path, contents.planned) if contents.lazy else None
        self._raw_is_lightning = "pytorch-lightning_version" in obj
        self.final_copy = final_copy(obj)
        self._step = find_step(self.path, obj, lambda t: self._materialised(t, contents.members))
        self._key = None
        if self.final_copy is not None and self._step is None and not self._weights_wanted:
            return  # skipped as a final copy before its weights (a pickled model) are unpickled fully
        self._weights_found = True
        tensors, self._key, choice = find_state_dict(
            self.path, obj, self._state_dict_key, trust_pickle=self._trust_pickle
        )
        self.choices = [choice] if choice is not None else []
        for name, tensor in tensors.items():
            problem = tensor_problem(tensor, in_file=contents.lazy and _file_offset(tensor) is not None)
            if problem is not None:
                raise CheckpointError(self.path, f"tensor {name!r} {problem}")
        problem = named_bytes_problem(tensors, contents.members if contents.lazy else None)
        if problem is not None:
            raise CheckpointError(self.path, problem)
        if contents.lazy:
            self._stored = {
                name: _stored(self.path, name, t, contents.members) for name, t in tensors.items()
            }
        else:
            self._tensors = tensors
        self._specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}

    def _materialised(self, tensor: torch.Tensor, members: dict[int, ZipMember]) -> torch.Tensor:
        """A one-element tensor of the file (a step) with its value read, for the step finders."""
        if self._file is None or numel_of(tensor) != 1 or _file_offset(tensor) is None:
            return tensor
        if tensor_problem(tensor, in_file=True) is not None:
            return tensor  # refused as a step by checked_step
        return self._read_stored(_stored(self.path, "(step)", tensor, members), "(step)")

    def _weights(self) -> None:
        """A final copy read after all (named alone, or asked for): its weights looked for now; with
        ``--trust-pickle`` that may unpickle it fully, which skipping it never does."""
        if not self._weights_found:
            self._weights_wanted = True
            self._open(self._mapped_because)

    @property
    def state_dict_key(self) -> str | None:
        """Which key of the saved dict held the weights (``None``: the file is a bare state dict)."""
        self._weights()
        return self._key

    def _state(self) -> dict[str, torch.Tensor]:
        """A legacy or mapped file's tensors, loaded again after :meth:`close`."""
        if self._tensors is None:
            self._take(self._unpickled(self._mapped_because))
        assert self._tensors is not None
        return self._tensors

    def specs(self) -> dict[str, TensorSpec]:
        self._weights()
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return self._state()[name]
        return self._read_stored(self._stored[name], name)

    def _read_stored(self, stored: _Stored, name: str) -> torch.Tensor:
        return self._fill(stored, name, 0, torch.empty(stored.shape, dtype=stored.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return out.copy_(self._state()[name])
        return self._fill(self._stored[name], name, 0, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        self._weights()
        if self._file is None:
            return out.copy_(self._state()[name].reshape(-1)[start : start + out.numel()])
        return self._fill(self._stored[name], name, start, out)

    def _fill(self, stored: _Stored, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start ..`` of the tensor (flattened) into ``out``, read from the file."""
        assert self._file is not None
        return fill(self._file, stored, name, start, out)

    def metadata_step(self) -> StepInfo | None:
        return self._step

    def aliases(self) -> dict[str, str]:
        self._weights()
        if self._file is None:
            return storage_aliases(self._state())
        return first_names({name: s.identity for name, s in self._stored.items() if s.numel})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # reopened by the next read
        else:
            self._tensors = None


def _claims(path: Path) -> bool:
    name = path.name.lower()
    return (
        name.endswith(CHECKPOINT_SUFFIXES)
        and not name.endswith(".safetensors")
        and not is_side_file(path.name)
    )


def _open_layout(path: Path, options: OpenOptions) -> Checkpoint:
    """``--submodel NAME`` reads the state dict under key ``NAME`` (``--submodel ema``), as
    ``--state-dict-key`` does: in a torch file a model is picked by its key."""
    key = options.state_dict_key or options.submodel
    return TorchCheckpoint(path, state_dict_key=key, trust_pickle=options.trust_pickle)


LAYOUT = Layout(
    "torch",
    "file",
    f"files ending {', '.join(s for s in CHECKPOINT_SUFFIXES if s != '.safetensors')}",
    _claims,
    _open_layout,
)
