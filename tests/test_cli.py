"""End to end through the command: in process through typer's CliRunner on the app (``run_cli``), and as
the installed ``ema-average`` console script (``run_exe``, ``@pytest.mark.subprocess``) where the process
boundary is what a test is about: exit codes and lines from the real entry point, signals, plug-ins found
in the environment a process starts with."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli_helpers import EXE, run_cli, run_exe
from ema_average.cli.app import app
from ema_average.errors import EmaAverageError
from helpers import (
    WritesMarker,
    float64_reference,
    holds_unnamed_output,
    make_state,
    signal_when,
    signalled_child,
    write_safetensors_run,
    write_torch_run,
)
from plugin_pkg.install import install_plugin

STEPS = [10, 20, 40, 80]


def test_average_matches_float64_reference(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", "-o", tmp_path / "ema.safetensors", "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "peak memory" in result.stdout
    ref = float64_reference([states[s] for s in STEPS], STEPS, 0.9)
    out = load_file(str(tmp_path / "ema.safetensors"))
    for name, expected in ref.items():
        torch.testing.assert_close(out[name].double(), expected, rtol=2e-6, atol=2e-7)


def test_dtype_and_warmup_options(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS, torch.float32)
    result = run_cli(
        tmp_path / "run", "-o", tmp_path / "o.safetensors", "--decay", "0.99", "--numerator", "5",
        "--denominator", "50", "--dtype", "bfloat16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ref = float64_reference([states[s] for s in STEPS], STEPS, 0.99, 5.0, 50.0)
    out = load_file(str(tmp_path / "o.safetensors"))
    for name, expected in ref.items():
        assert out[name].dtype == torch.bfloat16
        torch.testing.assert_close(out[name].double(), expected, rtol=2**-8, atol=1e-4)


def test_dry_run_shows_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", "--dry-run", "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    for text in ("model_step_10.safetensors", "metadata:step", "start", "0.7", "0.82", "51.6600%"):
        assert text in result.stdout
    assert not (tmp_path / "run-ema.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_first_checkpoint_dominance_is_pointed_out(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", [1000, 2000, 3000])
    result = run_cli(tmp_path / "run", "--dry-run")
    # (2001 / 2010) * (3001 / 3010) = 0.99255: the warm-up rule, not 0.9999, sets both decays here
    assert "note: the first checkpoint (step 1000) carries 99.3% of the average" in result.stdout
    assert "--schedule step applies the decay once per training step" in result.stdout
    assert "lower --decay to about 0.1 to give the first checkpoint ~1%" in result.stdout  # 0.1 ** 2 = 1%


def test_dry_run_with_an_existing_output_notes_it(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", [1, 2])
    (tmp_path / "run-ema.safetensors").write_bytes(b"old")
    result = run_cli(tmp_path / "run", "--dry-run")
    assert result.returncode == 0
    assert "already exists: a real run needs --overwrite" in result.stdout
    assert (tmp_path / "run-ema.safetensors").read_bytes() == b"old"


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("ema-average ")
    help_text = run_cli("--help").stdout
    for option in (
        "--device",
        "--decay",
        "--dtype",
        "--overwrite",
        "--dry-run",
        "--threads",
        "--trust-pickle",
    ):
        assert option in help_text


@pytest.mark.subprocess
def test_usage_error_exits_2(tmp_path: Path) -> None:
    # the real entry point's exit code, and click's usage message on stderr only
    result = run_exe(tmp_path, "--dtype", "int8")
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Invalid value for '--dtype'" in result.stderr, result.stderr


def assert_nothing_written(folder: Path, expected: list[str]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


@pytest.mark.parametrize("case", ["mismatch", "unsafe", "empty", "same-step", "no-step"])
def test_bad_input_exits_1_names_the_file_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    run_dir = tmp_path / "run"
    write_safetensors_run(run_dir, [1, 2])
    culprit = run_dir / "bad.safetensors"
    if case == "mismatch":
        state = make_state(3)
        state["head.weight"] = torch.zeros(5, 5)
        save_file(dict(state), str(culprit), metadata={"step": "3"})
        expected = "tensor 'head.weight' is float32[5, 5]"
    elif case == "unsafe":
        culprit = run_dir / "step_3.pt"  # a file that would be read: its step is in its name
        marker = tmp_path / "pwned"
        torch.save({"model": make_state(3), "x": WritesMarker(marker)}, culprit)
        expected = "--trust-pickle"
    elif case == "empty":
        for p in run_dir.iterdir():
            p.unlink()
        culprit = run_dir
        expected = "no checkpoints found"
    elif case == "same-step":
        save_file(dict(make_state(9)), str(culprit), metadata={"step": "2"})
        expected = "has step 2, as does"
    else:
        torch.save(make_state(3), run_dir / "final.pt")
        culprit = run_dir / "final.pt"
        expected = "no training step found"
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_cli(run_dir, "-o", tmp_path / "ema.safetensors")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(culprit) in line and expected in line
    assert_nothing_written(tmp_path, ["run"])
    assert sorted(p.name for p in run_dir.iterdir()) == before
    if case == "unsafe":
        assert not (tmp_path / "pwned").exists()


@pytest.mark.subprocess
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    # the traceback is the interpreter's, printed by the process as the error leaves the entry point
    result = run_exe(tmp_path / "missing", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
    assert "ema_average.errors" in result.stderr and str(tmp_path / "missing") in result.stderr


def test_debug_lets_the_error_out_in_process(tmp_path: Path) -> None:
    with pytest.raises(EmaAverageError, match="missing"):
        run_cli(tmp_path / "missing", "--debug")


def test_unavailable_device_is_an_error_before_work(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_safetensors_run(tmp_path / "run", [1, 2])
    result = run_cli(tmp_path / "run", "--device", "cuda")
    assert result.returncode == 1
    assert "CUDA is not available" in result.stderr
    assert_nothing_written(tmp_path, ["run"])


@pytest.mark.subprocess
def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    # through the real entry point: exit 1 with one line on stderr, then exit 0
    write_safetensors_run(tmp_path / "run", [1, 2])
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"precious")
    result = run_exe(tmp_path / "run", "-o", out)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "--overwrite" in result.stderr, result.stderr
    assert out.read_bytes() == b"precious"
    result = run_exe(tmp_path / "run", "-o", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert set(load_file(str(out))) == set(make_state(1))


def big_run(folder: Path) -> None:
    """8 checkpoints of 32 MiB: long enough to be interrupted midway."""
    folder.mkdir()
    for step in range(1, 9):
        state = {f"layer.{i}.weight": torch.full((1024, 1024), float(step)) for i in range(8)}
        save_file(state, str(folder / f"step_{step}.safetensors"))


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the run midway")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_run_killed_midway_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    # The signal lands while the output is open and unnamed, whatever the launcher ignored and however
    # busy the machine: the run is stopped while that is checked (signal_when), not raced with a sleep.
    big_run(tmp_path / "run")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "ema.safetensors"
    command = [EXE, str(tmp_path / "run"), "-o", str(output), "-q"]
    with signalled_child(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        signal_when(proc, sig, lambda: holds_unnamed_output(proc.pid, output))
        stdout, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:  # no cleanup can run: only the hidden lock file stays, the next run removes it
        assert proc.returncode == -signal.SIGKILL, stderr
        assert [p.name for p in out_dir.iterdir()] == [
            f".ema.safetensors.ema-average-u{os.geteuid()}.lock"
        ], stderr
        again = run_cli(tmp_path / "run", "-o", output, "-q")
        assert again.returncode == 0, again.stderr
        assert [p.name for p in out_dir.iterdir()] == ["ema.safetensors"]
    else:
        assert list(out_dir.iterdir()) == [], stderr
        assert (proc.returncode, stdout, stderr) == (130, "", "ema-average: interrupted; no output written\n")


def test_torch_run_end_to_end(tmp_path: Path) -> None:
    states = write_torch_run(tmp_path / "run", STEPS)
    result = run_cli(
        tmp_path / "run", "-o", tmp_path / "o.safetensors", "--decay", "0.5", "--exclude", "head.*"
    )
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "o.safetensors"))
    assert "head.weight" not in out
    ref = float64_reference([states[s] for s in STEPS], STEPS, 0.5)
    torch.testing.assert_close(out["encoder.weight"].double(), ref["encoder.weight"], rtol=2e-6, atol=2e-7)


def test_uniform_method_from_the_command_line(tmp_path: Path) -> None:
    states = write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", "-o", tmp_path / "o.safetensors", "--method", "uniform")
    assert result.returncode == 0, result.stderr
    mean = torch.stack([states[s]["head.weight"].double() for s in STEPS]).mean(0)
    torch.testing.assert_close(load_file(str(tmp_path / "o.safetensors"))["head.weight"].double(), mean)


def test_decay_and_half_life_together_is_an_error(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", "--decay", "0.9", "--half-life", "10")
    assert result.returncode == 2 and "give --decay or --half-life, not both" in result.stderr


def test_resume_from_the_command_line(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS[:2])
    out = tmp_path / "live.safetensors"
    assert run_cli(tmp_path / "run", "-o", out, "--schedule", "step", "--decay", "0.99").returncode == 0
    write_safetensors_run(tmp_path / "run", STEPS[2:])
    result = run_cli(tmp_path / "run", "--resume", out, "--schedule", "step", "--decay", "0.99")
    assert result.returncode == 0, result.stderr
    # the plan table shortens a long path from its left (a deeper tmp_path under pytest-xdist): name and role
    assert (
        re.search(r"continuing\s.*live\.safetensors", result.stdout, re.DOTALL)
        and "(earlier average)" in result.stdout
    )
    again = run_cli(tmp_path / "run", "--resume", out, "--schedule", "step", "--decay", "0.99")
    assert again.returncode == 0 and "is up to date" in again.stdout
    mismatch = run_cli(tmp_path / "run", "--resume", out, "--decay", "0.99")
    assert mismatch.returncode == 1 and "was made with schedule step, not checkpoint" in mismatch.stderr


def test_selection_cannot_thin_a_resumed_average(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    assert run_cli(tmp_path / "run", "-o", tmp_path / "o.safetensors").returncode == 0
    result = run_cli(tmp_path / "run", "--resume", tmp_path / "o.safetensors", "--last", "2")
    assert result.returncode == 2 and "--last and --every cannot be combined with --resume" in result.stderr


def test_several_decays_in_one_pass(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS, torch.bfloat16)
    plan = run_cli(tmp_path / "run", "--decay", "0.9,0.99", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    for text in (
        "weight decay0.9",
        "weight decay0.99",
        "decay0.9: method exponential",
        "run-ema-decay0.99.safetensors",
    ):
        assert text in plan.stdout, text
    result = run_cli(tmp_path / "run", "--decay", "0.9,0.99", "--threads", "2")
    assert result.returncode == 0, result.stderr
    for decay in ("0.9", "0.99"):
        assert (
            run_cli(
                tmp_path / "run", "--decay", decay, "-o", tmp_path / "alone.safetensors", "--overwrite"
            ).returncode
            == 0
        )
        together = tmp_path / f"run-ema-decay{decay}.safetensors"
        assert together.read_bytes() == (tmp_path / "alone.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decay", "0.9,0.99", "--half-life", "5,6"], "--decay and --half-life both list several values"),
        (["--decay", "0.9,0.9"], "the same settings are given twice"),
        (["--decay", "0.9,0.99", "--watch"], "--watch keeps one average fresh"),
        (
            ["--decay", "0.9,0.99", "--resume", "prev.safetensors"],
            "--resume and --watch continue one average",
        ),
    ],
)
def test_several_settings_errors(tmp_path: Path, args: list[str], message: str) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decay", "0.9,x"], "Invalid value for '--decay': 'x' is not a number"),
        (["--sigma-rel", "abc"], "Invalid value for '--sigma-rel': 'abc' is not a number"),
        (["--threads", "abc"], "Invalid value for '--threads'"),
        (["--steps", "100,x"], "Invalid value for '--steps': takes whole numbers"),
        (["--max-shard-size", "garbage"], "Invalid value for '--max-shard-size': not a size: 'garbage'"),
        (["--max-shard-size", "0"], "Invalid value for '--max-shard-size': size must be positive"),
        (["--max-shard-size", "-5"], "Invalid value for '--max-shard-size': not a size: '-5'"),
        (["--memory-budget", "8MiB"], "No such option: --memory-budget"),
        (["--threads", "0"], "ema-average: error: --threads must be at least 1, got 0"),
        (["--decay", "1.5"], "ema-average: error: --decay must be"),
        (["--set", "decay=x"], "Invalid value for '--set': 'x' is not a number"),
        (["--set", "decay"], "Invalid value for '--set': takes NAME=VALUE"),
        (["--set", "numerator=1,2"], "ema-average: error: --numerator takes one value, not a list"),
        (["--set", "decay=0.9", "--decay", "0.8"], "ema-average: error: --decay is given twice"),
        (["--set", "gamma=3"], "ema-average: error: --gamma does not apply to the exponential average"),
        (["--method", "fixed-share"], "ema-average: error: no moving average named 'fixed-share'"),
    ],
)
def test_every_usage_error_exits_2_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    # A value the command line cannot parse and settings it cannot use alike: exit 2, as click's own.
    write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", *args)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_discovery_flags_reach_the_run(tmp_path: Path) -> None:
    # --glob keeps fairseq's update checkpoints; --steps gives each its real step; a bad list is one line.
    from helpers import write_fairseq_run

    write_fairseq_run(tmp_path / "run", [10, 20, 30])
    (tmp_path / "run" / "checkpoint1.pt").write_bytes((tmp_path / "run" / "checkpoint_1_10.pt").read_bytes())
    result = run_cli(tmp_path / "run", "--dry-run", "--glob", "checkpoint_*_*.pt", "--steps", "100,200,300")
    assert result.returncode == 0, result.stderr
    assert "checkpoint1.pt" not in result.stdout and "checkpoint_last.pt" not in result.stdout
    for step in ("100", "200", "300"):
        assert f" {step} " in result.stdout


@pytest.mark.parametrize(("dtype", "limit"), [("float16", "65504"), ("bfloat16", "3.38953e+38")])
def test_an_output_dtype_that_cannot_hold_the_average_is_refused(
    tmp_path: Path, dtype: str, limit: str
) -> None:
    # Finite averages that round to Inf in the output dtype: the check is on what would be written.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    values = torch.tensor([1.0, 7e4, -1e5, 3.4e38])
    for step in (10, 20):
        save_file(
            {"fits": torch.tensor([1.0, 65504.0]), "w": values},
            str(run_dir / f"s{step}.safetensors"),
            {"step": str(step)},
        )
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    out = tmp_path / "o.safetensors"
    result = run_cli(run_dir, "-o", out, "--dtype", dtype)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ema-average: error: tensor 'w' averages to 3.4e+38, beyond what {dtype} holds ({limit}): it would be "
        "written as Inf; refused. --dtype float32 keeps it; --allow-nonfinite writes it anyway"
    ]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    # asked for, Inf is written where the dtype overflows, and only there
    assert run_cli(run_dir, "-o", out, "--dtype", dtype, "--allow-nonfinite").returncode == 0
    written = load_file(str(out))
    assert torch.equal(written["fits"], torch.tensor([1.0, 65504.0]).to(getattr(torch, dtype)))
    assert torch.isinf(written["w"]).tolist() == (
        [False, True, True, True] if dtype == "float16" else [False, False, False, True]
    )


# --- an average another package declares, from the command by name (issue 20) ------------------------------


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a run that sees the test plugin (tests/plugin_pkg), installed by pip."""
    folder = install_plugin(tmp_path_factory.mktemp("plugin"))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
    }


def fixed_share_reference(states: list[dict[str, torch.Tensor]], keep: float) -> dict[str, torch.Tensor]:
    """The plugin's average by hand in float64: each checkpoint after the first gets 1 - keep."""
    shadow = {n: t.double() for n, t in states[0].items() if t.is_floating_point()}
    for state in states[1:]:
        shadow = {n: keep * s + (1 - keep) * state[n].double() for n, s in shadow.items()}
    return shadow


@pytest.mark.subprocess
def test_average_from_another_package_by_name(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    # a process of its own: the plug-in is found in the environment the command starts with, and its
    # average registers in that process only
    states = write_safetensors_run(tmp_path / "run", STEPS)
    ordered = [states[s] for s in STEPS]
    command = [tmp_path / "run", "--method", "fixed-share"]
    result = run_exe(*command, "--set", "keep=0.25", "-o", tmp_path / "o.safetensors", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert "method fixed-share (keep 0.25)" in result.stdout
    out = load_file(str(tmp_path / "o.safetensors"))
    for name, expected in fixed_share_reference(ordered, 0.25).items():
        torch.testing.assert_close(out[name].double(), expected, rtol=2e-6, atol=2e-7)
    # its alternative setting, as a comma list: one output per value, named for it
    result = run_exe(*command, "--set", "drop=0.5,0.75", "-o", tmp_path / "s.safetensors", env=plugin_env)
    assert result.returncode == 0, result.stderr
    for drop in (0.5, 0.75):
        out = load_file(str(tmp_path / f"s-drop{drop}.safetensors"))
        for name, expected in fixed_share_reference(ordered, 1 - drop).items():
            torch.testing.assert_close(out[name].double(), expected, rtol=2e-6, atol=2e-7)


def test_set_gives_a_built_in_setting_as_its_flag_does(tmp_path: Path) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    assert run_cli(tmp_path / "run", "-o", tmp_path / "flag.safetensors", "--half-life", "3").returncode == 0
    result = run_cli(tmp_path / "run", "-o", tmp_path / "set.safetensors", "--set", "half-life=3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "set.safetensors").read_bytes() == (tmp_path / "flag.safetensors").read_bytes()


def test_help_shows_the_defaults_the_rules_declare() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.replace("│", " ").split())
    for text in ("[default: 0.9999]", "[default: 0.05]", "[default: 10.0]", "--set NAME=VALUE[,VALUE...]"):
        assert text in shown, text


# --- issue 24 -----------------------------------------------------------------------------------------------


def test_float8_outputs_equal_the_float64_reference_rounded(tmp_path: Path) -> None:
    """Any float8 output failed with "aminmax_cpu not implemented for Float8_e4m3fn", naming no file."""
    g = torch.Generator().manual_seed(24)
    kinds = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    states = [{n: (torch.randn(300, generator=g) * 50).to(d) for n, d in kinds.items()} for _ in STEPS]
    (tmp_path / "run").mkdir()
    for step, state in zip(STEPS, states, strict=True):
        save_file(state, str(tmp_path / "run" / f"s{step}.safetensors"), {"step": str(step)})
    result = run_cli(tmp_path / "run", "-o", tmp_path / "o.safetensors", "--decay", "0.9", "-q")
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "o.safetensors"))
    reference = float64_reference([{n: t.double() for n, t in s.items()} for s in states], STEPS, 0.9)
    for name, dtype in kinds.items():
        assert out[name].dtype == dtype
        assert torch.equal(out[name].view(torch.uint8), reference[name].to(dtype).view(torch.uint8)), name


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "decay=\u0661"],  # an Arabic-Indic one: float() reads it as 1.0
        ["--decay", "0.9,\u0661"],
        ["--steps", "\u0661\u0660,20"],
        ["--max-shard-size", "\u0665GB"],
    ],
)
def test_numbers_on_the_command_line_are_ascii(tmp_path: Path, args: list[str]) -> None:
    """Python's int() and float() read any Unicode digit; the command line reads ASCII ones (issue 24), as
    click's own INTEGER and FLOAT options (--last, --numerator, --threads) already did."""
    write_safetensors_run(tmp_path / "run", STEPS)
    result = run_cli(tmp_path / "run", "--dry-run", *args)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{args[-2]}'" in " ".join(result.stderr.replace("│", " ").split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.subprocess
def test_a_plugin_that_exits_at_import_is_one_line_naming_it(tmp_path: Path) -> None:
    """A declared average whose import raises SystemExit(3) ended the command with exit 3 and nothing said."""
    plugin = tmp_path / "plugin"
    info = plugin / "exiting_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ema_average.averages]\nexiting = exiting_plugin:Average\n")
    (plugin / "exiting_plugin.py").write_text("raise SystemExit(3)\n")
    write_safetensors_run(tmp_path / "run", STEPS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    result = run_exe(tmp_path / "run", "--method", "exiting", "-o", tmp_path / "o.safetensors", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ema-average: error: the average 'exiting' declared as 'exiting_plugin:Average' does not load: "
        "its import raised SystemExit(3)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin", "run"]


# --- the command in a host's process (a test runner, a notebook) -------------------------------------------


def test_the_command_in_process_leaves_the_hosts_warnings_alone(tmp_path: Path) -> None:
    """The command silenced every library's warning for the rest of the host's life, and replaced its
    ``warnings.showwarning``: only the command's own process is its to change (as its signal handlers)."""
    write_safetensors_run(tmp_path / "run", STEPS)
    with warnings.catch_warnings():  # whatever happens, the test run's own filters come back
        warnings.simplefilter("default")
        before = (list(warnings.filters), warnings.showwarning)
        for args in (["--dry-run"], ["--decay", "x"], ["-o", tmp_path / "run"]):  # ok, usage error, error
            CliRunner().invoke(app, [str(tmp_path / "run"), *map(str, args)], catch_exceptions=False)
            assert (list(warnings.filters), warnings.showwarning) == before, args
