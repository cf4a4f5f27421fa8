"""Snapshots while training (``PowerEmaSnapshots``): each file is the float64 power EMA of the weights the
model held at every step (EDM2's per-step weights, written out here), records its profile, is read back by
the reconstruction, and a resumed run writes the same bits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.errors import AverageStateError, ConfigurationError
from ema_average.offline.posthoc_snapshots import find_snapshots
from ema_average.online.posthoc_training import PowerEmaSnapshots


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(
    model: torch.nn.Module, snaps: PowerEmaSnapshots, steps: range, history: list | None = None
) -> None:
    """SGD on a fixed regression; ``history`` gets every step's weights in float64."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=g)
        loss = (model(x) - x[:, :2].sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if history is not None:
            history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        snaps.update(step)


def _power_ema(history: list[dict[str, torch.Tensor]], sigma_rel: float, t: int) -> dict[str, torch.Tensor]:
    """EDM2's power EMA at step t: step k's weights count (k/t)^(g+1) - ((k-1)/t)^(g+1)."""
    g = sigma_rel_to_gamma(sigma_rel)
    weights = [(k / t) ** (g + 1) - ((k - 1) / t) ** (g + 1) for k in range(1, t + 1)]
    return {n: sum(w * h[n] for w, h in zip(weights, history[:t], strict=True)) for n in history[0]}


def test_snapshots_are_the_float64_power_emas(tmp_path: Path) -> None:
    model = _model()
    snaps = PowerEmaSnapshots(model, every=20, folder=tmp_path / "posthoc-ema")
    history: list = []
    _train(model, snaps, range(1, 61), history)
    files = sorted((tmp_path / "posthoc-ema").iterdir())
    assert len(files) == 6
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        step, width = int(meta["step"]), float(meta["posthoc_sigma_rel"])
        assert float(meta["posthoc_gamma"]) == pytest.approx(sigma_rel_to_gamma(width))
        assert "ema_average_version" in meta
        got = load_file(str(path))
        for name, expected in _power_ema(history, width, step).items():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_the_reconstruction_finds_them_and_gives_a_tracked_profile_back(tmp_path: Path) -> None:
    model = _model()
    snaps = PowerEmaSnapshots(model, every=10, folder=tmp_path / "posthoc-ema")
    _train(model, snaps, range(1, 31))
    found = find_snapshots(tmp_path)  # the run's folder: its posthoc-ema/ is looked in
    assert [(p.step, round(p.sigma_rel, 6)) for p in found.profiles] == [
        (s, w) for s in (10, 20, 30) for w in (0.1, 0.05)
    ]
    found.close()


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    straight = _model()
    one = PowerEmaSnapshots(straight, every=10, folder=tmp_path / "a")
    _train(straight, one, range(1, 41))

    first = _model()
    two = PowerEmaSnapshots(first, every=10, folder=tmp_path / "b")
    _train(first, two, range(1, 21))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "snapshots": two.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = _model(seed=123)  # other weights: the checkpoint must restore everything
    resumed.load_state_dict(state["model"])
    three = PowerEmaSnapshots(resumed, every=10, folder=tmp_path / "b")
    three.load_state_dict(state["snapshots"])
    _train(resumed, three, range(21, 41))
    # (the optimizer is plain SGD without momentum: its state is empty, so the weights continue exactly)
    for path in sorted((tmp_path / "a").iterdir()):
        a, b = load_file(str(path)), load_file(str(tmp_path / "b" / path.name))
        assert all(torch.equal(a[n], b[n]) for n in a), path.name


def test_bfloat16_snapshots_cost_at_most_their_rounding(tmp_path: Path) -> None:
    model = _model()
    wide = PowerEmaSnapshots(model, every=10, folder=tmp_path / "f32")
    narrow = PowerEmaSnapshots(model, every=10, folder=tmp_path / "bf16", dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 11):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        wide.update(step)
        narrow.update(step)
    for path in sorted((tmp_path / "f32").iterdir()):
        a, b = load_file(str(path)), load_file(str(tmp_path / "bf16" / path.name))
        for name in a:
            assert b[name].dtype == torch.bfloat16
            assert torch.all(
                (b[name].float() - a[name]).abs() <= a[name].abs() * 2**-8
            )  # bfloat16 keeps 8 significant bits: round to nearest is within 2^-8


def test_refusals(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ConfigurationError, match="every"):
        PowerEmaSnapshots(model, every=0, folder=tmp_path)
    with pytest.raises(ConfigurationError, match="different widths"):
        PowerEmaSnapshots(model, (0.05, 0.05), every=5, folder=tmp_path)
    with pytest.raises(ConfigurationError, match="dtype"):
        PowerEmaSnapshots(model, every=5, folder=tmp_path, dtype=torch.int8)
    snaps = PowerEmaSnapshots(model, every=5, folder=tmp_path)
    snaps.update(1)
    with pytest.raises(ConfigurationError, match="steps must increase"):
        snaps.update(1)
    other = PowerEmaSnapshots(model, (0.05, 0.2), every=5, folder=tmp_path)
    with pytest.raises(AverageStateError, match="profiles"):
        other.load_state_dict(snaps.state_dict())


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_docs_worked_example(tmp_path: Path) -> None:
    """examples/make_example_run.py --posthoc-every writes RUN/posthoc-ema/, which the command reads from
    the run folder while the plain command still averages the raw checkpoints."""
    import subprocess
    import sys

    examples = Path(__file__).parents[1] / "examples"
    run = tmp_path / "example-run"
    make = [
        sys.executable,
        str(examples / "make_example_run.py"),
        str(run),
        "--steps",
        "400",
        "--posthoc-every",
        "100",
    ]
    done = subprocess.run(make, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    exe = str(Path(sys.executable).parent / "ema-average")
    posthoc = subprocess.run(
        [exe, str(run), "--method", "posthoc", "--sigma-rel", "0.07,0.15"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert posthoc.returncode == 0, posthoc.stderr
    assert "8 ema-average snapshots" in posthoc.stdout
    assert (tmp_path / "example-run-ema-sigma-rel0.07.safetensors").is_file()
    plain = subprocess.run([exe, str(run), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert "4 checkpoints" in plain.stdout and "post-hoc EMA snapshots" in plain.stdout
