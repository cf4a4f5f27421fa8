"""The command against every class of hostile input, as a table (issue: keep every promise docs/promises.md makes).

Each case builds a run folder (and a previous output at ``-o``); one child process, under address-space, CPU
and file-size limits (so a regression fails instead of exhausting the machine), runs the command's entry point
on every case in turn (tests/hostile_child.py) and reports each result as a JSON line. Each case is still its
own test, asserting: the exit code, exactly one error line naming the right file, no traceback, nothing
written, every file (inputs and the previous output) byte-identical, and no payload marker created.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import types
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ema_average.cli.app import app
from helpers import WritesMarker, make_state, write_safetensors_run

pytestmark = pytest.mark.subprocess

LIMIT_AS = 6 * 2**30  # torch maps ~0.7 GiB at import; a run over tiny inputs needs far less than this
LIMIT_FSIZE = 64 * 2**20
LIMIT_CPU = 600  # CPU seconds for the whole table, all cases together (a runaway case stops here)
CHILD_TIMEOUT = 900
PREVIOUS = b"the previous output, which a failed run must leave as it was"


@dataclass(frozen=True)
class Case:
    """``build(run, tmp)`` writes the hostile run and returns (extra args, the path the error must name)."""

    build: Callable[[Path, Path], tuple[list[str], Path]]
    expected: str  # a phrase the one error line must hold
    exit_code: int = 1


def _limits() -> None:
    """Set once in the child that runs every case: a regression fails there instead of exhausting the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_FSIZE, LIMIT_FSIZE))
    resource.setrlimit(resource.RLIMIT_CPU, (LIMIT_CPU, LIMIT_CPU))


def files_digest(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` and its hash (links and FIFOs by what they are, not read)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = f"link:{os.readlink(path)}"
        elif path.is_fifo():
            found[str(path)] = "fifo"
        elif path.is_file() and path.stat().st_size > 2**26:  # sparse giants: identity, not content
            info = path.stat()
            found[str(path)] = f"big:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir"
    return found


# --- builders: each writes two good checkpoints (steps 1, 2) and one hostile thing ----------------------


def good_run(run: Path) -> None:
    write_safetensors_run(run, [1, 2])


def torch_payload(
    zip_format: bool, name: str = "ckpt_3.pt"
) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        obj = {"model": dict(make_state(3)), "step": 3, "x": WritesMarker(tmp / "pwned")}
        torch.save(obj, run / name, _use_new_zipfile_serialization=zip_format)
        return [], run / name

    return build


def lightning_payload(run: Path, tmp: Path) -> tuple[list[str], Path]:
    good_run(run)
    path = run / "epoch=0-step=3.ckpt"
    torch.save({"state_dict": dict(make_state(3)), "global_step": 3, "cb": WritesMarker(tmp / "pwned")}, path)
    return [], path


def hf_bin_payload(run: Path, tmp: Path) -> tuple[list[str], Path]:
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        obj: object = dict(make_state(step))
        if step == 3:
            obj = {"w": WritesMarker(tmp / "pwned")}
        torch.save(obj, run / f"checkpoint-{step}" / "pytorch_model.bin")
    return [], run / "checkpoint-3" / "pytorch_model.bin"


def dcp_payload(run: Path, tmp: Path) -> tuple[list[str], Path]:
    import torch.distributed.checkpoint as dcp

    for step in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(dict(make_state(step)), checkpoint_id=str(run / f"step_{step}"))
    (run / "step_2" / ".metadata").write_bytes(pickle.dumps(WritesMarker(tmp / "pwned")))
    return [], run / "step_2"


def index_escape(run: Path, tmp: Path) -> tuple[list[str], Path]:
    save_file(dict(make_state(9)), str(tmp / "secret.safetensors"))
    for step in (1, 2):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        weight_map = dict.fromkeys(make_state(step), "../../secret.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [], run / "checkpoint-1" / "model.safetensors.index.json"


def index_not_a_map(run: Path, tmp: Path) -> tuple[list[str], Path]:
    for step in (1, 2):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(dict(make_state(step)), str(folder / "model-1.safetensors"))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": ["model-1.safetensors"]})
        )
    return [], run / "checkpoint-1" / "model.safetensors.index.json"


def torch_state(name: str, state: object, **extra: object) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """Two good torch checkpoints, then ``state`` saved as the model of step 3."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        run.mkdir(parents=True)
        for step in (1, 2):
            torch.save({"model": dict(make_state(step)), "step": step}, run / f"ckpt_{step}.pt")
        torch.save({"model": state, "step": 3, **extra}, run / name)
        return [], run / name

    return build


def torch_names(state: dict) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """Every checkpoint holds ``state`` (so the run is consistent): the names themselves are the problem."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        run.mkdir(parents=True)
        for step in (1, 2, 3):
            torch.save({"model": state, "step": step}, run / f"ckpt_{step}.pt")
        return [], run / "ckpt_1.pt"

    return build


def self_referencing() -> dict:
    state: dict = dict(make_state(3))
    state["loop"] = state
    return state


def shared_dag(levels: int = 40) -> dict:
    node: dict = {"w": torch.zeros(1)}
    for _ in range(levels):
        node = {"a": node, "b": node}
    return node


def quantized() -> dict:
    return {"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}


def special_file(kind: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        path = run / "model_step_3.safetensors"
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(kind)
        return [], path

    return build


def safetensors_step(value: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        path = run / "late.safetensors"
        save_file(dict(make_state(3)), str(path), metadata={"step": value})
        return [], path

    return build


def raw_file(name: str, data: bytes) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        (run / name).write_bytes(data)
        return [], run / name

    return build


def truncated_pt(run: Path, tmp: Path) -> tuple[list[str], Path]:
    """A zip .pt cut in half, as a full disk or a killed trainer leaves it."""
    run.mkdir(parents=True)
    for step in (1, 2, 3):
        torch.save({"model": dict(make_state(step)), "step": step}, run / f"ckpt_{step}.pt")
    path = run / "ckpt_3.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [], path


def nonfinite(run: Path, tmp: Path) -> tuple[list[str], Path]:
    good_run(run)
    state = dict(make_state(3))
    state["encoder.bias"][3] = float("nan")
    save_file(state, str(run / "model_step_3.safetensors"), metadata={"step": "3"})
    return [], run / "model_step_3.safetensors"


def edited_resume(edit: dict[str, str]) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        earlier = tmp / "earlier.safetensors"
        result = CliRunner().invoke(app, [str(run), "-o", str(earlier), "-q"])  # in process: an honest run
        assert result.exit_code == 0, result.output
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(earlier), "pt") as f:
            metadata = {**f.metadata(), **edit}
        save_file(load_file(str(earlier)), str(earlier), metadata=metadata)
        write_safetensors_run(run, [3])
        return ["--resume", str(earlier)], earlier

    return build


def output_is_an_input(run: Path, tmp: Path) -> tuple[list[str], Path]:
    good_run(run)
    return ["-o", str(run / "model_step_2.safetensors")], run / "model_step_2.safetensors"


def option(named: str, *args: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """A good run with bad settings: the error names the option (``named``) rather than a file."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        return list(args), Path(named)

    return build


def markup_name(run: Path, tmp: Path) -> tuple[list[str], Path]:
    good_run(run)
    path = run / "[bold red]x_3.pt"  # rich would print "x_3.pt" in bold, or fail on a closing tag
    path.write_bytes(b"garbage, not a pickle")
    return [], path


def sparse_huge(run: Path, tmp: Path) -> tuple[list[str], Path]:
    """A 4 TB tensor in sparse files of a few KB on disk."""
    run.mkdir(parents=True)
    numel = 10**12
    for step in (1, 2):
        entry = {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}
        header = json.dumps({"__metadata__": {"step": str(step)}, "w": entry}).encode()
        path = run / f"model_step_{step}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        os.truncate(path, 8 + len(header) + 4 * numel)
    return [], run / "model_step_1.safetensors"


def stride_zero(n: int) -> dict:
    return {"w": torch.zeros(1).expand(n)}


# --- issue 24 (round 3) -----------------------------------------------------------------------------------


def float8_beyond_range(run: Path, tmp: Path) -> tuple[list[str], Path]:
    """Float8 checkpoints resumed from a float32 average of 1e6: the output (as-input: float8_e4m3fn, which
    saturates at 448) cannot hold what the average is."""
    from torch import nn

    from ema_average import ExponentialMovingAverage
    from ema_average.online.sharded_export import save_safetensors

    run.mkdir(parents=True)
    for step in (20, 30):
        values = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
        save_file({"w": values}, str(run / f"s_{step}.safetensors"), {"step": str(step)})
    average = ExponentialMovingAverage({"w": nn.Parameter(torch.tensor([1.0, 1e6]))}, decay=0.9)
    save_safetensors(average, tmp / "earlier.safetensors", step=10)
    return ["--resume", str(tmp / "earlier.safetensors"), "--schedule", "step", "--decay", "0.9"], Path("'w'")


ISSUE_24: dict[str, Case] = {
    "float8-beyond-range": Case(float8_beyond_range, "beyond what float8_e4m3fn holds (448)"),
}


# --- issue 24, torch-file reading: tensor state, compressed members, hash work, kinds, protocol -----------


def torch_file(
    obj: Callable[[], dict], *, zip_format: bool = True, deflate: bool = False, **save: object
) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """Two good torch checkpoints, then ``obj()`` as step 3 (legacy, DEFLATE-compressed, other protocol)."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        run.mkdir(parents=True)
        for step in (1, 2):
            torch.save({"model": dict(make_state(step)), "step": step}, run / f"ckpt_{step}.pt")
        path = run / "ckpt_3.pt"
        torch.save(obj(), path, _use_new_zipfile_serialization=zip_format, **save)  # type: ignore[arg-type]
        if deflate:
            with zipfile.ZipFile(path) as archive:
                records = [(info.filename, archive.read(info)) for info in archive.infolist()]
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in records:
                    archive.writestr(name, data)
        return [], path

    return build


def numel_rewritten(zip_format: bool) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """Every checkpoint holds one float viewed as 2**26 whose numel() answers 0j: was a 256 MiB output
    from 2-4 KB of checkpoints, exit 0."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        run.mkdir(parents=True)
        for step in (1, 2, 3):
            wide = torch.zeros(1).expand(2**26)
            wide.numel = complex  # type: ignore[method-assign]
            state = {"model": {**make_state(step), "wide": wide}, "step": step}
            torch.save(state, run / f"ckpt_{step}.pt", _use_new_zipfile_serialization=zip_format)
        return [], run / "ckpt_1.pt"

    return build


def inflating() -> dict:
    return {"model": dict(make_state(3)), "step": 3, "pad": "0" * 2**24}  # 16 MiB, ~16 KB deflated


def dag_key() -> dict:
    node: tuple = (0,)
    for _ in range(24):  # 2**25 elements hashed per use, from ~1 KB
        node = (node, node)
    return {"model": dict(make_state(3)), "step": 3, "extra": {node: 1}}


def many_kinds() -> dict:
    objects = []
    for i in range(1025):
        module = sys.modules.setdefault(f"hostile_kind_{i}", types.ModuleType(f"hostile_kind_{i}"))
        module.Kind = type("Kind", (), {"__module__": module.__name__})  # type: ignore[attr-defined]
        objects.append(module.Kind())  # type: ignore[attr-defined]
    return {"model": dict(make_state(3)), "step": 3, "objects": objects}


def plain() -> dict:
    return {"model": dict(make_state(3)), "step": 3}


READING_CASES: dict[str, Case] = {
    "tensor-numel-rewritten-zip": Case(numel_rewritten(True), "replaces its own 'numel'"),
    "tensor-numel-rewritten-legacy": Case(numel_rewritten(False), "replaces its own 'numel'"),
    "pt-deflated-members": Case(torch_file(inflating, deflate=True), "compressed zip member"),
    "pt-tuple-dag-dict-key": Case(torch_file(dag_key), "would hash more than"),
    "pt-legacy-1025-kinds": Case(torch_file(many_kinds, zip_format=False), "more than 1024 kinds"),
    "pt-zip-1025-kinds": Case(torch_file(many_kinds), "more than 1024 kinds"),
    "pt-protocol-4": Case(torch_file(plain, pickle_protocol=4), "protocol 4"),
}


CASES: dict[str, Case] = {
    # code execution
    "pt-zip-payload": Case(torch_payload(True), "--trust-pickle"),
    "pt-legacy-payload": Case(torch_payload(False), "--trust-pickle"),
    "lightning-payload": Case(lightning_payload, "--trust-pickle"),
    "hf-bin-payload": Case(hf_bin_payload, "--trust-pickle"),
    "dcp-metadata-payload": Case(dcp_payload, "--trust-pickle"),
    # paths a file names
    "index-escapes-folder": Case(index_escape, "outside its folder"),
    "index-weight-map-list": Case(index_not_a_map, "weight_map"),
    # names the output format cannot hold
    "tensor-named-__metadata__": Case(torch_names({"__metadata__": torch.zeros(2)}), "'__metadata__'"),
    "lone-surrogate-name": Case(torch_names({"w\ud800": torch.zeros(2)}), "ud800"),
    "mixed-key-types": Case(
        torch_names({"w": torch.zeros(2), 3: torch.zeros(2)}), "tensor name 3 that is not a string"
    ),
    # small inputs, huge cost
    "stride-zero-1e12": Case(torch_state("ckpt_3.pt", stride_zero(10**12)), "'w'"),
    "stride-zero-2.5e8": Case(torch_state("ckpt_3.pt", stride_zero(250_000_000)), "'w'"),
    "self-referencing-dict": Case(torch_state("ckpt_3.pt", self_referencing()), "ckpt_3.pt"),
    "shared-dict-dag": Case(torch_state("ckpt_3.pt", shared_dag()), "ckpt_3.pt"),
    "fifo": Case(special_file("fifo"), "not a regular file"),
    "link-to-dev-zero": Case(special_file("/dev/zero"), "not a regular file"),
    "link-to-dev-urandom": Case(special_file("/dev/urandom"), "not a regular file"),
    "sparse-4tb-safetensors": Case(sparse_huge, "'w'"),
    # tensors that cannot be averaged or stored
    "complex-tensor": Case(torch_state("ckpt_3.pt", {"w": torch.zeros(2, dtype=torch.complex64)}), "'w'"),
    "quantized-tensor": Case(torch_state("ckpt_3.pt", quantized()), "'w'"),
    "meta-tensor": Case(torch_state("ckpt_3.pt", {"w": torch.zeros(2, device="meta")}), "'w'"),
    "sparse-tensor": Case(torch_state("ckpt_3.pt", {"w": torch.zeros(4).to_sparse()}), "'w'"),
    # hostile steps
    "step-superscript": Case(safetensors_step("²"), "step"),
    "step-10**400": Case(torch_state("ckpt_3.pt", dict(make_state(3)), step=10**400), "step"),
    "step-negative": Case(torch_state("ckpt_3.pt", dict(make_state(3)), step=-4), "step"),
    "step-complex": Case(torch_state("ckpt_3.pt", dict(make_state(3)), step=torch.tensor(1 + 1j)), "step"),
    # damaged files
    "truncated-pt": Case(truncated_pt, "ckpt_3.pt"),
    "garbage-pt": Case(raw_file("ckpt_3.pt", b"\x80\x02garbage" * 10), "damaged"),
    "json-pt": Case(raw_file("ckpt_3.pt", b'{"not": "a checkpoint"}'), "damaged"),
    "git-lfs-pointer": Case(
        raw_file("ckpt_3.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"),
        "git lfs pull",
    ),
    "markup-in-file-name": Case(markup_name, "damaged"),
    "nan-in-checkpoint": Case(nonfinite, "'encoder.bias' holds NaN or Inf (step 3)"),
    # resume metadata that was edited
    "resume-lowered-last-step": Case(edited_resume({"last_step": "1"}), "last_step"),
    "resume-shortened-steps": Case(edited_resume({"steps": "[2]"}), "name one file per step"),
    "resume-steps-not-a-list": Case(edited_resume({"steps": '{"a": 1}'}), "not a JSON list"),
    "resume-steps-not-numbers": Case(edited_resume({"steps": '["x", 2]'}), "not a list of steps"),
    # the output must never be an input
    "output-is-an-input": Case(output_is_an_input, "write the average somewhere else"),
    # settings: usage errors, exit 2
    "denominator-inf": Case(option("--denominator", "--denominator", "inf", "--schedule", "step"), "inf", 2),
    "watch-poll-negative": Case(option("--poll", "--watch", "--poll", "-1"), "-1", 2),
    "watch-poll-nan": Case(option("--poll", "--watch", "--poll", "nan"), "nan", 2),
    **ISSUE_24,
}


CASES.update(READING_CASES)


# --- DCP (issues 24, 25): compressed items, metadata that would hash forever -------------------------------


def _dcp_run(run: Path) -> Path:
    """Two DCP step folders of the usual small model; returns the second (the culprit's folder)."""
    import torch.distributed.checkpoint as dcp

    for step in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(dict(make_state(step)), checkpoint_id=str(run / f"step_{step}"))
    return run / "step_2"


def dcp_deflated_item(run: Path, tmp: Path) -> tuple[list[str], Path]:
    """step_2's ``encoder.bias`` item: the same values in a DEFLATE archive (torch never writes one; its
    reader inflates it, so nothing bounds what such an item unpacks to). Averaged, exit 0, before."""
    import io
    import zipfile

    folder = _dcp_run(run)
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # this test's own file
    [info] = [i for k, i in metadata.storage_data.items() if k.fqn == "encoder.bias"]
    data = folder / info.relative_path
    archive, packed = io.BytesIO(data.read_bytes()[info.offset : info.offset + info.length]), io.BytesIO()
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dest:
        for member in source.infolist():
            dest.writestr(member.filename, source.read(member))
    info.offset, info.length = data.stat().st_size, len(packed.getvalue())
    with open(data, "ab") as f:
        f.write(packed.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return [], data


def dcp_metadata_planner_data(opcodes: bytes) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """step_2's ``.metadata`` (protocol 2: explicit memo indices, no frames) with ``planner_data`` built
    by ``opcodes``."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        folder = _dcp_run(run)
        with open(folder / ".metadata", "rb") as f:
            metadata = pickle.load(f)
        metadata.planner_data = "PLACEHOLDER"
        placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"
        (folder / ".metadata").write_bytes(pickle.dumps(metadata, protocol=2).replace(placeholder, opcodes))
        return [], folder / ".metadata"

    return build


def _tuple_dag_key(depth: int) -> bytes:
    """{t: 1} with t0 = (), t(k+1) = (tk, tk) through memo entries 100000+: 2^depth leaves to hash."""
    get = [b"j" + (100_000 + k).to_bytes(4, "little") for k in range(depth + 2)]
    put = [b"r" + (100_000 + k).to_bytes(4, "little") for k in range(depth + 2)]
    out = b"})" + put[1] + b"0"
    for level in range(1, depth + 1):
        out += get[level] + get[level] + b"\x86" + put[level + 1] + b"0"
    return out + get[depth + 1] + b"K\x01s"


CASES.update(
    {
        "dcp-deflated-tensor-item": Case(dcp_deflated_item, "is a compressed archive"),
        "dcp-metadata-tuple-dag-key": Case(
            dcp_metadata_planner_data(_tuple_dag_key(34)), "shared tuples nested as keys"
        ),
        "dcp-metadata-deep-tuple-key": Case(
            dcp_metadata_planner_data(b"})" + b"\x85" * 200_000 + b"K\x01s"), "nested 200000 deep"
        ),
    }
)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(hostile_outcomes: dict[str, Outcome], name: str) -> None:
    check(hostile_outcomes[name])


# --- issue 24: folder outputs, and the paths a sentence-transformers modules.json names ---------------------


def st_run(edit: Callable[[Path, Path], Path]) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """Two sentence-transformers checkpoints (a top module and ``2_Dense``); ``edit(checkpoint-2, tmp)``
    makes the second hostile and returns the file the error must name."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        for step in (1, 2):
            checkpoint = run / f"checkpoint-{step}"
            (checkpoint / "2_Dense").mkdir(parents=True)
            save_file(dict(make_state(step)), str(checkpoint / "model.safetensors"))
            save_file(
                {"linear.weight": torch.full((2, 2), float(step))},
                str(checkpoint / "2_Dense" / "model.safetensors"),
            )
            modules = [{"idx": 0, "name": "0", "path": ""}, {"idx": 1, "name": "1", "path": "2_Dense"}]
            (checkpoint / "modules.json").write_text(json.dumps(modules))
        return [], edit(run / "checkpoint-2", tmp)

    return build


def _module_path(checkpoint: Path, path: str) -> Path:
    listing = checkpoint / "modules.json"
    listing.write_text(listing.read_text().replace('"2_Dense"', json.dumps(path)))
    return listing


def st_link_out(checkpoint: Path, tmp: Path) -> Path:
    (tmp / "outside").mkdir()
    (checkpoint / "2_Dense").rename(tmp / "outside" / "3_Dense")
    (checkpoint / "sub").symlink_to(tmp / "outside", target_is_directory=True)
    return _module_path(checkpoint, "sub/3_Dense")


def st_empty_part(checkpoint: Path, tmp: Path) -> Path:
    (checkpoint / "a").mkdir()
    (checkpoint / "2_Dense").rename(checkpoint / "a" / "b")
    return _module_path(checkpoint, "a//b")


def st_tensor_in_other_module(checkpoint: Path, tmp: Path) -> Path:
    save_file(dict(make_state(2)) | {"2_Dense/extra": torch.ones(2)}, str(checkpoint / "model.safetensors"))
    return checkpoint


def folder_to_replace(marker: Callable[[Path], None]) -> Callable[[Path, Path], tuple[list[str], Path]]:
    """A good run, and at ``-o avg/`` an earlier folder output whose ``ema_average.json`` ``marker`` makes."""

    def build(run: Path, tmp: Path) -> tuple[list[str], Path]:
        good_run(run)
        avg = tmp / "avg"
        avg.mkdir()
        save_file(dict(make_state(1)), str(avg / "model.safetensors"), {"ema_average_version": "0"})
        marker(avg / "ema_average.json")
        return ["-o", f"{avg}/", "--overwrite"], avg

    return build


def sparse_side_files(run: Path, tmp: Path) -> tuple[list[str], Path]:
    """Five side files of 64 MiB each (the cap for one), a few KiB on disk: 320 MiB to copy per output."""
    for step in (1, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file(dict(make_state(step)), str(run / f"checkpoint-{step}" / "model.safetensors"))
    for name in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"]:
        with open(run / "checkpoint-2" / name, "wb") as f:
            f.truncate(64 * 2**20)
    return ["-o", f"{tmp / 'avg'}/"], run / "checkpoint-2"


OUTPUT_CASES: dict[str, Case] = {
    "st-module-path-through-a-link-out": Case(st_run(st_link_out), "outside the model"),
    "st-module-path-a//b": Case(st_run(st_empty_part), "with an empty part"),
    "st-top-tensor-in-another-module": Case(st_run(st_tensor_in_other_module), "inside module '2_Dense'"),
    "fifo-marker-in-folder-to-replace": Case(
        folder_to_replace(os.mkfifo), "ema_average.json is not a plain file"
    ),
    "deep-marker-in-folder-to-replace": Case(
        folder_to_replace(lambda p: p.write_text("[" * 100_000 + "]" * 100_000)), "it holds ema_average.json"
    ),
    "sparse-side-files-320-mib": Case(sparse_side_files, "larger than 256 MiB together"),
}


@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_hostile_folder_input(hostile_outcomes: dict[str, Outcome], name: str) -> None:
    check(hostile_outcomes[name])


# --- every case in one child ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One case: its folder (``tmp``), what its files were before the command ran, and the command's result
    (``None`` where the child ended before reporting it)."""

    case: Case
    tmp: Path
    culprit: Path
    before: dict[str, str]
    result: dict[str, Any] | None = None
    child_stderr: str = ""
    build_error: BaseException | None = None


def check(outcome: Outcome) -> None:
    """The promise for one case: its exit code, exactly one error line naming the culprit and saying what is
    wrong, no traceback, nothing written or changed (the previous output intact), no payload run."""
    if outcome.build_error is not None:
        raise outcome.build_error
    result = outcome.result
    assert result is not None, f"the child ended before this case reported:\n{outcome.child_stderr}"
    stderr = result["stderr"]
    lines = stderr.strip().splitlines()
    assert result["code"] == outcome.case.exit_code, stderr
    assert len(lines) == 1 and lines[0].startswith("ema-average: error: "), stderr
    assert "Traceback" not in stderr
    assert str(outcome.culprit) in lines[0], lines[0]
    assert outcome.case.expected in lines[0], lines[0]
    assert files_digest(outcome.tmp) == outcome.before  # nothing written, nothing changed
    assert not (outcome.tmp / "pwned").exists()


def prepare(case: Case, tmp: Path) -> tuple[list[str], Outcome]:
    """Builds the case's run (and a previous output at ``-o``) in ``tmp``: the command's arguments and the
    outcome to fill."""
    run = tmp / "run"
    args, culprit = case.build(run, tmp)
    output = tmp / "ema.safetensors"
    if "-o" not in args:
        output.write_bytes(PREVIOUS)
        args = [*args, "-o", str(output), "--overwrite"]
    return [str(run), *args], Outcome(case, tmp, culprit, files_digest(tmp))


def selected_cases(session: pytest.Session) -> list[str]:
    """The cases this session runs (all of them, or those ``-k`` or a node id picked)."""
    names = []
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and hasattr(item, "callspec"):
            names.append(item.callspec.params["name"])
    return names


@pytest.fixture(scope="module")
def hostile_outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Every selected case built here, then run by one child (tests/hostile_child.py) under the limits set
    once: one Python start and one torch import for the whole table."""
    every = CASES | OUTPUT_CASES
    plan, outcomes = [], {}
    for name in selected_cases(request.session):
        tmp = tmp_path_factory.mktemp("hostile")
        try:
            argv, outcomes[name] = prepare(every[name], tmp)
        except Exception as exc:  # this case's test fails on it, the others run
            outcomes[name] = Outcome(every[name], tmp, tmp, {}, build_error=exc)
            continue
        plan.append({"name": name, "argv": argv})
    work = tmp_path_factory.mktemp("hostile-child")
    (work / "plan.json").write_text(json.dumps(plan))
    results = work / "results.jsonl"
    child = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("hostile_child.py")),
            str(work / "plan.json"),
            str(results),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limits,
    )
    try:
        _, stderr = child.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        _, stderr = child.communicate()
        stderr = f"killed after {CHILD_TIMEOUT} s\n{stderr}"
    reported = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    for result in reported:
        outcomes[result["name"]].result = result
    for outcome in outcomes.values():
        outcome.child_stderr = f"exit {child.returncode}\n{stderr[-5000:]}"
    return outcomes
