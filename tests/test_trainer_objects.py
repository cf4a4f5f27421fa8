"""Objects a trainer pickles beside its weights load as inert placeholders (issue 17, item 2).

The files are reproduced from each trainer's source; the trainers are not installed. Stand-in classes of
the same module and name are written to a package in a temporary folder that only the child process
saving the files imports (``PYTHONPATH``): this process and the command never have it, as for a user
without the trainer's package. Sources read: mmengine 0.10.7 (``runner/runner.py`` save_checkpoint,
``runner/checkpoint.py`` save_checkpoint (``torch.save``), ``logging/message_hub.py`` state_dict,
``logging/history_buffer.py`` ``__getstate__``); ultralytics 8.4.190 (``engine/trainer.py`` save_model,
``utils/torch_utils.py`` strip_optimizer, ModelEMA); olmo-core ``train/rank0.pt`` as
docs/trainer-layouts.md section 3 records it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ema_average.checkpoints import TorchCheckpoint
from ema_average.checkpoints.reading import safe_unpickle
from ema_average.errors import CheckpointError, MissingPackageError, UnsafeCheckpointError
from helpers import float64_reference

EXE = str(Path(sys.executable).parent / "ema-average")

# mmengine/logging/history_buffer.py, as far as pickling goes: __getstate__ adds the class's statistics
# methods, which protocol 2 pickles as getattr(HistoryBuffer, "min"); its histories are numpy arrays.
MMENGINE = {
    "mmengine/__init__.py": "__version__ = '0.10.7'\n",
    "mmengine/logging/__init__.py": "",
    "mmengine/logging/history_buffer.py": """
        import numpy as np


        class HistoryBuffer:
            _statistics_methods: dict = dict()

            def __init__(self, log_history=[], count_history=[], max_length=1000000):
                self.max_length = max_length
                self._set_default_statistics()
                self._log_history = np.array(log_history)
                self._count_history = np.array(count_history)

            def _set_default_statistics(self):
                self._statistics_methods.setdefault("min", HistoryBuffer.min)
                self._statistics_methods.setdefault("max", HistoryBuffer.max)
                self._statistics_methods.setdefault("current", HistoryBuffer.current)
                self._statistics_methods.setdefault("mean", HistoryBuffer.mean)

            def update(self, log_val, count=1):
                self._log_history = np.append(self._log_history, log_val)
                self._count_history = np.append(self._count_history, count)

            def min(self, window_size=None):
                return self._log_history.min()

            def max(self, window_size=None):
                return self._log_history.max()

            def current(self):
                return self._log_history[-1]

            def mean(self, window_size=None):
                return self._log_history.sum() / self._count_history.sum()

            def __getstate__(self):
                self.__dict__.update(statistics_methods=self._statistics_methods)
                return self.__dict__
    """,
}

# A Runner training a small model, saving iter_N.pth every 4 iterations as Runner.save_checkpoint does
# (by_epoch=False: meta.iter = runner.iter + 1), and last_checkpoint naming the latest.
MMENGINE_RUN = """
import collections, copy, sys
from pathlib import Path
import torch
from mmengine.logging.history_buffer import HistoryBuffer

out, refs = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
refs.mkdir(parents=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 4)
loss_buffer, lr_buffer = HistoryBuffer(), HistoryBuffer()
for it in range(12):
    loss = model(torch.randn(16, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    loss_buffer.update(loss.item())
    lr_buffer.update(scheduler.get_last_lr()[0])
    if (it + 1) % 4:
        continue
    keys = ["train/loss", "train/lr", "epoch", "iter"]
    hub = dict(  # MessageHub.state_dict(): deep copies of the resumed keys' buffers and runtime info
        log_scalars=collections.OrderedDict(
            [("train/loss", copy.deepcopy(loss_buffer)), ("train/lr", copy.deepcopy(lr_buffer))]
        ),
        runtime_info=collections.OrderedDict([("epoch", 0), ("iter", it)]),
        resumed_keys=collections.OrderedDict((k, True) for k in keys),
    )
    meta = dict(epoch=0, iter=it + 1, cfg="model = dict(type='Toy')", seed=0, experiment_name="toy",
                time="20260101_000000", mmengine_version="0.10.7", dataset_meta=dict(classes=("a", "b")))
    checkpoint = {
        "meta": meta,
        "state_dict": collections.OrderedDict((k, v.cpu()) for k, v in model.state_dict().items()),
        "message_hub": hub,
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [scheduler.state_dict()],
    }
    torch.save(checkpoint, out / f"iter_{it + 1}.pth")
    torch.save(model.state_dict(), refs / f"{it + 1}.pt")
(out / "last_checkpoint").write_text(str(out / "iter_12.pth"))
"""


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def run_with(package: Path | None, *args: object) -> subprocess.CompletedProcess[str]:
    """A child with default signal dispositions; ``package`` on its path where given (``args[0]`` a
    script for ``python -c``, or ``EXE`` for the command)."""
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package), env.get("PYTHONPATH", "")])
    command = [str(a) for a in args]
    if command[0] != EXE:
        command = [sys.executable, "-c", *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def produced(package: Path, script: str, run: Path, refs: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The trainer's run saved by a child that has the stand-in package; the weights of each save (plain
    state dicts) by step, the expectation."""
    result = run_with(package, script, run, refs)
    assert result.returncode == 0, result.stderr
    return {int(p.stem): torch.load(p, weights_only=True) for p in sorted(refs.glob("*.pt"))}


@pytest.fixture(scope="module")
def mmengine_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("mmengine")
    package = write_package(root / "pkgs", MMENGINE)
    states = produced(package, MMENGINE_RUN, root / "work_dir", root / "refs")
    assert sorted(states) == [4, 8, 12]
    assert importlib.util.find_spec("mmengine") is None  # the package is not here, as for a user
    return root / "work_dir", states


def assert_is_reference(output: Path, states: dict[int, dict[str, torch.Tensor]], decay: float) -> None:
    steps = sorted(states)
    expected = float64_reference([states[s] for s in steps], steps, decay)
    out = load_file(str(output))
    assert set(expected) <= set(out)
    for name, tensor in expected.items():
        dtype = states[steps[0]][name].dtype
        assert out[name].dtype == dtype
        if dtype == torch.float16:  # the float32 average rounded once to the input's fp16: within an ulp
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(out[name].double(), tensor, rtol=eps, atol=eps * 1e-2)
        else:
            torch.testing.assert_close(out[name].double(), tensor, rtol=2e-6, atol=2e-7)


@pytest.mark.subprocess
def test_mmengine_file_names_its_objects_and_getattr(mmengine_run: tuple[Path, dict]) -> None:
    # What the test relies on: the Runner's file pickles mmengine's class and getattr(HistoryBuffer, 'min').
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(mmengine_run[0] / "iter_4.pth"))
    assert {"mmengine.logging.history_buffer.HistoryBuffer", "builtins.getattr"} <= names


@pytest.mark.subprocess
def test_mmengine_runner_checkpoints_average_without_the_package(
    mmengine_run: tuple[Path, dict], tmp_path: Path
) -> None:
    run, states = mmengine_run
    before = {p: p.read_bytes() for p in run.iterdir()}
    result = run_with(None, EXE, run, "-o", tmp_path / "ema.safetensors", "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    assert_is_reference(tmp_path / "ema.safetensors", states, 0.9)
    told = result.stdout + result.stderr
    assert "message_hub: mmengine.logging.history_buffer.HistoryBuffer objects (not read)" in told
    assert {p: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.subprocess
def test_mmengine_with_trust_pickle_and_no_package_is_not_damaged(
    mmengine_run: tuple[Path, dict], tmp_path: Path
) -> None:
    # The safe load reads the weights; nothing needs full unpickling, so nothing of the file runs.
    run, states = mmengine_run
    out = tmp_path / "ema.safetensors"
    result = run_with(None, EXE, run, "-o", out, "--decay", "0.9", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    assert "damaged" not in result.stderr and "full unpickling" not in result.stderr
    assert_is_reference(out, states, 0.9)


@pytest.mark.subprocess
def test_objects_inside_placeholders_are_not_weights(mmengine_run: tuple[Path, dict]) -> None:
    ckpt = TorchCheckpoint(mmengine_run[0] / "iter_8.pth")
    assert ckpt.state_dict_key == "state_dict"
    assert sorted(ckpt.specs()) == sorted(mmengine_run[1][8])
    assert ckpt.metadata_step() is not None and ckpt.metadata_step().step == 8
    obj, _ = safe_unpickle.load_torch_file(mmengine_run[0] / "iter_8.pth")
    buffer = obj["message_hub"]["log_scalars"]["train/loss"]
    assert repr(buffer) == "<mmengine.logging.history_buffer.HistoryBuffer object (not read)>"
    with pytest.raises(AttributeError):
        buffer._log_history  # noqa: B018  (its state was dropped: nothing of it is kept or reachable)


# olmo-core's stepN/train/rank0.pt: trainer.state_dict(), numpy RNG state and Python's random state
OLMO_RANK0 = """
import random, sys
import numpy as np
import torch
random.seed(0)
np.random.seed(0)
torch.save({
    "global_step": 20, "global_train_tokens_seen": 40960, "global_train_petaflops": 0.5, "max_steps": 100,
    "data_loader": {"dataset_fingerprint_version": "v2", "dataset_fingerprint": "abc", "batches_processed": 20,
                    "tokens_processed": 40960, "seed": 0, "epoch": 1, "dataset_type": "fsl",
                    "sequence_length": 2048},
    "epoch": 1, "world_size": 1,
    "rng": {"python": {"version": 3, "state": random.getstate()},
            "numpy": {"version": np.__version__, "state": np.random.get_state()},
            "torch": {"version": torch.__version__, "state": torch.get_rng_state()}},
    "callbacks": {"speed_monitor": {"total_tokens": 40960}},
}, sys.argv[1])
"""


@pytest.mark.subprocess
def test_olmo_core_trainer_state_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "step20" / "train" / "rank0.pt"
    path.parent.mkdir(parents=True)
    result = run_with(None, OLMO_RANK0, path)
    assert result.returncode == 0, result.stderr
    obj, _ = safe_unpickle.load_torch_file(path)
    assert obj["global_step"] == 20 and obj["data_loader"]["batches_processed"] == 20
    with pytest.raises(CheckpointError, match="no state dict found") as caught:
        TorchCheckpoint(path)  # no weights: refused as such, never as unsafe
    assert not isinstance(caught.value, UnsafeCheckpointError)


# ultralytics: a DetectionModel of its own modules, trained with ModelEMA, saved by save_model
ULTRALYTICS = {
    "ultralytics/__init__.py": "__version__ = '8.4.190'\n",
    "ultralytics/utils/__init__.py": """
        from types import SimpleNamespace


        class IterableSimpleNamespace(SimpleNamespace):
            def __iter__(self):
                return iter(vars(self).items())
    """,
    "ultralytics/nn/__init__.py": "",
    "ultralytics/nn/modules/__init__.py": "",
    "ultralytics/nn/modules/conv.py": """
        import torch.nn as nn


        class Conv(nn.Module):
            default_act = nn.SiLU()

            def __init__(self, c1, c2, k=1):
                super().__init__()
                self.conv = nn.Conv2d(c1, c2, k, bias=False)
                self.bn = nn.BatchNorm2d(c2)
                self.act = self.default_act

            def forward(self, x):
                return self.act(self.bn(self.conv(x)))
    """,
    "ultralytics/nn/modules/head.py": """
        import torch
        import torch.nn as nn

        from ultralytics.nn.modules.conv import Conv


        class Detect(nn.Module):
            def __init__(self, nc, ch):
                super().__init__()
                self.nc, self.no = nc, nc + 4
                self.stride = torch.zeros(1)
                self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, 4), nn.Conv2d(4, 4, 1)) for c in ch)
                self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, nc), nn.Conv2d(nc, nc, 1)) for c in ch)

            def forward(self, x):
                return [torch.cat((a(x), b(x)), 1) for a, b in zip(self.cv2, self.cv3)]
    """,
    "ultralytics/nn/tasks.py": """
        import torch
        import torch.nn as nn

        from ultralytics.nn.modules.conv import Conv
        from ultralytics.nn.modules.head import Detect


        class DetectionModel(nn.Module):
            def __init__(self, nc=2):
                super().__init__()
                self.yaml = {"nc": nc, "scale": "n"}
                self.model = nn.Sequential(Conv(3, 8, 3), Conv(8, 8), Detect(nc, (8,)))
                self.save = []
                self.stride = torch.tensor([8.0])
                self.names = {i: f"class{i}" for i in range(nc)}

            def forward(self, x):
                return self.model(x)
    """,
}

# trainer.py save_model and the EMA of utils/torch_utils.py ModelEMA, one save per epoch (save_period 1):
# last.pt every epoch, best.pt when the fitness is the best, epochE.pt; an interrupted run (no strip).
ULTRALYTICS_RUN = """
import io, math, sys
from copy import deepcopy
from pathlib import Path
import numpy as np
import torch
from ultralytics import __version__
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import IterableSimpleNamespace

wdir, refs = Path(sys.argv[1]), Path(sys.argv[2])
wdir.mkdir(parents=True)
refs.mkdir(parents=True)
torch.manual_seed(0)
args = IterableSimpleNamespace(model="yolo11n.yaml", epochs=4, save_period=1, lr0=0.01)
model = DetectionModel()
model.args = args
ema = deepcopy(model).eval()
for p in ema.parameters():
    p.requires_grad_(False)
updates, decay, tau = 0, 0.9999, 2000
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
best_fitness, fitnesses = None, [0.1, 0.3, 0.2, 0.25]
for epoch in range(4):
    for _ in range(3):
        loss = sum(o.pow(2).mean() for o in model(torch.randn(2, 3, 8, 8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updates += 1
        d = decay * (1 - math.exp(-updates / tau))
        msd = model.state_dict()
        for k, v in ema.state_dict().items():
            if v.dtype.is_floating_point:
                v *= d
                v += (1 - d) * msd[k].detach()
    fitness = fitnesses[epoch]
    if best_fitness is None or fitness > best_fitness:
        best_fitness = fitness
    saved = deepcopy(ema).half()
    buffer = io.BytesIO()
    torch.save({
        "epoch": epoch, "best_fitness": np.float64(best_fitness),
        "stopper": {"best_fitness": best_fitness, "best_epoch": epoch}, "model": None, "ema": saved,
        "updates": updates, "modelopt": None,
        "optimizer": optimizer.state_dict(), "scaler": {}, "train_args": vars(args),
        "train_metrics": {"metrics/mAP50(B)": fitness, "fitness": fitness},
        "train_results": {"epoch": list(range(1, epoch + 2))}, "date": "2026-01-01T00:00:00+00:00",
        "version": __version__, "git": {"root": None, "branch": None, "commit": None},
        "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
    }, buffer)
    serialized = buffer.getvalue()
    (wdir / "last.pt").write_bytes(serialized)
    if best_fitness == fitness:
        (wdir / "best.pt").write_bytes(serialized)
    (wdir / f"epoch{epoch}.pt").write_bytes(serialized)
    torch.save(saved.state_dict(), refs / f"{updates}.pt")
"""


@pytest.fixture(scope="module")
def ultralytics_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("ultralytics")
    package = write_package(root / "pkgs", ULTRALYTICS)
    states = produced(package, ULTRALYTICS_RUN, root / "runs" / "detect" / "train" / "weights", root / "refs")
    assert importlib.util.find_spec("ultralytics") is None
    assert sorted(states) == [3, 6, 9, 12]
    assert all(t.dtype == torch.float16 for t in states[3].values() if t.is_floating_point())
    return root / "runs" / "detect" / "train" / "weights", package, states


@pytest.mark.subprocess
def test_ultralytics_without_trust_pickle_is_one_line(ultralytics_run: tuple[Path, Path, dict]) -> None:
    weights, _, _ = ultralytics_run
    result = run_with(None, EXE, weights, "-o", weights.parent / "never.safetensors")
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (
        "its weights are a pickled model object (ema: ultralytics.nn.tasks.DetectionModel)" in result.stderr
    )
    assert "With --trust-pickle and 'ultralytics' importable, its state dict is read" in result.stderr
    assert not (weights.parent / "never.safetensors").exists()
    with pytest.raises(UnsafeCheckpointError, match=r"pickled model object \(ema: ultralytics\.nn\.tasks\."):
        TorchCheckpoint(weights / "epoch0.pt", state_dict_key="ema")  # also when asked for by name


@pytest.mark.subprocess
def test_ultralytics_with_trust_pickle_averages_the_ema_module(
    ultralytics_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    weights, package, states = ultralytics_run
    out = tmp_path / "ema.safetensors"
    result = run_with(package, EXE, weights, "-o", out, "--decay", "0.9", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    assert_is_reference(out, states, 0.9)  # fp16 in, the float32 average rounded once to fp16
    told = result.stdout + result.stderr
    # last.pt (epoch 3, as epoch3.pt) carries no step in its name beside files that do: never fully unpickled
    assert "last.pt: not read: its name carries no step beside files whose names do" in " ".join(told.split())


@pytest.mark.subprocess
def test_ultralytics_with_trust_pickle_and_no_package_names_it(
    ultralytics_run: tuple[Path, Path, dict],
) -> None:
    weights, _, _ = ultralytics_run
    missing = r"epoch0\.pt: pickles objects of module 'ultralytics'"
    with (
        pytest.warns(UserWarning, match="full unpickling"),
        pytest.raises(MissingPackageError, match=missing),
    ):
        TorchCheckpoint(weights / "epoch0.pt", trust_pickle=True)
    result = run_with(None, EXE, weights, "-o", weights.parent / "never.safetensors", "--trust-pickle")
    assert result.returncode == 1, result.stderr
    assert "module 'ultralytics', which is not installed here" in result.stderr
    assert "damaged" not in result.stderr


# utils/torch_utils.py strip_optimizer, as final_eval runs it on last.pt and best.pt when training ends
ULTRALYTICS_STRIP = """
import shutil, sys
from pathlib import Path
import torch
wdir = Path(sys.argv[1])
for name in ("last.pt", "best.pt"):
    x = torch.load(wdir / name, weights_only=False)
    if x.get("ema"):
        x["model"] = x["ema"]
    if hasattr(x["model"], "args"):
        x["model"].args = dict(x["model"].args)
    x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False
    for k in "optimizer", "best_fitness", "stopper", "ema", "updates", "scaler":
        x[k] = None
    x["epoch"] = -1
    x["train_args"] = {k: v for k, v in x["train_args"].items() if k in ("model", "epochs")}
    metadata = {"date": "2026-01-01T01:00:00+00:00", "version": "8.4.190", "license": "AGPL-3.0", "docs": ""}
    torch.save({**metadata, **x}, wdir / name)
"""

READ_STRIPPED = """
import sys
from pathlib import Path
import torch
from ema_average.checkpoints import TorchCheckpoint
wdir = Path(sys.argv[1])
last = TorchCheckpoint(wdir / "last.pt", trust_pickle=True)
epoch = TorchCheckpoint(wdir / "epoch3.pt", trust_pickle=True)
assert last.metadata_step() is None, last.metadata_step()
assert last.final_copy == "a final copy of the weights (epoch -1: ultralytics' strip_optimizer)", last.final_copy
assert last.state_dict_key == "model" and epoch.state_dict_key == "ema"
assert sorted(last.specs()) == sorted(epoch.specs())
assert all(torch.equal(last.read(n), epoch.read(n)) for n in epoch.specs())
"""


@pytest.mark.subprocess
def test_ultralytics_stripped_final_copies_have_no_step(
    ultralytics_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    # last.pt after final_eval: the EMA as model, epoch -1. Read, with no step and said to be a final copy
    # (skipping it as a copy is discovery's part).
    weights, package, _ = ultralytics_run
    finished = tmp_path / "weights"
    shutil.copytree(weights, finished)
    result = run_with(package, ULTRALYTICS_STRIP, finished)
    assert result.returncode == 0, result.stderr
    last = TorchCheckpoint(finished / "last.pt")  # opened as a final copy: its weights not looked for yet
    assert last.final_copy is not None and last.metadata_step() is None
    with pytest.raises(
        UnsafeCheckpointError, match=r"pickled model object \(model: ultralytics\.nn\.tasks\."
    ):
        last.specs()
    result = run_with(package, READ_STRIPPED, finished)
    assert result.returncode == 0, result.stderr


@pytest.mark.subprocess
def test_a_finished_ultralytics_run_skips_its_final_copies(
    ultralytics_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    # After final_eval, last.pt and best.pt hold epoch -1 and no step: skipped with a notice (not "no training
    # step found"); the epoch files are averaged as before.
    weights, package, states = ultralytics_run
    finished = tmp_path / "weights"
    shutil.copytree(weights, finished)
    assert run_with(package, ULTRALYTICS_STRIP, finished).returncode == 0
    out = tmp_path / "ema.safetensors"
    result = run_with(package, EXE, finished, "-o", out, "--decay", "0.9", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    assert_is_reference(out, states, 0.9)
    told = " ".join((result.stdout + result.stderr).split())
    for name in ("last.pt", "best.pt"):
        assert f"{name}: a final copy of the weights (epoch -1: ultralytics' strip_optimizer)" in told
    # skipped before anything of them is unpickled fully (their code never runs), epoch files unpickled
    unpickled = [line for line in result.stderr.splitlines() if "loading with full unpickling" in line]
    assert any("epoch3.pt" in line for line in unpickled), result.stderr
    assert not any("last.pt" in line or "best.pt" in line for line in unpickled), result.stderr


@pytest.mark.subprocess
def test_a_finished_ultralytics_run_without_trust_pickle_names_an_epoch_file(
    ultralytics_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    # The refusal names a file that would be read (an epoch file), never best.pt/last.pt, which are skipped.
    weights, package, _ = ultralytics_run
    finished = tmp_path / "weights"
    shutil.copytree(weights, finished)
    assert run_with(package, ULTRALYTICS_STRIP, finished).returncode == 0
    result = run_with(package, EXE, finished, "-o", tmp_path / "ema.safetensors")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "pickled model object" in line and "epoch" in line, result.stderr
    assert "best.pt" not in line and "last.pt" not in line, result.stderr


ULTRALYTICS_PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
saved = torch.load(sys.argv[1] + "/epoch3.pt", weights_only=False)
saved["x"] = Payload()
torch.save(saved, sys.argv[1] + "/best.pt")
"""


@pytest.mark.subprocess
def test_a_best_copy_with_a_payload_is_skipped_before_it_is_unpickled(
    ultralytics_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """best.pt, a copy of epoch3.pt plus an ``os.system`` payload: with --trust-pickle it was unpickled fully
    (the payload ran) and only then skipped as a copy; without the flag the refusal named it (issue 25). A
    file whose name carries no step beside files whose names do is decided on before anything runs."""
    weights, package, states = ultralytics_run
    copy, marker = tmp_path / "weights", tmp_path / "PWNED"
    shutil.copytree(weights, copy)
    made = run_with(package, ULTRALYTICS_PAYLOAD, copy, marker)
    assert made.returncode == 0 and not marker.exists(), made.stderr
    out = tmp_path / "ema.safetensors"
    result = run_with(package, EXE, copy, "-o", out, "--decay", "0.9", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), result.stderr
    assert_is_reference(out, states, 0.9)
    told = " ".join((result.stdout + result.stderr).split())
    assert (
        f"skipped {copy / 'best.pt'}: not read: its name carries no step beside files whose names do" in told
    )
    assert "needs arbitrary unpickling (posix.system)" in told and "--glob 'best.pt'" in told
    assert not any("best.pt" in line for line in result.stderr.splitlines() if "full unpickling" in line)
    refused = run_with(package, EXE, copy, "-o", tmp_path / "never.safetensors")
    assert refused.returncode == 1 and not marker.exists(), refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "epoch" in line and "best.pt" not in line, refused.stderr  # names a file that would be read
