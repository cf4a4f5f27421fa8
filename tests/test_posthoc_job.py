"""The offline reconstruction (``--method posthoc``): each output is the float64 weighted sum of the
snapshots with the solved coefficients, several targets in one pass equal single runs bit for bit, and
hostile or inconsistent snapshot folders are refused with one line and nothing written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli
from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, reconstruct
from ema_average.offline.options import RunOptions
from ema_average.offline.posthoc_job import Targets, prepare
from ema_average.offline.run import execute

STEPS = (100, 200, 300, 400)
WIDTHS = (0.05, 0.10)


def _state(step: int, width: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + round(width * 1000))
    return {
        "encoder.weight": (1 + torch.randn(40, 30, generator=g)).to(dtype),
        "encoder.bias": torch.randn(30, generator=g).to(dtype),
        "head.weight": torch.randn(3, 40, generator=g).to(dtype),
    }


def write_snapshots(
    folder: Path, steps: tuple[int, ...] = STEPS, widths: tuple[float, ...] = WIDTHS
) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """Snapshots as this tool's training side writes them: one safetensors file per profile and step,
    its profile and step in the metadata (written here with safetensors' own writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = {}
    for step in steps:
        for width in widths:
            states[step, width] = _state(step, width)
            metadata = {"step": str(step), "posthoc_sigma_rel": repr(width), "ema_average_version": "test"}
            save_file(
                states[step, width],
                str(folder / f"ema-sigma_rel{width!r}-step{step:010d}.safetensors"),
                metadata,
            )
    return states


def _expected(
    states: dict[tuple[int, float], dict[str, torch.Tensor]], target: float, at: int
) -> dict[str, torch.Tensor]:
    keys = sorted(states, key=lambda k: (k[0], sigma_rel_to_gamma(k[1])))
    profiles = [Profile(step, sigma_rel_to_gamma(width)) for step, width in keys]
    solved = reconstruct(profiles, Profile(at, sigma_rel_to_gamma(target)))
    names = states[keys[0]]
    return {
        name: sum(c * states[k][name].double() for c, k in zip(solved.coefficients, keys, strict=True))
        for name in names
    }


def _run(folder: Path, out: Path, targets: Targets, **options: object) -> list[Path]:
    run = prepare(RunOptions(folder, output=out, **options), targets)  # type: ignore[arg-type]
    execute(run.prepared)
    return run.prepared.outputs


def test_each_output_is_the_float64_weighted_sum(tmp_path: Path) -> None:
    states = write_snapshots(tmp_path / "snaps")
    targets = Targets(sigma_rels=(0.07, 0.15), at_step=300)
    outputs = _run(tmp_path / "snaps", tmp_path / "out.safetensors", targets, chunk_numel=97, threads=2)
    for target, path in zip((0.07, 0.15), outputs, strict=True):
        assert path.name == f"out-sigma-rel{target}.safetensors"
        got = load_file(str(path))
        for name, expected in _expected(states, target, 300).items():
            torch.testing.assert_close(got[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_several_targets_in_one_pass_equal_single_runs_bit_for_bit(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    widths = (0.03, 0.07, 0.12)
    together = _run(tmp_path / "snaps", tmp_path / "all.safetensors", Targets(sigma_rels=widths), threads=2)
    for width, path in zip(widths, together, strict=True):
        alone = _run(tmp_path / "snaps", tmp_path / f"one-{width}.safetensors", Targets(sigma_rels=(width,)))
        a, b = load_file(str(path)), load_file(str(alone[0]))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_output_records_the_reconstruction(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    [path] = _run(tmp_path / "snaps", tmp_path / "o.safetensors", Targets(sigma_rels=(0.07,)))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["method"] == "posthoc"
    assert float(metadata["posthoc_target_sigma_rel"]) == pytest.approx(0.07)
    assert metadata["posthoc_target_step"] == "400"
    assert sum(json.loads(metadata["posthoc_coefficients"])) == pytest.approx(1.0)


@pytest.mark.subprocess
def test_the_command_shows_coefficients_and_fit_and_writes(tmp_path: Path) -> None:
    states = write_snapshots(tmp_path / "snaps")
    out = tmp_path / "ema.safetensors"
    args = [tmp_path / "snaps", "--method", "posthoc", "--sigma-rel", "0.07", "-o", out]
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "coefficient" in dry.stdout and "fit error" in dry.stdout and "condition number" in dry.stdout
    assert not out.exists()
    real = run_cli(*args)
    assert real.returncode == 0, real.stderr
    got = load_file(str(out))
    for name, expected in _expected(states, 0.07, 400).items():
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-6, atol=1e-6)


def _refused(tmp_path: Path, *args: str) -> str:
    """The command's one error line; nothing was written beside the snapshots."""
    before = set(tmp_path.rglob("*"))
    result = run_cli(tmp_path / "snaps", "--method", "posthoc", *args)
    assert result.returncode in (1, 2), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ema-average: error: "), result.stderr
    assert set(tmp_path.rglob("*")) == before
    return lines[0]


def test_refuses_a_target_past_the_last_snapshot(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    assert "past the last snapshot" in _refused(tmp_path, "--sigma-rel", "0.07", "--at-step", "500")


def test_refuses_a_snapshot_without_its_profile(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    save_file(_state(250, 0.05), str(tmp_path / "snaps" / "stray.safetensors"), {"step": "250"})
    line = _refused(tmp_path, "--sigma-rel", "0.07")
    assert "stray.safetensors" in line and "records no post-hoc profile" in line


def test_refuses_a_step_missing_one_profile(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    (tmp_path / "snaps" / "ema-sigma_rel0.1-step0000000300.safetensors").unlink()
    assert "step 300 has no snapshot of the profile sigma_rel 0.1" in _refused(
        tmp_path, "--sigma-rel", "0.07"
    )


def test_refuses_the_same_profile_twice_at_one_step(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    copy = tmp_path / "snaps" / "copy.safetensors"
    save_file(_state(200, 0.05), str(copy), {"step": "200", "posthoc_gamma": repr(sigma_rel_to_gamma(0.05))})
    assert "same profile" in _refused(tmp_path, "--sigma-rel", "0.07")


def test_refuses_profiles_that_make_the_system_singular(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    folder.mkdir()
    for i, gamma in enumerate((6.9, 6.9 + 1e-10)):
        save_file(
            _state(100, 0.1), str(folder / f"{i}.safetensors"), {"step": "100", "posthoc_gamma": repr(gamma)}
        )
    assert "linearly dependent" in _refused(tmp_path, "--sigma-rel", "0.07")


def test_refuses_snapshots_holding_other_tensors(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    state = _state(300, 0.05)
    state["encoder.bias"] = torch.zeros(31)
    save_file(
        state,
        str(tmp_path / "snaps" / "ema-sigma_rel0.05-step0000000300.safetensors"),
        {"step": "300", "posthoc_sigma_rel": "0.05"},
    )
    assert "'encoder.bias'" in _refused(tmp_path, "--sigma-rel", "0.07")


def test_refuses_edm2_pickles_without_unpickling(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    folder.mkdir()
    marker = tmp_path / "ran"
    payload = pickle.dumps({"ema": _Trap(str(marker))})
    (folder / "network-snapshot-0001000-0.050.pkl").write_bytes(payload)
    line = _refused(tmp_path, "--sigma-rel", "0.07")
    assert "pickled EDM2 snapshot" in line and "save_file" in line
    assert not marker.exists()


class _Trap:
    """Unpickling this creates a file: proof that code from a snapshot ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def test_refuses_a_missing_target_and_flags_of_other_methods(tmp_path: Path) -> None:
    write_snapshots(tmp_path / "snaps")
    assert "needs its targets" in _refused(tmp_path)
    assert "--decay does not apply" in _refused(tmp_path, "--sigma-rel", "0.07", "--decay", "0.9")
    assert "--resume continues" in _refused(
        tmp_path, "--sigma-rel", "0.07", "--resume", str(tmp_path / "x.safetensors")
    )


def test_a_run_holding_its_snapshot_folder_is_read_both_ways(tmp_path: Path) -> None:
    """Raw checkpoints beside their posthoc-ema/ folder: the command averages the checkpoints (the
    snapshots skipped with a notice), --method posthoc on the same folder reads the snapshots."""
    from ema_average.checkpoints import find_run

    run = tmp_path / "run"
    run.mkdir()
    for step in (100, 200):
        save_file(_state(step, 1.0), str(run / f"step_{step}.safetensors"), {"step": str(step)})
    states = write_snapshots(run / "posthoc-ema")
    found = find_run(run)
    assert [c.step for c in found.checkpoints] == [100, 200]
    assert any("posthoc-ema: post-hoc EMA snapshots" in n for n in found.notices), found.notices
    [path] = _run(run, tmp_path / "o.safetensors", Targets(sigma_rels=(0.07,)))
    got = load_file(str(path))
    for name, expected in _expected(states, 0.07, 400).items():
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-6, atol=1e-6)
