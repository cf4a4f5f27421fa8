"""Checkpoint files are untrusted: nothing in them runs unless the user opts in."""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import operator
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from ema_average.checkpoints import TorchCheckpoint
from ema_average.checkpoints.base import StepInfo
from ema_average.checkpoints.reading import safe_unpickle
from ema_average.errors import CheckpointError, UnsafeCheckpointError
from helpers import WritesMarker, write_fairseq_run

MARKER_ENV = "EMA_AVERAGE_TEST_MARKER"


class Harmless:
    def __init__(self) -> None:
        self.value = 3


class Adds:
    """Unpickled, this calls ``operator.add``: a standard-library callable, refused; harmless if run."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (operator.add, (1, 2))


class TrainerState:
    """A trainer's own object; unpickling it for real (its ``__setstate__``) writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)
        self.history = torch.ones(3)  # a tensor inside an object: no weight

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


class Launcher:
    def run(self, marker: str) -> None:
        Path(marker).touch()


class CallsAMethod:
    """Unpickled, this calls ``Launcher().run(marker)``: a bound method pickles as getattr(obj, "run")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Launcher().run, (str(self.marker),))


class GetattrOnAType:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (getattr, (collections.OrderedDict, "fromkeys"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_never_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "payload": WritesMarker(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: needs arbitrary unpickling.*--trust-pickle"):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Adds()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"needs arbitrary unpickling \(_operator\.add\)"):
        TorchCheckpoint(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_trainers_object_loads_as_a_placeholder_named_in_the_plan(tmp_path: Path, zip_format: bool) -> None:
    path, marker = tmp_path / "custom.pt", tmp_path / "ran"
    state = {"model": {"w": torch.arange(3.0)}, "extra": TrainerState(marker), "step": 4}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    for trust_pickle in (False, True):  # the safe load reads it: no full unpickling, even when trusted
        ckpt = TorchCheckpoint(path, trust_pickle=trust_pickle)
        assert ckpt.tensor_names() == ["w"]  # the tensor inside the object is no weight
        assert ckpt.read("w").tolist() == [0.0, 1.0, 2.0]
        described = ckpt.choices[0].describe()
        assert described == f"read model; not averaged: extra: {__name__}.TrainerState object (not read)"
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: unpickling it for real runs its code
    assert marker.exists()


def test_trust_pickle_opts_in_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "extra": Adds()}, path)
    with pytest.warns(UserWarning, match="full unpickling"):
        ckpt = TorchCheckpoint(path, trust_pickle=True)
    assert ckpt.read("w").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("payload", ["method", "partial", "in-object", "getattr-on-a-type", "torch.load"])
def test_payloads_beside_placeholders_never_run(tmp_path: Path, zip_format: bool, payload: str) -> None:
    marker = tmp_path / "pwned"
    made = {
        "method": lambda: CallsAMethod(marker),
        "partial": lambda: functools.partial(os.system, f"touch {marker}"),
        "in-object": lambda: (Harmless(), TrainerState.__new__(TrainerState)),
        "getattr-on-a-type": GetattrOnAType,
        "torch.load": lambda: functools.partial(torch.load, str(marker)),
    }[payload]()
    if payload == "in-object":  # a payload inside a trainer's object's state
        made[1].__dict__.update(marker=str(marker), hook=WritesMarker(marker))
    path = tmp_path / "evil.pt"
    torch.save(
        {"model": {"w": torch.zeros(2)}, "extra": made}, path, _use_new_zipfile_serialization=zip_format
    )
    if marker.exists():
        marker.unlink()
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil\.pt: (needs arbitrary unpickling|pickles an object)"
    ):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_getattr_chains_on_placeholders_stay_short() -> None:
    from ema_average.checkpoints.reading import placeholders

    value: object = placeholders.placeholder_class("trainer.pkg.Thing")
    for _ in range(10_000):
        value = placeholders.inert_getattr(value, "a" * 1000)
    assert len(repr(value)) < 300
    with pytest.raises(placeholders.RefusedCall):
        placeholders.inert_getattr(collections.OrderedDict(), "popitem")


def test_kinds_of_placeholders_in_a_file_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_unpickle, "MAX_PLACEHOLDERS", 1)
    path = tmp_path / "many.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "a": Harmless(), "b": Launcher()}, path)
    with pytest.raises(CheckpointError, match=r"many\.pt: names more than 1 kinds of pickled objects"):
        TorchCheckpoint(path)


def test_pure_data_objects_load_without_opt_in(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    path = tmp_path / "fs.pt"
    torch.save(
        {
            "args": argparse.Namespace(lr=[0.1]),
            "cfg": OmegaConf.create({"a": {"b": [1, 2]}}),
            "model": {"w": torch.arange(2.0)},
            "num_updates": 5,
        },
        path,
    )
    ckpt = TorchCheckpoint(path)
    assert ckpt.read("w").tolist() == [0.0, 1.0]
    assert ckpt.metadata_step() is not None and ckpt.metadata_step().step == 5


def resave_legacy(source: Path, target: Path) -> None:
    """Re-save a file written by this test session in the legacy (non-zip) format, as old torch did."""
    obj = torch.load(source, weights_only=False)  # our own file, written just above
    torch.save(obj, target, _use_new_zipfile_serialization=False)


def test_legacy_fairseq_checkpoint_loads_with_stand_ins(tmp_path: Path) -> None:
    states = write_fairseq_run(tmp_path / "zip", [300])
    path = tmp_path / "checkpoint_1_300.pt"
    resave_legacy(tmp_path / "zip" / "checkpoint_1_300.pt", path)
    ckpt = TorchCheckpoint(path)
    assert not ckpt.lazy
    assert ckpt.metadata_step() == StepInfo(300, "metadata:optimizer_history[-1].num_updates")
    for name, tensor in states[300].items():
        assert torch.equal(ckpt.read(name), tensor)


def test_legacy_fairseq_checkpoint_with_a_payload_is_refused(tmp_path: Path) -> None:
    write_fairseq_run(tmp_path / "zip", [300])
    obj = torch.load(tmp_path / "zip" / "checkpoint_1_300.pt", weights_only=False)
    marker = tmp_path / "pwned"
    obj["extra_state"]["payload"] = WritesMarker(marker)
    path = tmp_path / "evil.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil\.pt: needs arbitrary unpickling \(posix\.system\)"
    ):
        TorchCheckpoint(path)
    assert not marker.exists()


def test_stand_ins_for_a_legacy_file_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_unpickle, "MAX_PLACEHOLDERS", 1)
    path = tmp_path / "old.pt"
    extra = {"a": argparse.Namespace(x=1), "b": datetime.timedelta(days=1)}
    torch.save({"model": {"w": torch.zeros(2)}, **extra}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old\.pt: names more than 1 kinds of pickled objects"):
        TorchCheckpoint(path)


def trainer_extras() -> dict[str, object]:
    """Pure-data objects trainers pickle beside the weights (composer, Lightning, HF...)."""
    return {
        "elapsed": datetime.timedelta(hours=2, seconds=3),
        "saved_at": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
        "naive_time": datetime.datetime(2024, 5, 1, 12, 30),
        "day": datetime.date(2024, 5, 1),
        "clock": datetime.time(12, 30),
        "torch_version": torch.__version__,
    }


@pytest.mark.parametrize("zip_format", [True, False])
def test_datetimes_and_torch_version_load(tmp_path: Path, zip_format: bool) -> None:
    assert type(torch.__version__).__name__ == "TorchVersion"
    path = tmp_path / "a.pt"
    obj = {"model": {"w": torch.arange(3.0)}, "step": 9, **trainer_extras()}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    ckpt = TorchCheckpoint(path)
    assert ckpt.read("w").tolist() == [0.0, 1.0, 2.0]
    assert ckpt.metadata_step() == StepInfo(9, "metadata:step")


@pytest.mark.parametrize("zip_format", [True, False])
def test_payload_beside_pure_data_never_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model": {"w": torch.zeros(2)}, **trainer_extras(), "zz": WritesMarker(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: needs arbitrary unpickling.*--trust-pickle"):
        TorchCheckpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b'{"model": {"w": [1, 2]}}', b"", b"\x80\x02}q\x00(X\x01"],
    ids=["garbage", "json", "empty", "cut-pickle"],
)
def test_damaged_files_are_not_called_unsafe(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt: is damaged or not a torch file") as caught:
        TorchCheckpoint(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)
    assert "--trust-pickle" not in str(caught.value)


def test_git_lfs_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    with pytest.raises(CheckpointError, match=r"model\.pt: is a Git LFS pointer.*git lfs pull") as caught:
        TorchCheckpoint(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)


def test_composer_time_objects_load_as_stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """composer's Time, TimeUnit (an enum, pickled by its full name) and Timestamp are data: stood in for."""
    import enum
    import sys
    import types

    module = types.ModuleType("composer.core.time")

    class TimeUnit(enum.Enum):
        BATCH = "ba"

    class Time:
        def __init__(self, value: int, unit: TimeUnit) -> None:
            self.value, self.unit = value, unit

    for cls in (TimeUnit, Time):
        cls.__module__, cls.__qualname__ = "composer.core.time", cls.__name__
        setattr(module, cls.__name__, cls)
    for name, mod in (("composer", types.ModuleType("composer")), ("composer.core", types.ModuleType("c"))):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "composer.core.time", module)
    torch.save({"model": {"w": torch.ones(2)}, "step": 3, "t": Time(3, TimeUnit.BATCH)}, tmp_path / "c.pt")
    for name in ("composer.core.time", "composer.core", "composer"):
        monkeypatch.delitem(sys.modules, name)
    ckpt = TorchCheckpoint(tmp_path / "c.pt")
    assert ckpt.tensor_names() == ["w"]
    assert "composer" not in sys.modules  # nothing of theirs was imported


def test_loads_from_several_threads_keep_their_stand_ins(tmp_path: Path) -> None:
    # torch allows stand-ins through one process-wide set that each load adds to and removes from: loads
    # in the reader pool's threads removed each other's mid-load (a false refusal or "damaged", seen once
    # in CI on two DeepSpeed ranks' optimizer files). Switching threads every microsecond makes the
    # overlap happen in every run of this test without the lock (5 of 5 runs failed).
    import sys
    from concurrent.futures import ThreadPoolExecutor

    state = {"args": argparse.Namespace(lr=0.1), "model": {"w": torch.arange(2.0)}}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    paths = [tmp_path / "zip.pt", tmp_path / "legacy.pt"] * 150

    def weights(path: Path) -> list[float]:
        obj, _ = safe_unpickle.load_torch_file(path)
        return obj["model"]["w"].tolist()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(weights, paths))
    finally:
        sys.setswitchinterval(interval)
    assert results == [[0.0, 1.0]] * len(paths)
    left = [g for g in torch.serialization.get_safe_globals() if isinstance(g, tuple)]
    assert [g for g in left if g[0] is safe_unpickle.InertStandIn] == []  # no stand-in stays allowed


def test_trust_pickle_still_reads_what_only_full_unpickling_reads(tmp_path: Path) -> None:
    # weights_only cannot read pickle protocol 4; --trust-pickle tries the safe load first, then falls back.
    path = tmp_path / "p4.pt"
    torch.save({"model": {"w": torch.arange(3.0)}}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError):
        TorchCheckpoint(path)
    with pytest.warns(UserWarning, match="full unpickling"):
        assert TorchCheckpoint(path, trust_pickle=True).read("w").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_tensor_subclass_of_a_trainers_package_is_refused_naming_it_not_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip_format: bool
) -> None:
    """bitsandbytes-style parameters: torch cannot rebuild a tensor as a placeholder class (issue 25)."""
    module = types.ModuleType("fake_quantizer")
    subclass = type("Params4bit", (torch.Tensor,), {"__module__": "fake_quantizer"})
    module.Params4bit = subclass  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_quantizer", module)
    path = tmp_path / "sub.pt"
    weight = torch.ones(4).as_subclass(subclass)
    torch.save({"model": {"w": weight}, "step": 3}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        UnsafeCheckpointError, match=r"sub\.pt: pickles objects of fake_quantizer\.Params4bit"
    ) as caught:
        TorchCheckpoint(path)
    assert "damaged" not in str(caught.value) and "--trust-pickle" in str(caught.value)
