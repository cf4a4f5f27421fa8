"""A folder output that the producing library's ``from_pretrained`` loads as it is.

``-o DIR`` (any name not ending ``.safetensors``) writes the averaged weights under the name the input had
(``model.safetensors``, ``adapter_model.safetensors``, ``diffusion_pytorch_model.safetensors``; sharded
behind an index when the input was, or with ``--max-shard-size``) and copies beside them the small files
the library needs to load them (``config.json``, tokenizer files, ``adapter_config.json``...) from the
latest averaged checkpoint's model folder. A sentence-transformers checkpoint gives every module's weights
back in its own sub-folder (``2_Dense/model.safetensors``) with its configs and ``modules.json``, so
``SentenceTransformer(DIR)`` builds the same model; a litgpt run gives ``lit_model.pth`` (a ``torch.save``
of the plain state dict) with ``model_config.yaml``, what litgpt's ``GPT`` loads. Other inputs with no
such name (torch files, DCP, DeepSpeed) give a bare ``model.safetensors``.

Side files come from folders this tool does not trust: only names on an explicit allow-list, only regular
files (a FIFO would block, a device be read forever), a link only when it resolves inside the checkpoint,
at most ``MAX_SIDE_FILE_BYTES`` each and ``MAX_SIDE_FILES_BYTES`` together (a sparse file is small on disk,
not to copy), copied as bytes a block at a time (never held whole, parsed, executed or unpickled).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ema_average.checkpoints import Checkpoint
from ema_average.checkpoints.layouts.sentence_transformers_folder import SavedModules
from ema_average.checkpoints.safetensors_format import TensorEntry
from ema_average.errors import CheckpointError
from ema_average.output.folder import ShardedWriter, WeightsFile
from ema_average.output.sizes import format_bytes

# What transformers, PEFT and diffusers read beside the weights; nothing else is ever copied.
SIDE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "adapter_config.json",
    "scheduler_config.json",
    "preprocessor_config.json",
)
# What sentence-transformers reads beside each module's weights, besides the above.
SENTENCE_TRANSFORMERS_FILES: tuple[str, ...] = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)
# What litgpt reads beside lit_model.pth (the model's config; a LoRA's hyperparameters for merge_lora),
# besides the tokenizer files and config.json above, as its copy_config_files copies them.
LITGPT_FILES: tuple[str, ...] = ("model_config.yaml", "hyperparameters.yaml")
LITGPT_WEIGHTS = "lit_model.pth"  # and lit_model.pth.lora, .adapter, .adapter_v2 for finetuned parts
# Side files that belong to one kind of weights only: transformers' from_pretrained, finding an
# adapter_config.json beside full weights, would try to load an adapter instead.
_ONLY_WITH = {"adapter_config.json": "adapter_model.safetensors"}
MAX_SIDE_FILE_BYTES = 64 * 2**20
# All side files of one folder output together: what is copied (and written) per output is bounded by this,
# whatever their sizes on disk (a sparse 64 MiB file takes a few KiB).
MAX_SIDE_FILES_BYTES = 256 * 2**20
DEFAULT_WEIGHTS_NAME = "model.safetensors"
_ONE_FILE = 2**62  # a shard size no model reaches: the weights in one file


@dataclass(frozen=True)
class SideFile:
    """A side file of a folder output: ``path``, a regular file inside the checkpoint ``unit``."""

    path: Path
    unit: Path

    def copy_into(self, writer: ShardedWriter, name: str, room: int) -> int:
        """Copy the file into ``writer`` as ``name``, streamed, checked again as it is opened; refused if it
        is larger than ``room`` (what is left of ``MAX_SIDE_FILES_BYTES``). Returns its size."""
        fd = _open_side_file(self.path, self.unit)
        try:
            size = os.fstat(fd).st_size
            if size > room:
                raise _too_large_together(self.path, self.unit)
            writer.copy_file(name, fd, size, self.path)
        finally:
            os.close(fd)
        return size


@dataclass(frozen=True)
class OutputFolder:
    """What a folder output holds: the weights' file name, how they are sharded, and the side files copied
    (output name -> the checkpoint file it is copied from, inside ``unit``). ``weights`` lays out several
    weights files instead (a sentence-transformers module's in its sub-folder, a litgpt torch file);
    ``folders`` are sub-folders made even when empty (a module with no weights nor config)."""

    weights_name: str = DEFAULT_WEIGHTS_NAME
    shard_bytes: int | None = None  # None: one weights file
    side_files: dict[str, Path] = field(default_factory=dict)
    unit: Path | None = None  # the checkpoint (or run folder) the side files come from
    weights: tuple[WeightsFile, ...] = ()
    folders: tuple[str, ...] = ()

    def max_shard_size(self, asked: int | None) -> int:
        """``--max-shard-size`` when given, else the input's largest shard, else no sharding."""
        return asked or self.shard_bytes or _ONE_FILE

    def read_side_files(self) -> dict[str, SideFile]:
        """Every side file, to be copied into each output (checked again then: it may have changed since
        planning); nothing of them is read here."""
        if not self.side_files:
            return {}
        assert self.unit is not None
        return {name: SideFile(path, self.unit) for name, path in self.side_files.items()}

    def open_writer(
        self,
        output: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str],
        *,
        overwrite: bool,
        max_shard_size: int | None,
        side_files: dict[str, SideFile],
    ) -> ShardedWriter:
        """The writer of this folder at ``output``, its side files already in; ``max_shard_size`` is
        ``--max-shard-size`` (None: each weights file sharded as its input was)."""
        weights = [
            replace(w, max_shard_size=(max_shard_size or w.max_shard_size) if w.shardable else _ONE_FILE)
            for w in self.weights
        ]
        writer = ShardedWriter(
            output,
            entries,
            metadata,
            overwrite=overwrite,
            max_shard_size=self.max_shard_size(max_shard_size),
            weights_name=self.weights_name,
            side_files={
                *SIDE_FILES,
                *self.side_files,
            },  # any of them may be in an earlier output this replaces
            weights=weights or None,
            folders=self.folders,
        )
        try:
            copied = 0
            for name, side in side_files.items():
                copied += side.copy_into(writer, name, MAX_SIDE_FILES_BYTES - copied)
        except BaseException:
            writer.abort()
            raise
        return writer

    def describe(self, asked_shard_size: int | None = None) -> str:
        """One line for the plan: the weights' name and the side files copied, and from where."""
        if self.weights:
            weights = ", ".join(f"{w.folder}/{w.name}" if w.folder else w.name for w in self.weights)
        else:
            sharded = asked_shard_size or self.shard_bytes
            weights = self.weights_name + (
                f" (shards of at most {format_bytes(sharded)} + index)" if sharded else ""
            )
        if not self.side_files:
            return f"{weights}; no side files"
        sources = {path.parent for path in self.side_files.values()}
        source = sources.pop() if len(sources) == 1 else self.unit
        return f"{weights} + {', '.join(self.side_files)} (copied from {source})"


def is_folder(output: Path) -> bool:
    """An output name not ending ``.safetensors`` is a folder (the suffix is the only sign a user gives)."""
    return output.suffix != ".safetensors"


def plan_folder(latest: Checkpoint) -> OutputFolder:
    """What a folder output of a run whose latest averaged checkpoint is ``latest`` holds; every side file
    is checked now (their sizes together too), so a bad one is refused before any work."""
    folder = _plan_folder(latest)
    if folder.unit is not None:
        total = sum(_size(path) for path in folder.side_files.values())
        if total > MAX_SIDE_FILES_BYTES:
            raise _too_large_together(folder.unit, folder.unit)
    return folder


def _plan_folder(latest: Checkpoint) -> OutputFolder:
    saved = latest.saved_model
    if isinstance(saved, SavedModules):
        return _modules_folder(saved, latest.path)
    if saved is None:
        return _litgpt_folder(latest) or OutputFolder()
    side = _side_files(saved.folder, _side_names(saved.weights_name), latest.path)
    return OutputFolder(saved.weights_name, saved.shard_bytes, side, latest.path)


def _side_names(weights_name: str, extra: Sequence[str] = ()) -> list[str]:
    """The side files that may go beside weights named ``weights_name``."""
    return [name for name in [*SIDE_FILES, *extra] if _ONLY_WITH.get(name, weights_name) == weights_name]


def _side_files(folder: Path, names: Sequence[str], unit: Path, into: str = "") -> dict[str, Path]:
    """Output name (``into/NAME``) -> file, for each of ``names`` in ``folder``, each checked now."""
    side: dict[str, Path] = {}
    for name in names:
        path = folder / name
        if os.path.lexists(path):
            os.close(_open_side_file(path, unit))
            side[f"{into}/{name}" if into else name] = path
    return side


def _modules_folder(saved: SavedModules, unit: Path) -> OutputFolder:
    """A sentence-transformers model: each module's weights back in its sub-folder (its tensors are named
    ``FOLDER/NAME`` in the checkpoint), each module's configs beside them, ``modules.json`` on top. Only a
    module saved in shards is written in shards (``--max-shard-size`` sets their size): the library loads
    other modules (``Dense``, ``StaticEmbedding``) from one file."""
    weights, side = [], {}
    for module in saved.modules:
        if module.weights_name is not None:
            prefix = f"{module.folder}/" if module.folder else ""
            sharded = module.shard_bytes is not None  # else its loader may read one file only (Dense)
            weights.append(
                WeightsFile(module.weights_name, module.folder, prefix, module.shard_bytes, sharded)
            )
        names = _side_names(module.weights_name or "", SENTENCE_TRANSFORMERS_FILES)
        side.update(_side_files(saved.folder / module.folder, names, unit, module.folder))
    folders = tuple(m.folder for m in saved.modules if m.folder)
    return OutputFolder(DEFAULT_WEIGHTS_NAME, None, side, unit, tuple(weights), folders)


def _litgpt_folder(latest: Checkpoint) -> OutputFolder | None:
    """A litgpt run (``step-N/lit_model.pth``): the averaged state dict as ``lit_model.pth`` (or the
    finetuned part's name, ``lit_model.pth.lora``) and ``model_config.yaml`` from the latest step, else from
    the run's ``final/``; None for any other torch file."""
    leaf = latest
    while isinstance(getattr(leaf, "inner", None), Checkpoint):  # a step folder's model: its file
        leaf = leaf.inner  # type: ignore[attr-defined]
    if not leaf.path.name.startswith(LITGPT_WEIGHTS) or not leaf.path.is_file():
        return None
    names = _side_names(leaf.path.name, LITGPT_FILES)
    final = leaf.path.parent.parent / "final"
    unit = final.parent if final.is_dir() else leaf.path.parent
    side = _side_files(final, names, unit) if final.is_dir() else {}
    side.update(_side_files(leaf.path.parent, names, unit))  # the latest step's own, where it has them
    return OutputFolder(leaf.path.name, None, side, unit, (WeightsFile(leaf.path.name),))


def _open_side_file(path: Path, unit: Path) -> int:
    """An open descriptor of ``path``, refused unless it is (or links to) a regular file inside ``unit``
    of at most ``MAX_SIDE_FILE_BYTES``. Stat before open (opening a device can act), fstat after (the
    file may have been swapped between the two)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(unit)):
        raise CheckpointError(
            path, f"links to {real}, outside the checkpoint {unit}; side files are not copied from there"
        )
    try:
        _check_regular(path, os.stat(real))
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        _check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(path, f"is {kind}; only regular files are copied as side files")
    if info.st_size > MAX_SIDE_FILE_BYTES:
        raise _too_large(path)


def _too_large(path: Path) -> CheckpointError:
    return CheckpointError(
        path, f"is larger than {MAX_SIDE_FILE_BYTES // 2**20} MiB, too large for a side file; refused"
    )


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _too_large_together(path: Path, unit: Path) -> CheckpointError:
    """The side files of ``unit`` past ``MAX_SIDE_FILES_BYTES`` together (found at planning, or at ``path``
    while copying, where they grew since)."""
    limit = MAX_SIDE_FILES_BYTES // 2**20
    where = "" if path == unit else f" (at {path.name})"
    return CheckpointError(
        unit,
        f"holds side files larger than {limit} MiB together{where}; a folder output copies no more; refused",
    )
