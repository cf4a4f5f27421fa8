"""A sentence-transformers model folder: one checkpoint whose weights are spread over its modules' folders.

``SentenceTransformer.save`` (and its Trainer's ``checkpoint-N/``) writes ``modules.json``, listing each
module and its folder: the Transformer's weights usually in the folder itself, a ``Dense`` layer's in
``2_Dense/model.safetensors``, a ``Pooling`` or ``Normalize`` with a config and no weights. Averaging one of
them alone would leave a folder that loads as another model, so the modules are one checkpoint: each
module's tensors named by its folder (``2_Dense/linear.weight``; the top folder's unprefixed), averaged
together, and written back where they came from (``saved_model``, for a folder output).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    OpenOptions,
    SavedModel,
    SavedWeights,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.keys import loader_files
from ema_average.checkpoints.layouts.save_pretrained import (
    WEIGHT_FILES,
    HfFolderCheckpoint,
    folder_name_step,
    side_file_step,
    weight_sets,
)
from ema_average.checkpoints.reading.json_file import read_json
from ema_average.errors import CheckpointError

MODULES_FILE = "modules.json"
# What sentence-transformers reads beside each module's weights, besides the loader files of ``keys.py``.
MODULE_FILES = (MODULES_FILE, "config_sentence_transformers.json", "sentence_bert_config.json")
_MAX_MODULES_BYTES = 2**20


def is_sentence_transformers_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODULES_FILE).is_file()


def module_folders(path: Path) -> list[str]:
    """The folders ``modules.json`` lists, in its order, each checked to be a plain path inside ``path``."""
    listing = path / MODULES_FILE
    folders = []
    for folder in _listed_paths(listing):
        if not isinstance(folder, str) or not _inside(folder):
            raise CheckpointError(listing, f"lists module path {folder!r}, not a folder inside the model")
        folder = folder.strip("/")
        if "" in folder.split("/") and folder:
            raise CheckpointError(listing, f"lists module path {folder!r}, with an empty part between '/'")
        if folder in folders:
            raise CheckpointError(listing, f"lists module path {folder!r} twice")
        folders.append(folder)
    return folders


def _listed_paths(listing: Path) -> list[object]:
    """Each module's ``path`` as ``modules.json`` gives it, unchecked."""
    modules = read_json(listing, _MAX_MODULES_BYTES)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(listing, "is not a list of modules (objects with a 'path')")
    return [module.get("path") for module in modules]


def own_folders(path: Path) -> list[str]:
    """The sub-folders of ``path`` that hold its modules: part of this checkpoint, not other checkpoints for
    discovery to find (a hook for discovery's search). Taken from the paths as listed, even ones that opening
    the checkpoint refuses (it says why); none when ``modules.json`` cannot be read."""
    try:
        listed = _listed_paths(path / MODULES_FILE)
    except CheckpointError:
        return []
    firsts = {folder.strip("/").split("/")[0] for folder in listed if isinstance(folder, str)}
    return sorted(f for f in firsts if f and f not in (".", "..") and not f.startswith("."))


def _owning_folder(full: str, folders: list[str]) -> str:
    """The module a tensor named ``full`` is written back to: the longest folder it starts with (as the
    folder output routes it), else the top (``""``)."""
    return max((f for f in folders if f and full.startswith(f + "/")), key=len, default="")


def _inside(folder: str) -> bool:
    """A relative path of plain names: no ``..``, nothing absolute, nothing hidden."""
    parts = [p for p in folder.split("/") if p]
    return not folder.startswith("/") and all(p not in (".", "..") and not p.startswith(".") for p in parts)


def _check_weights_inside(where: Path, root: Path) -> None:
    """Refuse a module's weights file that is a link leading out of the model (``root``, resolved): read
    through it, another model's weights would be averaged and written as this module's. A link that leads
    nowhere is refused too: the module would silently lose its weights in the output."""
    for name in WEIGHT_FILES:
        path = where / name
        if not os.path.lexists(path):
            continue
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(root):
            raise CheckpointError(
                path,
                f"links to {real}, outside the model; every path a file names resolves inside the run; refused",
            )
        if not real.exists():
            raise CheckpointError(path, f"links to {real}, which does not exist; refused")


class SentenceTransformersCheckpoint(Checkpoint):
    """Every module's weights of one saved sentence-transformers model, as one checkpoint."""

    layout = "sentence-transformers"

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self._modules: list[tuple[str, HfFolderCheckpoint | None]] = []
        self._owner: dict[str, tuple[HfFolderCheckpoint, str]] = {}
        self._specs: dict[str, TensorSpec] = {}
        try:
            folders = module_folders(path)
            for folder in folders:
                self._add_module(folder, folders, trust_pickle)
        except BaseException:
            self.close()
            raise
        if not self._specs:
            raise CheckpointError(path / MODULES_FILE, "lists no module with weights")
        parts = [part for _, part in self._modules if part is not None]
        self.lazy = all(part.lazy for part in parts)

    def _add_module(self, folder: str, folders: list[str], trust_pickle: bool) -> None:
        where = self.path / folder
        if where.is_symlink() or (where.exists() and not where.is_dir()):
            raise CheckpointError(where, "is a module's path but not a folder inside the model; refused")
        real, root = Path(os.path.realpath(where)), Path(os.path.realpath(self.path))
        if not real.is_relative_to(root):  # a link on the way (sub/ of sub/3_Dense) leads out
            raise CheckpointError(
                self.path / MODULES_FILE,
                f"lists module path {folder!r}, which resolves to {real}, outside the model; refused",
            )
        _check_weights_inside(where, root)
        part = (
            HfFolderCheckpoint(where, trust_pickle=trust_pickle)
            if where.is_dir() and weight_sets(where)
            else None
        )
        self._modules.append((folder, part))
        if part is None:
            return
        prefix = f"{folder}/" if folder else ""
        for name, spec in part.specs().items():
            full = prefix + name
            owner = _owning_folder(full, folders)
            label = f"tensor {full!r}" if name == full else f"tensor {name!r} (named {full!r} in the model)"
            if owner != folder:  # it would be written back into (and read back from) that module's file
                raise CheckpointError(where, f"{label} lies inside module {owner!r}'s folder; refused")
            if full in self._specs:
                raise CheckpointError(where, f"{label} has the name of another module's tensor; refused")
            self._owner[full] = (part, name)
            self._specs[full] = spec

    @property
    def written_by_this_tool(self) -> bool:
        """A folder output of this tool: every module's weights carry the tool's marker."""
        parts = [part for _, part in self._modules if part is not None]
        return bool(parts) and all(part.written_by_this_tool for part in parts)

    @property
    def saved_model(self) -> SavedModel:
        """Each module's weights back in its folder (its tensors carry the folder as a prefix here), in
        shards only where the module was saved in shards (the library loads the others, ``Dense``,
        ``StaticEmbedding``, from one file, reading no index), each module's configs beside them and
        ``modules.json`` on top, so ``SentenceTransformer(DIR)`` builds the same model."""
        weights: list[SavedWeights] = []
        side: list[str] = []
        for folder, part in self._modules:
            saved = part.saved_model if part is not None else None
            into = f"{folder}/" if folder else ""
            if saved is not None:
                sharded = saved.shard_bytes is not None
                weights.append(SavedWeights(saved.weights_name, folder, into, saved.shard_bytes, sharded))
            names = loader_files(saved.weights_name if saved is not None else "", MODULE_FILES)
            side.extend(into + name for name in names)
        folders = tuple(folder for folder, _ in self._modules if folder)
        return SavedModel(self.path, weights=tuple(weights), folders=folders, side_files=tuple(side))

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> torch.Tensor:
        part, inner = self._owner[name]
        return part.read(inner)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        part, inner = self._owner[name]
        return part.read_into(inner, out)

    def read_range_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        part, inner = self._owner[name]
        return part.read_range_into(inner, start, out)

    def aliases(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for folder, part in self._modules:
            if part is not None:
                prefix = f"{folder}/" if folder else ""
                found.update({prefix + alias: prefix + first for alias, first in part.aliases().items()})
        return found

    def metadata_step(self) -> StepInfo | None:
        return side_file_step(self.path)

    def name_step(self) -> StepInfo | None:
        return folder_name_step(self.path)

    def close(self) -> None:
        for _, part in self._modules:
            if part is not None:
                part.close()


def _open(path: Path, options: OpenOptions) -> Checkpoint:
    return SentenceTransformersCheckpoint(path, trust_pickle=options.trust_pickle)


LAYOUT = Layout(
    "sentence-transformers",
    "folder",
    "sentence-transformers folders (modules.json, each module's weights in its folder: 2_Dense/model.safetensors)",
    is_sentence_transformers_folder,
    _open,
    own_folders=own_folders,
)
