"""The offline command under real ``torchrun`` launches (CPU, gloo): one file, the one-process bytes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from torchrun_wrapper import KILL_AFTER_COMMIT, KILL_AFTER_FIRST_CHUNK

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
    ),
    pytest.mark.multiprocess,
    pytest.mark.subprocess,
]

STEPS = [10, 20, 40]
EXE = [sys.executable, "-m", "ema_average"]
# What torchrun starts for a test that loses a rank: the command with that rank's kill hook installed.
WRAPPER = Path(__file__).with_name("torchrun_wrapper.py")


def write_run(folder: Path, steps: list[int] = STEPS) -> None:
    """Checkpoints big enough for several 1M-element chunks (so every rank gets a share), of every kind:
    float32 and bfloat16 averaged, int64 copied."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        state = {
            "blocks.0.weight": torch.randn(1500, 1000, generator=g),
            "blocks.1.weight": torch.randn(1200, 1000, generator=g).bfloat16(),
            "blocks.1.bias": torch.randn(1000, generator=g),
            "head.weight": torch.randn(2_300_000, generator=g),
            "count": torch.tensor([step]),
        }
        save_file(state, str(folder / f"model_step_{step}.safetensors"), metadata={"step": str(step)})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    write_run(run)
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A copy of the module's run to change freely."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def one_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=120)


def torchrun(
    nproc: int, *args: str | Path, kill: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``ema_average`` under torchrun; with ``kill`` (a hook's variable and its rank), the test wrapper."""
    program = [str(WRAPPER)] if kill else ["-m", "ema_average"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        *program, *map(str, args),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(kill or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


LOST_PEER = [
    "ema-average: error: another rank stopped (killed, or its host lost) before the ranks agreed; see "
    "torchrun's report"
]
INTERRUPTED = ["ema-average: interrupted; no output written"]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ema-average: error:")]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_share_is_contiguous_byte_balanced_and_complete() -> None:
    from ema_average.offline.plan import Chunk, Piece
    from ema_average.offline.torchrun import share

    sizes = [5, 1, 1, 1, 8, 2, 2, 3, 1, 1]
    chunks = [
        Chunk((Piece(f"t{i}", (f"t{i}",), 0, n, 0),), torch.float32, torch.float32, torch.float32, True)
        for i, n in enumerate(sizes)
    ]
    for world in (1, 2, 3, 4, 12):
        parts = [share(chunks, 2, rank, world) for rank in range(world)]
        assert [c for part in parts for c in part] == chunks  # every chunk once, in order: contiguous
        loads = [sum(c.numel for c in part) for part in parts]
        assert max(loads) - min(loads) <= max(sizes)


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_write_the_bytes_of_one_process(run: Path, tmp_path: Path, nproc: int) -> None:
    alone = one_process(run, "-o", tmp_path / "alone.safetensors", "--decay", "0.9", "-q")
    assert alone.returncode == 0, alone.stderr
    result = torchrun(nproc, run, "-o", tmp_path / "ranks.safetensors", "--decay", "0.9")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ranks.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()
    assert result.stdout.count("3 checkpoints in") == 1  # the plan once, by rank 0
    assert result.stdout.count("wrote ") == 1  # summary once, by rank 0
    assert f"split over {nproc} ranks" in result.stdout
    assert names(tmp_path) == ["alone.safetensors", "ranks.safetensors", "run"]  # no temporary left


def test_several_averages_in_one_launch(run: Path, tmp_path: Path) -> None:
    alone = one_process(run, "-o", tmp_path / "alone.safetensors", "--decay", "0.9,0.99", "-q")
    assert alone.returncode == 0, alone.stderr
    result = torchrun(2, run, "-o", tmp_path / "ranks.safetensors", "--decay", "0.9,0.99", "-q")
    assert result.returncode == 0, result.stderr
    for label in ("decay0.9", "decay0.99"):
        ranks = (tmp_path / f"ranks-{label}.safetensors").read_bytes()
        assert ranks == (tmp_path / f"alone-{label}.safetensors").read_bytes()


def test_resume_under_torchrun(run: Path, tmp_path: Path) -> None:
    first = one_process(run, "--to-step", "20", "-o", tmp_path / "alone.safetensors", "--decay", "0.9", "-q")
    assert first.returncode == 0, first.stderr
    shutil.copy(tmp_path / "alone.safetensors", tmp_path / "ranks.safetensors")
    alone = one_process(run, "--resume", tmp_path / "alone.safetensors", "--decay", "0.9", "-q")
    assert alone.returncode == 0, alone.stderr
    result = torchrun(2, run, "--resume", tmp_path / "ranks.safetensors", "--decay", "0.9", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ranks.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()


def test_a_damaged_checkpoint_fails_every_rank_before_writing(run: Path, tmp_path: Path) -> None:
    damaged = run / "model_step_20.safetensors"
    os.truncate(damaged, damaged.stat().st_size - 1000)  # its header claims bytes the file lacks
    result = torchrun(2, run, "-o", tmp_path / "out.safetensors", "-q")
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert "model_step_20.safetensors" in line
    assert result.stderr.count("exitcode  : 1") == 2  # every rank exits 1
    assert names(tmp_path) == ["run"]


def test_a_failure_while_reading_on_rank_1_reaches_rank_0(run: Path, tmp_path: Path) -> None:
    """NaN in a tensor only rank 1 reads: found while streaming; rank 0 prints rank 1's message."""
    bad = run / "model_step_40.safetensors"
    state = {**_load(bad), "head.weight": _load(bad)["head.weight"].clone()}
    state["head.weight"][-5] = float("nan")
    save_file(state, str(bad), metadata={"step": "40"})
    assert _reader_of("head.weight", -5, run, tmp_path / "out.safetensors") == 1
    result = torchrun(2, run, "-o", tmp_path / "out.safetensors", "-q")
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert "model_step_40.safetensors" in line and "head.weight" in line and "NaN" in line
    assert result.stderr.count("exitcode  : 1") == 2  # each rank exits 1 on its own, none killed
    assert names(tmp_path) == ["run"]


def test_a_rank_killed_midway_leaves_nothing(run: Path, tmp_path: Path) -> None:
    result = torchrun(2, run, "-o", tmp_path / "out.safetensors", "-q", kill={KILL_AFTER_FIRST_CHUNK: "1"})
    assert result.returncode != 0
    assert "exitcode  : -9" in result.stderr  # torchrun reports rank 1 killed: the kill happened
    # Rank 0 says one of two things: the collective that lost its peer failed, or torchrun's SIGTERM
    # (sent once it saw rank 1 die) reached it first.
    ours = [line for line in result.stderr.splitlines() if line.startswith("ema-average:")]
    assert ours in (LOST_PEER, INTERRUPTED), result.stderr
    assert names(tmp_path) == ["run"]  # rank 0 removed its temporary on the way out


def test_rank_0_killed_leaves_no_output_and_the_next_run_clears_its_temporary(
    run: Path, tmp_path: Path
) -> None:
    result = torchrun(2, run, "-o", tmp_path / "out.safetensors", "-q", kill={KILL_AFTER_FIRST_CHUNK: "0"})
    assert result.returncode != 0
    assert not (tmp_path / "out.safetensors").exists()
    left = [name for name in names(tmp_path) if name != "run"]
    # hidden, if any: the temporary, and the output's lock file (free once its holder died)
    hidden = re.compile(r"\.out\.safetensors\.ema-average(-\d+\.tmp|-u\d+\.lock)")
    assert all(hidden.fullmatch(name) for name in left), left
    again = torchrun(2, run, "-o", tmp_path / "out.safetensors", "-q")
    assert again.returncode == 0, again.stderr
    assert names(tmp_path) == ["out.safetensors", "run"]


def test_a_peer_lost_after_the_commit_leaves_the_output_whole_and_rank_0_silent(
    run: Path, tmp_path: Path
) -> None:
    # Rank 1 dies once rank 0 has named the output, before the ranks agreed it was: the output is whole
    # (every share was agreed written before), so rank 0 neither fails (it used to exit 1 with "another
    # rank stopped") nor says "no output written" (when torchrun's SIGTERM reaches it first).
    alone = one_process(run, "-o", tmp_path / "alone.safetensors", "-q")
    assert alone.returncode == 0, alone.stderr
    result = torchrun(2, run, "-o", tmp_path / "out.safetensors", kill={KILL_AFTER_COMMIT: "1"})
    assert result.returncode != 0  # torchrun reports the rank it lost
    assert "no output written" not in result.stderr
    assert error_lines(result) == [], result.stderr
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()
    assert names(tmp_path) == ["alone.safetensors", "out.safetensors", "run"]


def test_what_one_file_from_several_ranks_cannot_do_is_refused_in_one_line(run: Path, tmp_path: Path) -> None:
    watch = torchrun(2, run, "-o", tmp_path / "out.safetensors", "--watch")
    (line,) = error_lines(watch)
    assert "--watch runs in one process" in line
    folder = torchrun(2, run, "-o", tmp_path / "out", "--max-shard-size", "10MB")
    (line,) = error_lines(folder)
    assert "--max-shard-size is not supported under torchrun" in line
    assert names(tmp_path) == ["run"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _reader_of(name: str, index: int, run: Path, output: Path) -> int:
    """The rank of a 2-rank launch whose share holds element ``index`` of tensor ``name``."""
    from ema_average.offline.options import RunOptions
    from ema_average.offline.run import prepare
    from ema_average.offline.torchrun import share

    prepared = prepare(RunOptions(run, output), dry_run=True)
    numel = next(t.spec.numel for t in prepared.plan.outputs if t.input_name == name)
    element = index % numel
    for rank in range(2):
        for chunk in share(prepared.plan.chunks, len(prepared.sources), rank, 2):
            for piece in chunk.pieces:
                if piece.input_name == name and piece.start <= element < piece.start + piece.count:
                    return rank
    raise AssertionError(f"{name}[{index}] is in no chunk")


def test_writers_share_one_file_across_processes(tmp_path: Path) -> None:
    """The writer side of the protocol, in one process: a shared file, a joined writer for half of it."""
    from safetensors.torch import load_file

    from ema_average.checkpoints.safetensors_format import TensorSpec
    from ema_average.errors import OutputError
    from ema_average.output import SafetensorsWriter, TensorEntry, temp_name

    values = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 2, dtype=torch.bfloat16)}
    entries = [TensorEntry(name, TensorSpec(tuple(v.shape), v.dtype)) for name, v in values.items()]
    path = tmp_path / "out.safetensors"
    lead = SafetensorsWriter(path, entries, {"k": "v"}, overwrite=False, shared=True)
    assert lead.temp_path == temp_name(path, os.getpid()) and lead.temp_path.exists()
    with pytest.raises(OutputError, match="is not the file this process would write"):
        SafetensorsWriter(path, entries, {"k": "other"}, overwrite=False, join=lead.temp_path)
    other = SafetensorsWriter(path, entries, {"k": "v"}, overwrite=False, join=lead.temp_path)
    with pytest.raises(OutputError, match="only the process that made the shared file commits it"):
        other.commit()
    lead.write_range("a", 0, values["a"][:4])
    other.write_range("a", 4, values["a"][4:])
    other.write("b", values["b"])
    other.flush()
    other.abort()  # closed already: leaves the shared file alone
    assert lead.temp_path.exists()
    lead.flush()
    lead.written_elsewhere()
    lead.commit()
    assert names(tmp_path) == ["out.safetensors"]
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[name], value) for name, value in values.items())


def test_progress_counts_every_rank_and_stops_once_one_failed() -> None:
    """Through the store alone (no collective): rank 0 reports every rank's bytes; a failure stops all."""
    from ema_average.offline import torchrun as distributed

    store = dist.HashStore()
    lead, other = (distributed.Ranks(r, 2, r, 2, str, store) for r in (0, 1))
    shown: list[int] = []
    mine = distributed._SharedProgress(lead, shown.append)
    theirs = distributed._SharedProgress(other, pytest.fail)  # only rank 0 reports
    theirs(300)
    theirs.publish()
    mine(100)
    mine.publish()
    assert sum(shown) == 400
    store.set(distributed._FAILED, "1")
    with pytest.raises(distributed._Stopped):
        theirs.publish()
