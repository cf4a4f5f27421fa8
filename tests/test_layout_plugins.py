"""Checkpoint layouts from outside the package, both of their sides: read by discovery, written back by a folder
output in the layout's own shape (issue 28).

One is declared by a separately installed package through the ``ema_average.layouts`` entry points
(``tests/layout_plugin_pkg``, installed by pip into a folder of its own) and reaches the ``ema-average``
command; one is registered in process ``before="hf-folder"``, its folders also holding a
``model.safetensors``; declarations that fail are one line from the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ema_average.checkpoints import (
    Checkpoint,
    Layout,
    OpenOptions,
    SavedModel,
    StepInfo,
    TensorSpec,
    find_run,
    registry,
)
from ema_average.cli.app import app
from ema_average.errors import PluginError
from helpers import float64_reference, make_state, write_safetensors_run
from plugin_pkg.install import install_plugin

EXE = str(Path(sys.executable).parent / "ema-average")
STEPS = [10, 20, 30]
DECAY = 0.9
PACKAGE = Path(__file__).parent / "layout_plugin_pkg"


def command(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_reference(written: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]) -> None:
    """Every tensor written: the floating ones as the float64 rule gives them, the others as last saved."""
    expected = float64_reference(states, STEPS, DECAY)
    assert set(written) == set(states[-1])
    for name, tensor in states[-1].items():
        if name not in expected:
            assert torch.equal(written[name], tensor), name
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)


# --- a folder layout declared by an installed package, through the command ---------------------------------


@pytest.fixture(scope="module")
def bundle_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a run that sees tests/layout_plugin_pkg, installed by pip."""
    folder = install_plugin(tmp_path_factory.mktemp("layout-plugin"), PACKAGE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
    }


def write_bundle_run(run: Path) -> list[dict[str, torch.Tensor]]:
    """``run/save-N/`` bundle folders as the plug-in's library saves them; the states, oldest first."""
    states = []
    for i, step in enumerate(STEPS):
        folder = run / f"save-{step}"
        (folder / "tensors").mkdir(parents=True)
        state = dict(make_state(i))
        save_file(state, str(folder / "tensors" / "weights.safetensors"))
        (folder / "bundle.json").write_text(json.dumps({"step": step}))
        (folder / "bundle_config.json").write_text(json.dumps({"width": 4, "saved_at": step}))
        (folder / "notes.txt").write_text("not read by the bundle's library\n")
        states.append(state)
    return states


@pytest.mark.subprocess
def test_a_folder_layout_from_an_installed_package_is_read_and_written_back(
    tmp_path: Path, bundle_env: dict[str, str]
) -> None:
    states = write_bundle_run(tmp_path / "run")
    result = command(tmp_path / "run", "--dry-run", env=bundle_env)
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    for step in STEPS:  # discovery found each bundle folder as one checkpoint, its step from bundle.json
        assert f"save-{step}" in shown
    assert "bundle" in shown and "bundle.json:step" in shown

    avg = tmp_path / "avg"
    result = command(tmp_path / "run", "-o", f"{avg}/", "--decay", str(DECAY), env=bundle_env)
    assert result.returncode == 0, result.stderr
    # the bundle's own shape: its weights file in its sub-folder, the one side file it allows, nothing else
    assert files(avg) == {"tensors/weights.safetensors", "bundle_config.json"}
    latest = tmp_path / "run" / f"save-{STEPS[-1]}"
    assert (avg / "bundle_config.json").read_bytes() == (latest / "bundle_config.json").read_bytes()
    assert_reference(load_file(str(avg / "tensors" / "weights.safetensors")), states)
    # an earlier output of the same shape is replaced (every entry of it is one the layout declares)
    again = command(tmp_path / "run", "-o", f"{avg}/", "--decay", str(DECAY), "--overwrite", env=bundle_env)
    assert again.returncode == 0, again.stderr
    assert files(avg) == {"tensors/weights.safetensors", "bundle_config.json"}


# --- a folder layout registered before hf-folder ------------------------------------------------------------

TWIN_RECORD = "twin.json"


class TwinCheckpoint(Checkpoint):
    """A folder holding ``model.safetensors`` (what ``hf-folder`` claims too) and ``twin.json`` (its step,
    and the config its library reads beside the weights)."""

    layout = "twin"

    def __init__(self, path: Path, options: OpenOptions) -> None:
        super().__init__(path)
        self.weights = registry.open_weights_file(path / "model.safetensors", options)

    def specs(self) -> dict[str, TensorSpec]:
        return self.weights.specs()

    def read(self, name: str) -> torch.Tensor:
        return self.weights.read(name)

    def metadata_step(self) -> StepInfo | None:
        return StepInfo(json.loads((self.path / TWIN_RECORD).read_text())["step"], f"{TWIN_RECORD}:step")

    @property
    def saved_model(self) -> SavedModel:
        return SavedModel(self.path, "model.safetensors", side_files=(TWIN_RECORD,))

    def close(self) -> None:
        self.weights.close()


TWIN = Layout(
    "twin",
    "folder",
    "twin folders (twin.json, model.safetensors)",
    lambda p: p.is_dir() and (p / TWIN_RECORD).is_file() and (p / "model.safetensors").is_file(),
    TwinCheckpoint,
)


@pytest.fixture
def registered() -> Iterator[list[str | None]]:
    """``register(TWIN, before=...)`` for each value the test appends; taken back at its end."""
    befores: list[str | None] = []
    yield befores
    registry.unregister(TWIN)


def write_twin_run(run: Path) -> list[dict[str, torch.Tensor]]:
    states = []
    for i, step in enumerate(STEPS):
        folder = run / f"twin-{step}"
        folder.mkdir(parents=True)
        state = dict(make_state(i))
        save_file(state, str(folder / "model.safetensors"))
        (folder / TWIN_RECORD).write_text(json.dumps({"step": step}))
        (folder / "config.json").write_text("{}")  # what hf-folder would copy; the twin layout does not
        states.append(state)
    return states


def test_a_folder_layout_registered_before_hf_folder_wins_and_writes_its_shape(
    tmp_path: Path, registered: list[str | None]
) -> None:
    states = write_twin_run(tmp_path / "run")
    registry.register(TWIN)  # after the folder layouts: hf-folder claims the folders first
    assert {c.layout for c in find_run(tmp_path / "run").checkpoints} == {"hf-folder"}
    registry.unregister(TWIN)

    registry.register(TWIN, before="hf-folder")
    names = [layout.name for layout in registry.layouts()]
    assert names.index("twin") == names.index("hf-folder") - 1
    found = find_run(tmp_path / "run").checkpoints
    assert [(c.layout, c.step, c.step_origin) for c in found] == [
        ("twin", step, "twin.json:step") for step in STEPS
    ]
    avg = tmp_path / "avg"
    result = CliRunner().invoke(app, [str(tmp_path / "run"), "-o", f"{avg}/", "--decay", str(DECAY)])
    assert result.exit_code == 0, result.output
    assert files(avg) == {"model.safetensors", TWIN_RECORD}  # its side file, not hf-folder's config.json
    assert (avg / TWIN_RECORD).read_bytes() == (
        tmp_path / "run" / f"twin-{STEPS[-1]}" / TWIN_RECORD
    ).read_bytes()
    assert_reference(load_file(str(avg / "model.safetensors")), states)

    with pytest.raises(PluginError, match="before 'no-such-layout': no layout has that name"):
        registry.register(TWIN, before="no-such-layout")


# --- declarations that fail: one line from the command ------------------------------------------------------


def declare(folder: Path, **entry_points: str) -> dict[str, str]:
    """A distribution's metadata alone, declaring layouts; the environment of a run that sees it."""
    info = folder / "broken_layouts-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-layouts\nVersion: 0.1\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(["[ema_average.layouts]", *lines, ""]))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
    }


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("value", "says"),
    [
        (
            "no_such_module_for_ema_average:LAYOUT",
            "ema-average: error: the layout 'broken' declared as 'no_such_module_for_ema_average:LAYOUT' "
            "does not load: ModuleNotFoundError",
        ),
        ("json:dumps", "ema-average: error: the layout 'broken' declared as 'json:dumps' is not a Layout"),
    ],
    ids=["does-not-load", "not-a-layout"],
)
def test_a_declared_layout_that_fails_is_one_line(tmp_path: Path, value: str, says: str) -> None:
    write_safetensors_run(tmp_path / "run", STEPS)
    env = declare(tmp_path / "site", broken=value)
    output = tmp_path / "ema.safetensors"
    result = command(tmp_path / "run", "-o", output, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(says), result.stderr
    assert not output.exists()
