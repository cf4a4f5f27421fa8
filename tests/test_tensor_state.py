"""A tensor read from a torch file carries no state of its own: sizes come from its shape, not its methods.

``weights_only`` applies a tensor's pickled ``__dict__`` with ``setattr`` (``torch._tensor._rebuild_from_type_v2``);
with ``builtins.complex`` allowed, a tensor tagged ``numel = complex`` answered ``numel() == 0j`` and every
size check skipped it (issue 24).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import TorchCheckpoint
from ema_average.errors import CheckpointError


def tagged(tensor: torch.Tensor, **attributes: object) -> torch.Tensor:
    for name, value in attributes.items():
        setattr(tensor, name, value)
    return tensor


def save(path: Path, state: dict, zip_format: bool) -> Path:
    torch.save({"model": state, "step": 3}, path, _use_new_zipfile_serialization=zip_format)
    return path


def retag(path: Path, fake: str, real: str) -> None:
    """Rename a pickled attribute (``real`` would have broken ``torch.save`` itself): as a hostile file has it."""
    old, new = fake.encode(), real.encode()
    assert len(old) == len(new)
    if not zipfile.is_zipfile(path):
        path.write_bytes(path.read_bytes().replace(old, new))
        return
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_broadcast_tagged_numel_complex_is_refused(tmp_path: Path, zip_format: bool) -> None:
    """One float viewed as 2**26 (256 MiB of output from a 2 KB file), its numel() made to answer 0j."""
    wide = tagged(torch.zeros(1).expand(2**26), numel=complex)
    path = save(tmp_path / "wide.pt", {"w": wide, "b": torch.ones(2)}, zip_format)
    assert path.stat().st_size < 4096
    with pytest.raises(
        CheckpointError, match=r"wide\.pt: holds a tensor whose pickled state replaces its own 'numel'"
    ):
        TorchCheckpoint(path)


@pytest.mark.parametrize("name", ["numel", "element_size", "stride", "storage_offset", "size"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_any_tensor_method_a_file_rewrites_is_refused(tmp_path: Path, zip_format: bool, name: str) -> None:
    """An ordinary tensor tagged so: before, read from byte 0 of the file (numel) or a raw TypeError."""
    fake = "_" + name[1:]
    weight = tagged(torch.arange(6.0).reshape(2, 3), **{fake: complex})
    path = save(tmp_path / "tag.pt", {"w": weight}, zip_format)
    retag(path, fake, name)
    with pytest.raises(
        CheckpointError, match=rf"tag\.pt: holds a tensor whose pickled state replaces its own '{name}'"
    ):
        TorchCheckpoint(path)


def test_a_step_tensor_tagged_is_refused(tmp_path: Path) -> None:
    """State on any tensor of the file, not only the weights (a step read through numel())."""
    step = tagged(torch.tensor(7), numel=complex)
    path = tmp_path / "step.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": step}, path)
    with pytest.raises(CheckpointError, match=r"step\.pt: holds a tensor whose pickled state"):
        TorchCheckpoint(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_trainers_own_attribute_on_a_tensor_is_dropped(tmp_path: Path, zip_format: bool) -> None:
    """A flag a trainer set on a parameter (HF's ``_is_hf_initialized``) is no weight: the tensor reads as
    saved, without the flag."""
    weight = tagged(torch.arange(6.0).reshape(2, 3), _is_hf_initialized=True)
    path = save(tmp_path / "flag.pt", {"w": weight}, zip_format)
    checkpoint = TorchCheckpoint(path)
    read = checkpoint.read("w")
    assert torch.equal(read, torch.arange(6.0).reshape(2, 3))
    assert not hasattr(read, "_is_hf_initialized")
