"""The offline job through its Python API: results against a float64 reference, for every layout."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ema_average.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    NonFiniteError,
    OutputError,
)
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings, CheckpointSelection, TensorSelection
from ema_average.offline.run import average_checkpoints, prepare
from helpers import float64_reference, write_fairseq_run, write_safetensors_run, write_torch_run

STEPS = [100, 250, 400, 1000, 1600]


def assert_matches_reference(
    out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    for name, expected in ref.items():
        assert out[name].dtype == dtype
        if dtype in (torch.bfloat16, torch.float16):  # one rounding of the float32 average: within an ulp
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(out[name].double(), expected, rtol=eps, atol=eps * 1e-2)
        else:
            torch.testing.assert_close(out[name].double(), expected, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("decay", [0.9999, 0.9, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_run_matches_float64(tmp_path: Path, decay: float, dtype: torch.dtype) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS, dtype)
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "ema.safetensors", settings=AverageSettings(decay=decay))
    )
    out = load_file(str(tmp_path / "ema.safetensors"))
    ref = float64_reference([states[s] for s in STEPS], STEPS, decay)
    assert_matches_reference(out, ref, dtype)
    assert torch.equal(out["norm.num_batches_tracked"], states[STEPS[-1]]["norm.num_batches_tracked"])


def test_output_dtype_float32_from_bf16(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS, torch.bfloat16)
    average_checkpoints(
        RunOptions(
            tmp_path / "run",
            tmp_path / "ema.safetensors",
            settings=AverageSettings(decay=0.9),
            dtype="float32",
        )
    )
    ref = float64_reference([states[s] for s in STEPS], STEPS, 0.9)
    assert_matches_reference(load_file(str(tmp_path / "ema.safetensors")), ref, torch.float32)


def test_torch_files_match_float64(tmp_path: Path) -> None:
    states = write_torch_run(tmp_path / "run", STEPS)
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "ema.safetensors", settings=AverageSettings(decay=0.95))
    )
    ref = float64_reference([states[s] for s in STEPS], STEPS, 0.95)
    assert_matches_reference(load_file(str(tmp_path / "ema.safetensors")), ref, torch.float32)


def test_chunks_and_threads_give_identical_bytes(tmp_path: Path) -> None:
    write_torch_run(tmp_path / "run", STEPS)
    one = RunOptions(tmp_path / "run", tmp_path / "one.safetensors", settings=AverageSettings(decay=0.9))
    tiny = RunOptions(
        tmp_path / "run",
        tmp_path / "chunked.safetensors",
        settings=AverageSettings(decay=0.9),
        chunk_numel=5,
        threads=3,
    )
    assert len(prepare(one).plan.chunks) == 2  # the float32 tensors end to end, the integer apart
    assert len(prepare(tiny).plan.chunks) == 46  # 224 float32 elements in fives, and the counter
    average_checkpoints(one)
    average_checkpoints(tiny)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()


def test_sharded_output_is_a_folder_that_loads_through_its_index(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "single.safetensors"))
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "out", max_shard_size=300))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    single = load_file(str(tmp_path / "single.safetensors"))
    assert set(index["weight_map"]) == set(single)
    assert len(set(index["weight_map"].values())) > 1
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / "out" / shard))[name], single[name])


def test_tied_weights_averaged_once_written_twice(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    embeds = {}
    for step in STEPS:
        embed = torch.randn(10, 4, generator=torch.Generator().manual_seed(step))
        embeds[step] = {"embed.weight": embed}
        torch.save(
            {"model": {"embed.weight": embed, "lm_head.weight": embed}, "step": step}, run / f"c_{step}.pt"
        )
    prepared = prepare(RunOptions(run, tmp_path / "o.safetensors", settings=AverageSettings(decay=0.9)))
    assert any("tied weights" in note for note in prepared.plan.notes)
    average_checkpoints(RunOptions(run, tmp_path / "o.safetensors", settings=AverageSettings(decay=0.9)))
    out = load_file(str(tmp_path / "o.safetensors"))
    ref = float64_reference([embeds[s] for s in STEPS], STEPS, 0.9)["embed.weight"]
    torch.testing.assert_close(out["embed.weight"].double(), ref, rtol=2e-6, atol=2e-7)
    assert torch.equal(out["lm_head.weight"], out["embed.weight"])


def test_lightning_run_with_strip_prefix(lightning_run: Path, tmp_path: Path) -> None:
    average_checkpoints(
        RunOptions(
            lightning_run,
            tmp_path / "o.safetensors",
            settings=AverageSettings(decay=0.8),
            selection=TensorSelection(strip_prefix="net."),
        )
    )
    saved = [
        torch.load(p, weights_only=True)
        for p in sorted(lightning_run.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[-1]))
    ]
    steps = [s["global_step"] for s in saved]
    ref = float64_reference([s["state_dict"] for s in saved], steps, 0.8)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert_matches_reference(out, {k.removeprefix("net."): v for k, v in ref.items()}, torch.float32)
    assert torch.equal(out["1.num_batches_tracked"], saved[-1]["state_dict"]["net.1.num_batches_tracked"])
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    module.load_state_dict(out)  # loads into the bare module, as --strip-prefix promises


def test_hf_trainer_run(hf_trainer_run: Path, tmp_path: Path) -> None:
    average_checkpoints(
        RunOptions(hf_trainer_run, tmp_path / "o.safetensors", settings=AverageSettings(decay=0.7))
    )
    states = [load_file(str(hf_trainer_run / f"checkpoint-{s}" / "model.safetensors")) for s in (3, 6)]
    ref = float64_reference(states, [3, 6], 0.7)
    assert_matches_reference(load_file(str(tmp_path / "o.safetensors")), ref, torch.float32)


def test_fairseq_run(tmp_path: Path) -> None:
    states = write_fairseq_run(tmp_path / "run", [100, 200, 300])
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=AverageSettings(decay=0.9))
    )
    ref = float64_reference([states[s] for s in (100, 200, 300)], [100, 200, 300], 0.9)
    assert_matches_reference(load_file(str(tmp_path / "o.safetensors")), ref, torch.float32)


def test_output_metadata_records_how_it_was_made(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", [1, 2])
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=AverageSettings(decay=0.5))
    )
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "exponential" and float(meta["decay"]) == 0.5
    assert json.loads(meta["steps"]) == [1, 2] and meta["last_step"] == "2"
    assert json.loads(meta["sources"]) == ["model_step_1.safetensors", "model_step_2.safetensors"]
    assert "ema_average_version" in meta


def test_default_output_is_beside_the_run_and_never_an_input(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", [1, 2])
    summary = average_checkpoints(RunOptions(tmp_path / "run"))
    assert summary.outputs == [tmp_path / "run-ema.safetensors"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "model_step_1.safetensors",
        "model_step_2.safetensors",
    ]


def per_step_reference(
    states: list[dict[str, torch.Tensor]], steps: list[int], decay_at
) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """What an online average would hold, applying the per-step rule at every training step with the
    weights of the checkpoint that ends each gap: a plain float64 loop over steps."""
    shadow = {n: t.double() for n, t in states[0].items() if t.is_floating_point()}
    for state, a, b in zip(states[1:], steps, steps[1:], strict=False):
        for k in range(a + 1, b + 1):
            d = decay_at(k)
            shadow = {n: d * s + (1 - d) * state[n].double() for n, s in shadow.items()}
    return shadow


def test_uniform_is_the_arithmetic_mean(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=AverageSettings("uniform"))
    )
    out = load_file(str(tmp_path / "o.safetensors"))
    for name in ("encoder.weight", "head.weight"):
        mean = torch.stack([states[s][name].double() for s in STEPS]).mean(0)
        torch.testing.assert_close(out[name].double(), mean, rtol=2e-6, atol=2e-7)


def test_step_schedule_equals_an_online_ema_over_every_step(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    settings = AverageSettings(decay=0.999, schedule="step")
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=settings))
    ref = per_step_reference([states[s] for s in STEPS], STEPS, lambda k: min(0.999, (1 + k) / (10 + k)))
    assert_matches_reference(load_file(str(tmp_path / "o.safetensors")), ref, torch.float32)


def test_power_step_schedule_matches_float64(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    settings = AverageSettings(method="power", gamma=6.94, schedule="step")
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=settings))
    ref = per_step_reference([states[s] for s in STEPS], STEPS, lambda k: (1 - 1 / k) ** 7.94)
    assert_matches_reference(load_file(str(tmp_path / "o.safetensors")), ref, torch.float32)


def test_selection_last_two(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    options = RunOptions(
        tmp_path / "run",
        tmp_path / "o.safetensors",
        settings=AverageSettings(decay=0.9),
        checkpoints=CheckpointSelection(last=2),
    )
    assert [c.step for c in prepare(options).checkpoints] == STEPS[-2:]
    average_checkpoints(options)
    ref = float64_reference([states[s] for s in STEPS[-2:]], STEPS[-2:], 0.9)
    assert_matches_reference(load_file(str(tmp_path / "o.safetensors")), ref, torch.float32)


@pytest.mark.parametrize(
    "settings",
    [AverageSettings(decay=0.95), AverageSettings(decay=0.999, schedule="step"), AverageSettings("uniform")],
    ids=["checkpoint", "step", "uniform"],
)
def test_resume_equals_one_run_bit_for_bit(tmp_path: Path, settings: AverageSettings) -> None:
    """With float32 checkpoints (or --dtype float32) the resumed average is bit-for-bit one run's."""
    write_safetensors_run(tmp_path / "all", STEPS)
    (tmp_path / "early").mkdir()
    for step in STEPS[:3]:
        name = f"model_step_{step}.safetensors"
        (tmp_path / "early" / name).write_bytes((tmp_path / "all" / name).read_bytes())
    average_checkpoints(RunOptions(tmp_path / "all", tmp_path / "one.safetensors", settings=settings))
    average_checkpoints(RunOptions(tmp_path / "early", tmp_path / "live.safetensors", settings=settings))
    resumed = prepare(RunOptions(tmp_path / "all", settings=settings, resume=tmp_path / "live.safetensors"))
    assert [c.step for c in resumed.checkpoints] == STEPS[3:]  # only the newer ones
    assert resumed.output == tmp_path / "live.safetensors"  # refreshed in place
    average_checkpoints(resumed.options)
    one, live = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "live.safetensors"))
    assert all(torch.equal(one[n], live[n]) for n in one)
    with safe_open(str(tmp_path / "live.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == STEPS


def test_resume_a_float32_output_of_bf16_checkpoints(tmp_path: Path) -> None:
    """The earlier output's dtype (float32) differs from the checkpoints' (bf16): still one run's bits."""
    write_safetensors_run(tmp_path / "run", STEPS[:3], torch.bfloat16)
    settings = AverageSettings(decay=0.99, schedule="step")
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "live.safetensors", settings=settings, dtype="float32")
    )
    write_safetensors_run(tmp_path / "run", STEPS[3:], torch.bfloat16)
    average_checkpoints(
        RunOptions(tmp_path / "run", settings=settings, dtype="float32", resume=tmp_path / "live.safetensors")
    )
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "one.safetensors", settings=settings, dtype="float32")
    )
    one, live = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "live.safetensors"))
    assert all(torch.equal(one[n], live[n]) for n in one)
    assert live["encoder.weight"].dtype == torch.float32


def test_resume_up_to_date(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors"))
    assert prepare(RunOptions(tmp_path / "run", resume=tmp_path / "o.safetensors")).up_to_date


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    average_checkpoints(
        RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=AverageSettings(decay=0.9))
    )
    with pytest.raises(CheckpointMismatchError, match=r"o\.safetensors: was made with decay 0\.9, not 0\.99"):
        prepare(
            RunOptions(
                tmp_path / "run", settings=AverageSettings(decay=0.99), resume=tmp_path / "o.safetensors"
            )
        )
    with pytest.raises(CheckpointMismatchError, match="was made with schedule checkpoint, not step"):
        prepare(
            RunOptions(
                tmp_path / "run",
                settings=AverageSettings(decay=0.9, schedule="step"),
                resume=tmp_path / "o.safetensors",
            )
        )


def test_resume_from_a_foreign_file_is_refused(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    with pytest.raises(CheckpointMismatchError, match="was not written by ema-average"):
        prepare(RunOptions(tmp_path / "run", resume=tmp_path / "run" / "model_step_100.safetensors"))


def test_resume_from_bf16_output_says_it_is_rounded(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS[:3], torch.bfloat16)
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors"))
    write_safetensors_run(tmp_path / "run", STEPS[3:], torch.bfloat16)
    prepared = prepare(RunOptions(tmp_path / "run", resume=tmp_path / "o.safetensors"))
    assert any("holds bfloat16 averages" in note for note in prepared.plan.notes)


def test_sharded_output_needs_a_folder_name(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    with pytest.raises(ConfigurationError, match="--max-shard-size writes a folder"):
        prepare(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", max_shard_size=300))


def test_default_sharded_output_is_a_folder_beside_the_run(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    assert prepare(RunOptions(tmp_path / "run", max_shard_size=300)).output == tmp_path / "run-ema"


@pytest.mark.parametrize("target", ["model_step_250.safetensors", "."])
def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path: Path, target: str) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    before = (tmp_path / "run" / "model_step_250.safetensors").read_bytes()
    options = RunOptions(tmp_path / "run", tmp_path / "run" / target, overwrite=True)
    if target == ".":
        options.max_shard_size = 300
    with pytest.raises(OutputError, match="write the average somewhere else"):
        average_checkpoints(options)
    assert (tmp_path / "run" / "model_step_250.safetensors").read_bytes() == before


def test_output_over_a_skipped_copy_is_refused(tmp_path: Path) -> None:
    # checkpoint_last.pt is skipped as a copy, but it is still the user's file.
    write_fairseq_run(tmp_path / "run", [10, 20])
    with pytest.raises(OutputError, match=r"checkpoint_last\.pt"):
        prepare(RunOptions(tmp_path / "run", tmp_path / "run" / "checkpoint_last.pt", overwrite=True))


def test_a_name_safetensors_cannot_store_is_refused_before_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        state = {"__metadata__": torch.ones(2), "w": torch.ones(2)}
        torch.save({"model": state, "step": step}, run / f"c_{step}.pt")
    with pytest.raises(CheckpointError, match=r"c_1\.pt: tensor '__metadata__' cannot be written"):
        prepare(RunOptions(run, tmp_path / "o.safetensors"))


def nan_run(folder: Path, at: int = 1, value: float = float("inf")) -> None:
    states = write_safetensors_run(folder, STEPS[:3])
    state = dict(states[STEPS[at]])
    state["head.weight"][0, 0] = value
    save_file(state, str(folder / f"model_step_{STEPS[at]}.safetensors"), metadata={"step": str(STEPS[at])})


@pytest.mark.parametrize("method", ["exponential", "uniform", "power"])
def test_nan_in_the_first_checkpoint_is_found_whatever_the_method(tmp_path: Path, method: str) -> None:
    # The check runs once, on the finished average: it relies on NaN never washing out of one.
    nan_run(tmp_path / "run", at=0, value=float("nan"))
    options = RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=AverageSettings(method))
    with pytest.raises(
        NonFiniteError, match=r"model_step_100\.safetensors: tensor 'head\.weight'.*\(step 100\)"
    ):
        average_checkpoints(options)


def test_nonfinite_values_are_refused_naming_file_tensor_and_step(tmp_path: Path) -> None:
    nan_run(tmp_path / "run")
    with pytest.raises(
        NonFiniteError,
        match=r"model_step_250\.safetensors: tensor 'head\.weight' holds NaN or Inf \(step 250\)",
    ):
        average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


def test_allow_nonfinite_keeps_them(tmp_path: Path) -> None:
    nan_run(tmp_path / "run")
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", allow_nonfinite=True))
    out = load_file(str(tmp_path / "o.safetensors"))["head.weight"]
    assert not torch.isfinite(out[0, 0])  # Inf, then NaN once a later update meets it (Inf - Inf)
    assert torch.isfinite(out.flatten()[1:]).all()


def edit_metadata(path: Path, **changes: str) -> None:
    with safe_open(str(path), "pt") as f:
        metadata = {**f.metadata(), **changes}
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"last_step": "100"}, "its last_step '100' is not its last step 400"),
        ({"steps": "[250, 400]"}, "do not name one file per step"),
        ({"steps": "[400, 250, 100]"}, "do not increase"),
        ({"steps": "[100, 250, 1e3]"}, "is not a list of steps"),
        ({"steps": "[[1]]"}, "is not a list of steps"),
        ({"steps": "oops"}, "is not a JSON list"),
        ({"sources": "{}"}, "is not a JSON list"),
        ({"values": "2"}, "'values' '2' is not a count above its 3 listed steps"),
        ({"values": "-9"}, "'values' '-9' is not a count"),
        ({"values": "1e9"}, "'values' '1e9' is not a count"),
    ],
)
def test_resume_refuses_edited_metadata(tmp_path: Path, changes: dict[str, str], problem: str) -> None:
    write_safetensors_run(tmp_path / "run", STEPS[:3])
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors"))
    edit_metadata(tmp_path / "o.safetensors", **changes)
    write_safetensors_run(tmp_path / "run", STEPS[3:])
    with pytest.raises(CheckpointMismatchError, match=r"o\.safetensors: cannot be resumed: ") as info:
        prepare(RunOptions(tmp_path / "run", resume=tmp_path / "o.safetensors"))
    assert problem in str(info.value)


def test_resume_names_checkpoints_older_than_the_output(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", [100, 400])
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors"))
    write_safetensors_run(tmp_path / "run", [250, 1000])  # 250 completed late
    prepared = prepare(RunOptions(tmp_path / "run", resume=tmp_path / "o.safetensors"))
    assert [c.step for c in prepared.checkpoints] == [1000]
    assert prepared.left_out == [
        "model_step_250.safetensors (step 250) is not applied: o.safetensors already holds steps up to 400"
    ]
    assert prepared.left_out[0] in prepared.plan.notes


# --- The naming window: several outputs named whole, whatever signal lands between their renames --------

# The command in a child process, as its console script runs it, with os.replace patched to send ``sig`` to
# the process right after the first output is renamed into place (between the two outputs' renames).
NAMING_INTERRUPT = r"""
import os, sys
first, sig = sys.argv[1], int(sys.argv[2])
real_replace, sent = os.replace, []
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if os.fspath(dst) == first and not sent:
        sent.append(sig)
        os.kill(os.getpid(), sig)
os.replace = replace
sys.argv = ["ema-average", *sys.argv[3:]]
from ema_average.__main__ import main
main()
"""


def _default_interrupts() -> None:
    """The child starts with default dispositions, as a command started from a shell does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_two_outputs_renames_leaves_both_new(tmp_path: Path, sig: signal.Signals) -> None:
    decays = [0.9, 0.99]
    states = write_safetensors_run(tmp_path / "run", STEPS)
    settings = [AverageSettings(decay=d) for d in decays]
    old = RunOptions(
        tmp_path / "run",
        tmp_path / "o.safetensors",
        settings=settings,
        checkpoints=CheckpointSelection(last=2),
    )
    outputs = average_checkpoints(old).outputs  # the earlier outputs, of the last two checkpoints only
    assert len(outputs) == 2
    command = [str(tmp_path / "run"), "-o", str(tmp_path / "o.safetensors"), "--decay", "0.9,0.99"]
    child = subprocess.run(
        [sys.executable, "-c", NAMING_INTERRUPT, str(outputs[0]), str(int(sig)), *command, "--overwrite"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_default_interrupts,
    )
    for decay, output in zip(decays, outputs, strict=True):  # both new: every checkpoint averaged in
        ref = float64_reference([states[s] for s in STEPS], STEPS, decay)
        assert_matches_reference(load_file(str(output)), ref, torch.float32)
    assert "no output written" not in child.stderr
    if sig == signal.SIGINT:  # ignored once naming began: the run finishes and says what it wrote
        assert child.returncode == 0, child.stderr
        assert "wrote" in child.stdout
    else:  # held until both are named, then it ends the process as a SIGTERM after the naming does
        assert child.returncode == -signal.SIGTERM, child.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", *(p.name for p in outputs)])


# --- Open files: a folder of many shards under a common ulimit -n ---------------------------------------

EXE = str(Path(sys.executable).parent / "ema-average")


def _few_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.subprocess  # the descriptor limit is the process's own
def test_a_folder_of_200_shards_is_written_under_ulimit_n_64(tmp_path: Path) -> None:
    steps = [10, 20, 30]
    (tmp_path / "run").mkdir()
    states = {}
    for step in steps:
        g = torch.Generator().manual_seed(step)
        states[step] = {f"layer.{i:03d}.weight": torch.randn(16, generator=g) for i in range(200)}  # 64 B
        path = tmp_path / "run" / f"model_step_{step}.safetensors"
        save_file(states[step], str(path), metadata={"step": str(step)})
    folder = tmp_path / "out"
    result = subprocess.run(
        [EXE, str(tmp_path / "run"), "-o", str(folder), "--max-shard-size", "64", "--decay", "0.9", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_few_open_files,
    )
    assert result.returncode == 0, result.stderr
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) == 200  # one file per tensor, more than the 64 descriptors allowed
    written: dict[str, torch.Tensor] = {}
    for shard in shards:
        written.update(load_file(str(folder / shard)))
    assert_matches_reference(
        written, float64_reference([states[s] for s in steps], steps, 0.9), torch.float32
    )
