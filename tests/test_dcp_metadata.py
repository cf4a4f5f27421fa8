"""DCP ``.metadata``: torch's own DCP classes are read, nothing else is imported, and no file can make the
load hash forever; ``--trust-pickle`` reaches only the files the restricted reader refuses (issues 24, 25)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from dcp_helpers import olmo_core_look_alike, rewrite_metadata, save_dcp
from ema_average.checkpoints import DcpCheckpoint, find_run
from ema_average.checkpoints.layouts.dcp_metadata import load_dcp_metadata
from ema_average.errors import CheckpointError, TrustPickleWarning, UnsafeCheckpointError
from helpers import assert_matches_reference, make_state

dcp = pytest.importorskip("torch.distributed.checkpoint")


def save_megatron_core_torch_dist(folder: Path, state: dict[str, Any]) -> None:
    """A save as megatron-core's ``torch_dist`` strategy makes it, followed from its source (megatron-core
    is not installed; NVIDIA/Megatron-LM at d98e8a6): ``TorchDistSaveShardedStrategy.async_save`` plans
    with ``MCoreSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)``, whose
    ``create_local_plan`` builds ``SavePlan(items=_create_write_items(...), planner_data=self.mappings)``
    and whose ``transform_object`` passes bytes through; ``save_state_dict_async_plan``
    (``strategies/state_dict_saver.py``) runs the decentralised path: the coordinator makes the global
    metadata from the gathered local plans and keeps them in it, ``global_metadata.all_local_plans =
    all_local_plans``; the writer's ``prepare_decentralized_global_plan`` names the rank's files with
    ``_StoragePrefix(f"__{rank}_")``, and ``finish`` pickles the metadata as torch's ``FileSystemWriter``
    does. One process, rank 0, with torch's own ``FileSystemWriter`` in place of megatron-core's async
    subclass (whose ``finish`` is the parent's)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, _create_write_items
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.planner import SavePlan

    class MCoreSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items = [item for fqn, obj in self.state_dict.items() for item in _create_write_items(fqn, obj)]
            self.plan = SavePlan(items=items, planner_data=self.mappings)
            return self.plan

        def transform_object(self, write_item: Any, object: Any) -> Any:
            return object

    writer = dcp.FileSystemWriter(str(folder))
    planner = MCoreSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    planner.set_up_planner(state, is_coordinator=True)
    writer.set_up_storage_writer(True)
    local_plan = writer.prepare_local_plan(planner.create_local_plan())
    all_local_plans = [local_plan]
    _, global_metadata = planner.create_global_plan(all_local_plans)
    global_metadata.all_local_plans = all_local_plans
    central_plan = dataclasses.replace(local_plan, storage_data=_StoragePrefix("__0_"))
    central_plan = planner.finish_plan(central_plan)
    results = writer.write_data(central_plan, planner).wait()
    writer.finish(global_metadata, [results])


def test_megatron_core_torch_dist_metadata_is_read(tmp_path: Path) -> None:
    """Its ``.metadata`` names torch's SavePlan, WriteItem, WriteItemType and TensorWriteData: read under
    the restricted unpickler (no --trust-pickle), and the average equals the float64 reference."""
    states = {}
    for step in (10, 20, 30):
        states[step] = make_state(step)
        common = io.BytesIO()  # a ShardedObject: already bytes, as megatron-core hands them to DCP
        torch.save({"iteration": step}, common)
        common.seek(0)
        save_megatron_core_torch_dist(tmp_path / f"iter_{step:07d}", {**states[step], "rng_state": common})
    raw = (tmp_path / "iter_0000020" / ".metadata").read_bytes()
    for name in (b"SavePlan", b"WriteItem", b"WriteItemType", b"TensorWriteData"):
        assert name in raw
    run = find_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [10, 20, 30]
    assert hasattr(run.checkpoints[0]._metadata, "all_local_plans")  # what was read holds the plans
    assert_matches_reference(run.checkpoints, [states[s] for s in (10, 20, 30)])


def test_trust_pickle_leaves_a_file_the_safe_reader_reads_to_it(tmp_path: Path) -> None:
    """With the flag, olmo-core's metadata stopped reading (plain pickle imports ``olmo_core``, which is
    not installed) and every ``.metadata`` was fully unpickled; now the flag changes nothing there."""
    save_dcp(tmp_path, {"model": dict(make_state(2))})
    olmo_core_look_alike(tmp_path)
    assert "olmo_core" not in sys.modules
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing was fully unpickled
        ckpt = DcpCheckpoint(tmp_path, trust_pickle=True)
    assert all(torch.equal(ckpt.read(n), t) for n, t in make_state(2).items())
    assert "olmo_core" not in sys.modules


class Harmless:
    def __init__(self) -> None:
        self.value = 3


def test_trust_pickle_fully_unpickles_only_a_refused_file_with_a_warning_naming_it(tmp_path: Path) -> None:
    save_dcp(tmp_path, dict(make_state(1)))
    rewrite_metadata(tmp_path, lambda m: setattr(m, "planner_data", {"x": Harmless()}))
    with pytest.raises(UnsafeCheckpointError, match=r"Harmless.*--trust-pickle"):
        load_dcp_metadata(tmp_path / ".metadata")
    with pytest.warns(TrustPickleWarning) as caught:
        metadata = load_dcp_metadata(tmp_path / ".metadata", trust_pickle=True)
    [warning] = caught
    assert str(warning.message).startswith(f"{tmp_path / '.metadata'}: loading with full unpickling")
    assert "test_dcp_metadata.Harmless" in str(warning.message)
    assert isinstance(metadata.planner_data["x"], Harmless)


def tuple_dag(depth: int) -> bytes:
    """A pickle of ``{t: 1}`` where ``t0 = ()`` and ``t(k+1) = (tk, tk)`` through the memo: about 16 bytes
    a level, 2^depth leaves to hash (``pickle.dumps`` writes the same for such a tuple)."""
    out = bytearray(b"\x80\x02}q\x00)q\x010")  # PROTO 2, EMPTY_DICT, BINPUT 0, EMPTY_TUPLE, BINPUT 1, POP
    for level in range(1, depth + 1):
        ref = level.to_bytes(4, "little")
        out += b"j" + ref + b"j" + ref + b"\x86r" + (level + 1).to_bytes(4, "little") + b"0"
    return bytes(out + b"j" + (depth + 1).to_bytes(4, "little") + b"K\x01s.")


PLACEHOLDER = b"X\x0b\x00\x00\x00PLACEHOLDER"  # BINUNICODE: the string as protocol 2 writes it


def with_planner_data(folder: Path, opcodes: bytes) -> Path:
    """A real save whose ``.metadata`` (written again with protocol 2: no frames, explicit memo indices)
    has ``planner_data`` replaced by the object ``opcodes`` build."""
    save_dcp(folder, dict(make_state(1)))
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data = "PLACEHOLDER"
    raw = pickle.dumps(metadata, protocol=2)
    assert raw.count(PLACEHOLDER) == 1
    (folder / ".metadata").write_bytes(raw.replace(PLACEHOLDER, opcodes))
    return folder / ".metadata"


def dag_opcodes(depth: int) -> bytes:
    """{t: 1} as :func:`tuple_dag` builds it, its memo indices moved past the file's own."""
    get = [b"j" + (100_000 + k).to_bytes(4, "little") for k in range(depth + 2)]
    put = [b"r" + (100_000 + k).to_bytes(4, "little") for k in range(depth + 2)]
    out = b"}" + b")" + put[1] + b"0"  # EMPTY_DICT, EMPTY_TUPLE, LONG_BINPUT, POP
    for level in range(1, depth + 1):
        out += get[level] + get[level] + b"\x86" + put[level + 1] + b"0"  # TUPLE2, LONG_BINPUT, POP
    return out + get[depth + 1] + b"K\x01s"  # the last tuple, 1, SETITEM


def test_a_tuple_dag_used_as_a_key_is_refused_before_it_is_hashed(tmp_path: Path) -> None:
    """34 levels (about 600 bytes in a 3 KB file) would take 2^34 hashes; refused in the time the
    opcodes take to walk. 20 levels (10^6 hashes) show the file is otherwise read."""
    assert pickle.loads(tuple_dag(2)) == {(((), ()), ((), ())): 1}
    small = with_planner_data(tmp_path / "small", dag_opcodes(12))
    assert len(load_dcp_metadata(small).planner_data) == 1  # the same construction, 4,096 leaves: read
    path = with_planner_data(tmp_path / "dag", dag_opcodes(34))
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointError) as caught:
        load_dcp_metadata(path)
    assert str(caught.value).startswith(f"{path}: would hash more than ")
    assert str(caught.value).endswith("shared tuples nested as keys; refused")


def test_a_deep_tuple_chain_used_as_a_key_is_refused(tmp_path: Path) -> None:
    """200,000 nested 1-tuples (200 KB): hashing it recursed in C and ended the process (SIGSEGV)."""
    chain = b"}" + b")" + b"\x85" * 200_000 + b"K\x01s"  # EMPTY_DICT, EMPTY_TUPLE, TUPLE1 x N, SETITEM
    path = with_planner_data(tmp_path, chain)
    with pytest.raises(
        CheckpointError, match=r"\.metadata: hashes an object nested 200000 deep \(at most 100\)"
    ):
        load_dcp_metadata(path)
