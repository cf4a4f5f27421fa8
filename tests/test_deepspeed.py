"""DeepSpeed 0.19 run folders, written by real DeepSpeed on CPU (gloo; one and two ranks; ZeRO 0-3; fp32, bf16).

Every read is checked against DeepSpeed's own ``zero_to_fp32`` (an independent implementation of the
rebuild) and every average against the float64 reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ema_average.checkpoints import DeepSpeedCheckpoint, find_run
from ema_average.errors import CheckpointError
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings
from ema_average.offline.run import average_checkpoints
from helpers import DEEPSPEED_RUNS, assert_matches_reference, float64_reference

pytestmark = [pytest.mark.producers, pytest.mark.multiprocess]  # real DeepSpeed ranks write the inputs

pytest.importorskip("deepspeed")

VARIANTS = [(world, v) for world, variants in DEEPSPEED_RUNS.items() for v in variants]


def run_folder(runs: Path, world: int, variant: str) -> Path:
    stage, dtype = variant.split(":")
    return runs / f"z{stage}-{dtype}-w{world}"


def zero_to_fp32(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of one tag (it prints; silenced)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return {name: tensor.contiguous() for name, tensor in state.items()}


@pytest.mark.parametrize(("world", "variant"), VARIANTS)
def test_steps_and_default_model(deepspeed_runs: Path, world: int, variant: str) -> None:
    run = find_run(run_folder(deepspeed_runs, world, variant))
    assert [c.step for c in run.checkpoints] == [2, 4, 6]
    assert {c.step_origin for c in run.checkpoints} == {"metadata:global_steps"}
    assert [c.path.name for c in run.checkpoints] == ["global_step2", "global_step4", "global_step6"]
    stage = int(variant[0])
    expected = {0: "", 1: "module", 2: "module", 3: "fp32"}[stage]
    assert {c.model for c in run.checkpoints} == {expected}
    if stage in (1, 2):
        assert run.notices == ["in each checkpoint: read module; also here: fp32 (--submodel fp32)"]
    assert run.checkpoints[0].aliases() == {"head.weight": "embed.weight"}


@pytest.mark.parametrize(("world", "variant"), [v for v in VARIANTS if not v[1].startswith("0")])
def test_fp32_master_weights_equal_zero_to_fp32(deepspeed_runs: Path, world: int, variant: str) -> None:
    folder = run_folder(deepspeed_runs, world, variant)
    run = find_run(folder, submodel="fp32")
    for ckpt in run.checkpoints:
        expected = zero_to_fp32(folder, ckpt.path.name)
        if variant.startswith("1"):
            # ZeRO-1 does not save frozen parameters as such; zero_to_fp32 drops them, we keep module's.
            assert {n for n in ckpt.specs() if n not in expected} == {"frozen.weight", "frozen.bias"}
            assert torch.equal(ckpt.read("frozen.weight"), ckpt.read("frozen.weight").float())
        for name, tensor in expected.items():
            got = ckpt.read(name)
            assert got.dtype == tensor.dtype, name
            assert torch.equal(got, tensor), name
            assert got.numel() > 0


@pytest.mark.parametrize(("world", "variant"), VARIANTS)
def test_average_matches_float64_reference(deepspeed_runs: Path, world: int, variant: str) -> None:
    run = find_run(run_folder(deepspeed_runs, world, variant))
    states = [{n: c.read(n) for n in c.specs()} for c in run.checkpoints]
    assert_matches_reference(run.checkpoints, states)


@pytest.mark.parametrize(("world", "variant"), [v for v in VARIANTS if not v[1].startswith("0")])
def test_range_reads_in_small_chunks_equal_zero_to_fp32(
    deepspeed_runs: Path, world: int, variant: str
) -> None:
    """Streaming reads (chunks of 3 elements, crossing the ranks' partitions) read only their range."""
    folder = run_folder(deepspeed_runs, world, variant)
    ckpt = find_run(folder, submodel="fp32").checkpoints[-1]
    for name, tensor in zero_to_fp32(folder, ckpt.path.name).items():
        flat = tensor.reshape(-1)
        got = torch.empty_like(flat)
        for start in range(0, flat.numel(), 3):
            ckpt.read_range_into(name, start, got[start : start + 3])
        assert torch.equal(got, flat), name


def test_module_weights_are_the_models_dtype(deepspeed_runs: Path) -> None:
    ckpt = find_run(run_folder(deepspeed_runs, 1, "1:bf16")).checkpoints[0]
    assert ckpt.specs()["inp.weight"].dtype == torch.bfloat16
    assert ckpt.specs()["scale"].dtype == torch.float32
    fp32 = find_run(run_folder(deepspeed_runs, 1, "1:bf16"), submodel="fp32").checkpoints[0]
    assert fp32.specs()["inp.weight"].dtype == torch.float32
    assert torch.allclose(fp32.read("inp.weight").bfloat16().float(), ckpt.read("inp.weight").float())


def test_zero3_module_is_refused_not_read_empty(deepspeed_runs: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"global_step2: is a ZeRO-3 save: its module holds only placeholders"
    ):
        find_run(run_folder(deepspeed_runs, 2, "3:bf16"), submodel="module")


def test_lazy_reads_reopen_after_close(deepspeed_runs: Path) -> None:
    ckpt = find_run(run_folder(deepspeed_runs, 2, "3:bf16")).checkpoints[-1]
    before = ckpt.read("inp.weight").clone()
    ckpt.close()
    assert torch.equal(ckpt.read("inp.weight"), before)
    assert isinstance(ckpt, DeepSpeedCheckpoint) and ckpt.stage == 3


def test_a_missing_rank_is_one_line(deepspeed_runs: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder(deepspeed_runs, 2, "3:bf16"), tmp_path / "run")
    for tag in folder.glob("global_step*"):
        (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"global_step2: needs the optimizer partitions of 2 ranks, but holds 1"
    ):
        find_run(folder)


def test_tensor_parallel_is_refused(deepspeed_runs: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder(deepspeed_runs, 1, "0:fp32"), tmp_path / "run")
    tag = folder / "global_step2"
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    with pytest.raises(
        CheckpointError, match=r"global_step2: is a tensor-parallel DeepSpeed save \(mp_rank_01\)"
    ):
        find_run(folder)


def trainer_weights(kind: str, source: Path, tag: str) -> dict[str, torch.Tensor]:
    """What the Trainer saved as ``model.safetensors`` beside the DeepSpeed tag ``tag``."""
    if kind == "placeholders":
        return {}
    if kind == "other":
        return {"other.weight": torch.zeros(3)}
    return {name: t.clone() for name, t in zero_to_fp32(source, tag).items()}  # tied weights saved apart


def hf_trainer_deepspeed_run(
    deepspeed_runs: Path, out: Path, variant: str = "3:bf16", weights: str = "placeholders"
) -> Path:
    """The HF Trainer with DeepSpeed: the tag inside checkpoint-N beside the Trainer's own save
    (reproduced from transformers' Trainer): under ZeRO-3 with stage3_gather_16bit_weights_on_model_save=false
    an empty model.safetensors, else the module's weights (``"module"``), or, for the refusal, weights of
    another model (``"other"``); and config.json. The DeepSpeed run it was made from is returned."""
    from safetensors.torch import save_file

    source = run_folder(deepspeed_runs, 2, variant)
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        shutil.copytree(source / f"global_step{step}", folder / f"global_step{step}")
        state = trainer_weights(weights, source, f"global_step{step}")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(f'{{"model_type": "tiny", "saved_at": {step}}}')
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return source


def test_hf_trainer_zero3_without_gathering(deepspeed_runs: Path, tmp_path: Path) -> None:
    source = hf_trainer_deepspeed_run(deepspeed_runs, tmp_path / "out")
    run = find_run(tmp_path / "out")
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [
        (s, "metadata:global_steps") for s in (2, 4, 6)
    ]
    assert {c.model for c in run.checkpoints} == {
        "global_step2/fp32",
        "global_step4/fp32",
        "global_step6/fp32",
    }
    expected = zero_to_fp32(source, "global_step6")
    assert all(torch.equal(run.checkpoints[-1].read(n), t) for n, t in expected.items())


@pytest.mark.parametrize(
    ("variant", "weights", "submodel", "completed"),
    [
        ("3:bf16", "placeholders", None, True),  # ZeRO-3: the tag is read by default
        ("2:bf16", "module", "fp32", True),  # ZeRO-2's fp32 master weights, asked for
        ("2:bf16", "other", "fp32", False),  # the Trainer's save is not this model: no config beside it
    ],
)
def test_hf_trainer_deepspeed_folder_output_is_the_trainers_model_folder(
    deepspeed_runs: Path,
    tmp_path: Path,
    variant: str,
    weights: str,
    submodel: str | None,
    completed: bool,
) -> None:
    # -o DIR: the weights rebuilt from the DeepSpeed tags, named and completed as the Trainer's own save
    # (model.safetensors beside the latest checkpoint's config.json), which from_pretrained loads.
    from safetensors.torch import load_file

    source = hf_trainer_deepspeed_run(deepspeed_runs, tmp_path / "out", variant, weights)
    settings = AverageSettings(decay=0.9)
    average_checkpoints(RunOptions(tmp_path / "out", tmp_path / "avg", settings=settings, submodel=submodel))
    written = sorted(p.name for p in (tmp_path / "avg").iterdir())
    assert written == (["config.json", "model.safetensors"] if completed else ["model.safetensors"])
    if completed:
        config = (tmp_path / "out/checkpoint-6/config.json").read_text()
        assert (tmp_path / "avg" / "config.json").read_text() == config
    states = [zero_to_fp32(source, f"global_step{step}") for step in (2, 4, 6)]
    expected = float64_reference(states, [2, 4, 6], 0.9)
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-5, atol=1e-6)


# --- Hostile and damaged folders (issue 18): one line naming the file, nothing built, nothing written -----

TAG = "global_step4"  # the hostile tag: the one in the middle, so that the error must name it
MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
OPTIM_BF16 = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_Z3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
Edit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Hostile:
    """A real run ``variant`` whose ``TAG`` is damaged by ``build(tag)``, which returns the path the one
    error line must name; ``expected`` is a phrase that line holds."""

    variant: str  # "STAGE:DTYPE-wWORLD"
    build: Callable[[Path], Path]
    expected: str
    args: tuple[str, ...] = ()


def edited(file: str, edit: Edit) -> Callable[[Path], Path]:
    """Load ``file`` as DeepSpeed saved it, ``edit`` its dicts, and save it back with ``torch.save``."""

    def build(tag: Path) -> Path:
        path = tag / file
        state = torch.load(path, weights_only=False)  # our own test data, written by DeepSpeed
        edit(state)
        torch.save(state, path)
        return path

    return build


def removed(pattern: str) -> Callable[[Path], Path]:
    def build(tag: Path) -> Path:
        for path in tag.glob(pattern):
            path.unlink()
        return tag

    return build


def renamed(old: str, new: str) -> Callable[[Path], Path]:
    def build(tag: Path) -> Path:
        (tag / old).rename(tag / new)
        return tag

    return build


def setting(*keys: str | int, value: Any) -> Edit:
    """Set ``state[k0][k1]...`` to ``value`` (``value`` called with the old value if callable)."""

    def edit(state: dict[str, Any]) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value(state[keys[-1]]) if callable(value) else value

    return edit


def deleting(*keys: str) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        for key in keys[:-1]:
            state = state[key]
        del state[keys[-1]]

    return edit


def expanded(old: torch.Tensor) -> torch.Tensor:
    """The same shape and dtype as ``old`` over one element of storage (stride 0): 4 bytes of file."""
    return torch.zeros(1, dtype=old.dtype).expand(old.shape)


def quint8(old: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch deprecates making them, not loading them
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(old.float(), 0.1, 0, torch.quint8)


def _with_numel(tensor: torch.Tensor, value: Any) -> torch.Tensor:
    tensor.numel = value  # type: ignore[method-assign]
    return tensor


FLAT2 = ("optimizer_state_dict", "single_partition_of_fp32_groups", 0)
FLAT3 = ("optimizer_state_dict", "fp32_flat_groups", 0)
FP32 = ("--submodel", "fp32")

HOSTILE = {
    # expanded (stride-0) views: a few bytes of file, any size of output
    "module-expanded": Hostile(
        "0:fp32-w1", edited(MODEL, setting("module", "inp.weight", value=expanded)), "expanded"
    ),
    "zero2-module-expanded": Hostile(
        "2:bf16-w2", edited(MODEL, setting("module", "out.weight", value=expanded)), "expanded"
    ),
    "zero2-flat-group-expanded": Hostile(
        "2:fp32-w1", edited(OPTIM, setting(*FLAT2, value=expanded)), "expanded", FP32
    ),
    "zero3-flat-group-expanded": Hostile(
        "3:fp32-w1", edited(OPTIM, setting(*FLAT3, value=expanded)), "expanded"
    ),
    "zero2-frozen-expanded": Hostile(
        "2:fp32-w1",
        edited(MODEL, setting("frozen_param_fragments", "frozen.weight", value=expanded)),
        "expanded",
        FP32,
    ),
    "zero3-frozen-expanded": Hostile(
        "3:bf16-w2",
        edited(MODEL_Z3, setting("frozen_param_fragments", "frozen.bias", value=expanded)),
        "expanded",
    ),
    "zero1-buffer-expanded": Hostile(
        "1:fp32-w2", edited(MODEL, setting("module", "scale", value=expanded)), "expanded", FP32
    ),
    # tensors that cannot be averaged: refused while opening, naming the checkpoint's file
    "module-meta": Hostile(
        "0:fp32-w1",
        edited(MODEL, setting("module", "inp.weight", value=lambda t: t.to("meta"))),
        "meta tensor",
    ),
    "module-sparse": Hostile(
        "0:fp32-w1", edited(MODEL, setting("module", "inp.weight", value=lambda t: t.to_sparse())), "sparse"
    ),
    "module-complex64": Hostile(
        "0:bf16-w1",
        edited(MODEL, setting("module", "inp.weight", value=lambda t: t.to(torch.complex64))),
        "cannot be averaged",
    ),
    "module-quint8": Hostile(
        "0:fp32-w1", edited(MODEL, setting("module", "inp.weight", value=quint8)), "quantized"
    ),
    "zero3-frozen-complex64": Hostile(
        "3:fp32-w1",
        edited(
            MODEL_Z3,
            setting("frozen_param_fragments", "frozen.weight", value=lambda t: t.to(torch.complex64)),
        ),
        "cannot be averaged",
    ),
    "zero2-frozen-quint8": Hostile(
        "2:fp32-w1",
        edited(MODEL, setting("frozen_param_fragments", "frozen.bias", value=quint8)),
        "quantized",
        FP32,
    ),
    # malformed optimizer files
    "no-optimizer_state_dict": Hostile(
        "2:fp32-w1", edited(OPTIM, deleting("optimizer_state_dict")), "optimizer_state_dict", FP32
    ),
    "optimizer_state_dict-a-list": Hostile(
        "2:fp32-w1",
        edited(OPTIM, setting("optimizer_state_dict", value=[1, 2])),
        "optimizer_state_dict",
        FP32,
    ),
    "zero3-no-optimizer_state_dict": Hostile(
        "3:fp32-w1", edited(OPTIM, deleting("optimizer_state_dict")), "optimizer_state_dict"
    ),
    "partition_count-not-numbers": Hostile(
        "2:fp32-w1",
        edited(OPTIM, setting("optimizer_state_dict", "partition_count", value=[1, "a"])),
        "partition_count",
        FP32,
    ),
    "partition_count-true": Hostile(
        "3:fp32-w1",
        edited(OPTIM, setting("optimizer_state_dict", "partition_count", value=True)),
        "partition_count",
    ),
    "partition_count-empty": Hostile(
        "2:fp32-w1",
        edited(OPTIM, setting("optimizer_state_dict", "partition_count", value=[])),
        "partition_count",
        FP32,
    ),
    "zero3-without-flat-groups": Hostile(
        "3:fp32-w1", edited(OPTIM, deleting("optimizer_state_dict", "fp32_flat_groups")), "fp32_flat_groups"
    ),
    "zero3-empty-flat-groups": Hostile(
        "3:bf16-w2",
        edited(OPTIM_BF16, setting("optimizer_state_dict", "fp32_flat_groups", value=[])),
        "fp32_flat_groups",
    ),
    "zero3-without-optimizer-files": Hostile(
        "3:bf16-w2", removed("*optim_states.pt"), "without its optimizer partitions"
    ),
    "zero2-rank-files-misnumbered": Hostile(
        "2:bf16-w2",
        renamed(
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt"
        ),
        "ranks [0, 5]",
        FP32,
    ),
    "zero3-model-states-missing": Hostile(
        "3:bf16-w2",
        removed("zero_pp_rank_1_mp_rank_00_model_states.pt"),
        "model states of 2 ranks, but holds 1",
    ),
    "zero2-partitions-of-two-dtypes": Hostile(
        "2:bf16-w2",
        edited("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", setting(*FLAT2, value=lambda t: t.double())),
        "torch.float64",
        FP32,
    ),
    "zero2-paddings-do-not-fit": Hostile(
        "2:fp32-w1",
        edited(OPTIM, setting("optimizer_state_dict", "param_alignment_paddings", value=[[0]])),
        "param_alignment_paddings",
        FP32,
    ),
    # shapes that do not fit what is saved
    "zero2-frozen-shape-does-not-fit": Hostile(
        "2:fp32-w1",
        edited(MODEL, setting("frozen_param_shapes", "frozen.weight", value=(7, 8))),
        "'frozen.weight'",
        FP32,
    ),
    "zero3-frozen-shape-does-not-fit": Hostile(
        "3:bf16-w2",
        edited(MODEL_Z3, setting("frozen_param_shapes", "frozen.weight", value=(7, 8))),
        "'frozen.weight'",
    ),
    # a tensor's methods rewritten by its pickled state (issue 24): its size comes from its shape
    "zero2-partition-numel-rewritten": Hostile(
        "2:fp32-w1",
        edited(OPTIM, setting(*FLAT2, value=lambda t: _with_numel(t.clone(), complex))),
        "replaces its own 'numel'",
        FP32,
    ),
    "zero3-flat-group-numel-rewritten": Hostile(
        "3:fp32-w1",
        edited(OPTIM, setting(*FLAT3, value=lambda t: _with_numel(t.clone(), complex))),
        "replaces its own 'numel'",
    ),
    "zero3-param-shape-beyond-torch": Hostile(
        "3:fp32-w1", edited(MODEL_Z3, setting("param_shapes", 0, "inp.bias", value=(2**63, 0))), "'inp.bias'"
    ),
}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its content's hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def hostile_run(deepspeed_runs: Path, tmp_path: Path, case: Hostile) -> tuple[Path, Path]:
    """A copy of the real run ``case.variant`` with its ``TAG`` damaged; the run and the path to blame."""
    variant, world = case.variant.split("-w")
    run = shutil.copytree(run_folder(deepspeed_runs, int(world), variant), tmp_path / "run")
    return run, case.build(run / TAG)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ema-average: error: "), stderr
    assert "unexpected" not in lines[0] and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_folder_is_one_line_naming_the_file(deepspeed_runs: Path, tmp_path: Path, name: str) -> None:
    from typer.testing import CliRunner

    from ema_average.cli.app import app

    case = HOSTILE[name]
    run, culprit = hostile_run(deepspeed_runs, tmp_path, case)
    before = tree_digest(tmp_path)
    output = tmp_path / "ema.safetensors"
    result = CliRunner().invoke(app, [str(run), "-o", str(output), *case.args])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert f" {culprit}: " in line, line  # the file itself (or the tag, for what its files lack together)
    assert case.expected in line, line
    assert tree_digest(tmp_path) == before  # inputs byte-identical, no output, no temporary left


# Before: 10**8 built list(range(10**8)) (4.0 GiB RSS, 15 s) before its error; 10**9 and 2**62 "unexpected
# MemoryError". The child runs under limits, so that a regression fails instead of exhausting the machine.
LIMIT_AS = 6 * 2**30
MAX_RSS = 2**30  # a refused run is torch's import, ~250 MB


def _limits() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    resource.setrlimit(resource.RLIMIT_CPU, (300, 300))  # a hang is killed, not waited on forever


@pytest.mark.parametrize(
    ("variant", "file", "count", "args"),
    [
        ("2:fp32-w1", OPTIM, [10**8], FP32),
        ("2:bf16-w2", OPTIM_BF16, [10**9], FP32),
        ("3:fp32-w1", OPTIM, 2**62, ()),
    ],
    ids=["zero2-1e8", "zero2-1e9", "zero3-2**62"],
)
@pytest.mark.subprocess
def test_huge_partition_count_is_refused_before_anything_is_built(
    deepspeed_runs: Path, tmp_path: Path, variant: str, file: str, count: Any, args: tuple[str, ...]
) -> None:
    case = Hostile(variant, edited(file, setting("optimizer_state_dict", "partition_count", value=count)), "")
    run, _ = hostile_run(deepspeed_runs, tmp_path, case)
    before = tree_digest(tmp_path)
    exe = str(Path(sys.executable).parent / "ema-average")
    with open(tmp_path / "stderr", "w+b") as err:
        proc = subprocess.Popen(
            [exe, str(run), "-o", str(tmp_path / "ema.safetensors"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=_limits,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak memory
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode()
    (tmp_path / "stderr").unlink()
    assert proc.returncode == 1, stderr
    line = one_error_line(stderr)
    world = max(count) if isinstance(count, list) else count
    assert f"{run / TAG}: needs the optimizer partitions of {world} ranks, but holds " in line, line
    assert usage.ru_maxrss * 1024 < MAX_RSS, usage.ru_maxrss
    assert tree_digest(tmp_path) == before


CUT_WHILE_READ = """
import os, sys
from pathlib import Path
from ema_average.checkpoints import DeepSpeedCheckpoint
from ema_average.errors import CheckpointError
tag, cut, submodel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ckpt = DeepSpeedCheckpoint(tag, submodel=submodel)  # planned: every file unpickled, offsets kept
names = list(ckpt.specs())
ckpt.read(names[0])  # the files are open (or mapped, on the old code)
os.truncate(cut, 0)  # a trainer saving the same tag again: open("wb") truncates first
try:
    for name in names:
        ckpt.read(name)
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("world", "variant", "submodel", "cut"),
    [
        (1, "0:fp32", "module", "mp_rank_00_model_states.pt"),  # module tensors
        (2, "2:bf16", "fp32", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # fp32 flat-group slices
        (2, "3:bf16", "fp32", "zero_pp_rank_1_mp_rank_00_model_states.pt"),  # ZeRO-3 frozen fragments
    ],
    ids=["module", "fp32-partition", "zero3-frozen-fragment"],
)
@pytest.mark.subprocess
def test_a_file_cut_short_while_it_is_read_is_an_error_not_a_sigbus(
    deepspeed_runs: Path, tmp_path: Path, world: int, variant: str, submodel: str, cut: str
) -> None:
    """Partitions are read with pread, never mapped: a file truncated after planning is one line naming
    it (the old mapped reads died of SIGBUS, exit -7). Read in a child so a SIGBUS fails the test."""
    tag = shutil.copytree(
        run_folder(deepspeed_runs, world, variant) / "global_step6", tmp_path / "global_step6"
    )
    child = subprocess.run(
        [sys.executable, "-c", CUT_WHILE_READ, str(tag), str(tag / cut), submodel],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert child.returncode == 0, f"exit {child.returncode} (-7 is SIGBUS): {child.stderr[-2000:]}"
    assert re.fullmatch(
        rf"{re.escape(str(tag / cut))}: file ends inside tensor '.+' \(truncated\? \d+ bytes when planned, "
        r"0 now\)\n",
        child.stdout,
    ), child.stdout
