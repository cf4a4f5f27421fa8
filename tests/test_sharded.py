"""Averages of sharded models (FSDP2, tensor parallel, DDP), in real process groups of 2 and 3 CPU ranks.

Each test spawns its ranks (gloo); the ranks write what they computed and the test compares it, in this
process, with float64 references written out here and with one-process runs of the same training.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ema_average import (
    ExponentialMovingAverage,
    MovingAverage,
    OutputError,
    ParameterError,
    PowerFunctionMovingAverage,
    UniformMovingAverage,
)
from ema_average.engine.averages import local_part

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

STEPS = 8
DECAY = 0.9
GAMMA = 6.0
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- running ranks ------------------------------------------------------------------------------------


def spawn(world: int, fn: Callable[..., None], folder: Path, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes joined in one process group."""
    rendezvous = folder / f"rendezvous-{fn.__name__}-{world}-{len(list(folder.iterdir()))}"
    mp.spawn(_rank_main, args=(world, str(rendezvous), backend, fn, args), nprocs=world, join=True)


def _rank_main(
    rank: int, world: int, rendezvous: str, backend: str, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)  # three ranks share two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: leave without tearing gloo down. Its teardown, racing a peer's, aborts a rank now and then
    # ("terminate called without an active exception", about 1 run in 100 here) after all the work passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cpu_mesh(world: int, device: str = "cpu") -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (world,))


# --- the model, its training, and the expectations ----------------------------------------------------


def make_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Dim-0 sizes 7, 11 and 3 divide by neither 2 nor 3: FSDP2's uneven shards, one rank even empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 3)).to(dtype)


def fsdp2(model: nn.Sequential, world: int, device: str = "cpu") -> nn.Sequential:
    """FSDP2's usual wrapping: each block, then the root (which keeps the last layer's parameters)."""
    from torch.distributed.fsdp import fully_shard

    mesh = cpu_mesh(world, device)
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, dtype: torch.dtype, device: str = "cpu"
) -> None:
    """The same batch on every rank, so sharded and one-process training follow one trajectory."""
    x, y = batch(step, dtype)
    nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
    optimizer.step()
    optimizer.zero_grad()


def averages_of_every_kind(model: nn.Module | list[tuple[str, torch.Tensor]]) -> dict[str, MovingAverage]:
    return {
        "exponential": ExponentialMovingAverage(model, decay=DECAY),
        "uniform": UniformMovingAverage(model),
        "power": PowerFunctionMovingAverage(model, gamma=GAMMA),
    }


# The decay of update ``step`` with ``count`` values already averaged, written out apart from the engine.
DECAYS: dict[str, Callable[[int, int], float]] = {
    "exponential": lambda step, count: min(DECAY, (1 + step) / (10 + step)),
    "uniform": lambda step, count: count / (count + 1),
    "power": lambda step, count: 0.0 if step <= 1 else (1 - 1 / step) ** (GAMMA + 1),
}


class Float64Average:
    """One average's rule over a sequence of whole parameter values, in float64: the expectation."""

    def __init__(self, method: str, start: dict[str, torch.Tensor]) -> None:
        self.decay = DECAYS[method]
        self.count = 1
        self.shadow = {n: t.detach().double().cpu() for n, t in start.items()}

    def update(self, values: dict[str, torch.Tensor], step: int) -> None:
        d = self.decay(step, self.count)
        self.shadow = {n: d * s + (1 - d) * values[n].detach().double().cpu() for n, s in self.shadow.items()}
        self.count += 1


def one_process_reference(steps: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    """Float64 averages of every kind over the one-process training of the same model and batches."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    refs = {m: Float64Average(m, dict(model.named_parameters())) for m in DECAYS}
    for step in range(1, steps + 1):
        train_step(model, optimizer, step, torch.float32)
        for ref in refs.values():
            ref.update(dict(model.named_parameters()), step)
    return {m: ref.shadow for m, ref in refs.items()}


def gathered(average: MovingAverage) -> dict[str, torch.Tensor]:
    """Whole averages on every rank (a collective per DTensor, so every rank calls it)."""
    return {
        n: t.full_tensor() if hasattr(t, "full_tensor") else t.clone() for n, t in average.averages().items()
    }


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in actual.items():
        torch.testing.assert_close(value.double(), expected[name].double(), rtol=0, atol=atol, msg=name)


def assert_swaps_exactly(
    params: list[torch.Tensor], ema: MovingAverage, inside: Callable[[], object] = lambda: None
) -> object:
    """Inside ``average_parameters()`` each rank's parameter parts hold its averages (rounded to the
    parameters' dtype); after it they hold what they held before, bit for bit. Returns ``inside()``, run
    while the averages are swapped in."""
    before = [local_part(p).clone() for p in params]
    with ema.average_parameters(), torch.no_grad():
        for p, avg in zip(params, ema.averages().values(), strict=True):
            assert torch.equal(local_part(p), local_part(avg).to(p.dtype))
        during = inside()
    for p, old in zip(params, before, strict=True):  # bit for bit, as bytes
        assert torch.equal(local_part(p).view(torch.uint8), old.view(torch.uint8))
    return during


def save_with_reference(rank: int, out: Path, ema: MovingAverage, reference: Float64Average) -> None:
    """Every rank gathers the averages (a collective); rank 0 saves them beside the float64 reference."""
    result = {"ema": gathered(ema), "reference": reference.shadow}
    if rank == 0:
        torch.save(result, out)


def spawn_against_reference(fn: Callable[..., None], folder: Path, atol: float) -> dict[str, torch.Tensor]:
    """Run ``fn`` on 2 ranks (it ends in :func:`save_with_reference`); its averages equal the reference."""
    spawn(2, fn, folder, folder / "out.pt")
    result = torch.load(folder / "out.pt", weights_only=True)
    assert_close(result["ema"], result["reference"], atol=atol)
    return result["ema"]


# --- online averages of sharded training equal the one-process ones -----------------------------------


def _train_with_averages(rank: int, world: int, wrap: str, out: Path) -> None:
    model = make_model()
    if wrap == "fsdp2":
        model = fsdp2(model, world)
        averages = averages_of_every_kind(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
        averages = averages_of_every_kind(list(model.named_parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, step, torch.float32)
        for average in averages.values():
            average.apply(num_updates=step)
    for average in averages.values():  # each rank holds float32 averages of its own shards only
        for p, (name, avg) in zip(model.parameters(), average.averages().items(), strict=True):
            assert local_part(avg).shape == local_part(p).shape, name
            assert local_part(avg).dtype == torch.float32
    result = {m: gathered(a) for m, a in averages.items()}
    if rank == 0:
        torch.save(result, out)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("wrap", "world"), [("fsdp2", 2), ("fsdp2", 3), ("ddp", 2)])
def test_averages_of_sharded_training_equal_the_one_process_run(
    wrap: str, world: int, tmp_path: Path
) -> None:
    spawn(world, _train_with_averages, tmp_path, wrap, tmp_path / "out.pt")
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    for method, expected in one_process_reference().items():
        averaged = result[method]
        if wrap == "ddp":  # DDP's names keep the prefix its wrapper gives them
            assert all(n.startswith("module.") for n in averaged)
            averaged = {n.removeprefix("module."): t for n, t in averaged.items()}
        assert_close(averaged, expected, atol=1e-6)


def _train_bf16(rank: int, world: int, out: Path) -> None:
    model = fsdp2(make_model(torch.bfloat16), world)
    ema = ExponentialMovingAverage(model, decay=DECAY)
    ref = Float64Average("exponential", {n: p.full_tensor() for n, p in model.named_parameters()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, step, torch.bfloat16)
        ema.apply(num_updates=step)
        ref.update({n: p.full_tensor() for n, p in model.named_parameters()}, step)
    assert all(local_part(avg).dtype == torch.float32 for avg in ema.averages().values())
    assert_swaps_exactly(list(model.parameters()), ema)
    save_with_reference(rank, out, ema, ref)


@pytest.mark.multiprocess
def test_bf16_parameters_keep_float32_averages(tmp_path: Path) -> None:
    averaged = spawn_against_reference(_train_bf16, tmp_path, atol=2e-6)
    assert all(t.dtype == torch.float32 for t in averaged.values())


# --- swaps, and no collective in apply() --------------------------------------------------------------


class Ops(TorchDispatchMode):
    """Every operator dispatched while active: collectives included (``c10d``, ``_c10d_functional``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def collectives(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("c10d", "_c10d_functional", "_dtensor")}


def _swap_and_apply(rank: int, world: int, out: Path) -> None:
    from torch.distributed.tensor import DTensor

    model = fsdp2(make_model(), world)
    sharded = list(model.parameters())  # after a forward, the root module lists its gathered parameters
    ema = ExponentialMovingAverage(model, decay=DECAY)
    by_names = ExponentialMovingAverage(model.named_parameters(), decay=DECAY)  # the usual call works too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, 4):
        train_step(model, optimizer, step, torch.float32)
        with Ops() as seen:
            ema.apply(num_updates=step)
            by_names.apply(num_updates=step)
        assert not collectives(seen.names), seen.names
        assert seen.names <= {"aten._foreach_lerp_.Scalar"}, seen.names  # one multi-tensor update
    with Ops() as control:  # the check sees a collective when there is one
        sharded[0].full_tensor()
    assert collectives(control.names)

    x, _ = batch(99)
    with torch.no_grad():
        raw = model(x)  # FSDP2 keeps the root's gathered parameters after this forward
    late = ExponentialMovingAverage(model, decay=DECAY)  # given the model, it finds the shards anyway
    assert all(isinstance(a, DTensor) for a in late.averages().values())
    swapped = assert_swaps_exactly(sharded, ema, lambda: model(x))
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after, raw)
    plain = make_model()
    plain.load_state_dict(gathered(ema))
    with torch.no_grad():
        expected = plain(x)
    if rank == 0:
        torch.save({"swapped": swapped, "expected": expected, "raw": raw}, out)


@pytest.mark.multiprocess
def test_swaps_are_exact_and_apply_runs_no_collective(tmp_path: Path) -> None:
    spawn(2, _swap_and_apply, tmp_path, tmp_path / "out.pt")
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(result["swapped"], result["expected"], rtol=0, atol=1e-6)
    assert not torch.allclose(result["swapped"], result["raw"])


# --- tensor parallel placements, mixed with a plain tensor ---------------------------------------------


def tp_values(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return {
        "col.weight": torch.randn(6, 7, generator=g),
        "rep.bias": torch.randn(7, generator=g),
        "plain.scale": torch.randn(3, generator=g),
    }


def _tensor_parallel(rank: int, world: int, out: Path) -> None:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = cpu_mesh(world)
    placements = {"col.weight": [Shard(1)], "rep.bias": [Replicate()]}
    start = tp_values(0)
    params = {
        n: nn.Parameter(distribute_tensor(t, mesh, placements[n]) if n in placements else t.clone())
        for n, t in start.items()
    }
    ema = ExponentialMovingAverage(params, decay=DECAY)
    ref = Float64Average("exponential", start)
    for step in range(1, 6):
        values = tp_values(step)
        with torch.no_grad():
            for n, p in params.items():
                whole = values[n]
                if n in placements:
                    whole = distribute_tensor(whole, mesh, placements[n], src_data_rank=None)
                local_part(p).copy_(local_part(whole))
        ema.apply(num_updates=step)
        ref.update(values, step)
    state = ema.state_dict()
    for n, avg in state["averages"].items():
        assert isinstance(avg, DTensor) == (n in placements)
        if n in placements:
            assert list(avg.placements) == placements[n] and avg.device_mesh == mesh
    assert_swaps_exactly(list(params.values()), ema)

    # Whole tensors load as well: each rank copies its own part.
    fresh = ExponentialMovingAverage(params, decay=DECAY)
    fresh.load_state_dict({**state, "averages": gathered(ema)})
    assert all(
        torch.equal(local_part(a), local_part(b))
        for a, b in zip(fresh.averages().values(), ema.averages().values(), strict=True)
    )

    partial = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    with pytest.raises(ParameterError, match="partial DTensor"):
        ExponentialMovingAverage({"pending": partial})
    save_with_reference(rank, out, ema, ref)


@pytest.mark.multiprocess
def test_tensor_parallel_placements_and_plain_tensors_mix(tmp_path: Path) -> None:
    spawn_against_reference(_tensor_parallel, tmp_path, atol=1e-6)


# --- distributed checkpoints saved at one world size, loaded at another --------------------------------

SAVED_STEPS, TOTAL_STEPS = 4, 8
RESHARDED = ("exponential", "uniform")  # uniform needs its count of values back, not only the averages


def set_values(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Give the (possibly sharded) parameters whole values drawn for ``step``; return those values."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(1000 + step)
    values = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            values[name] = torch.randn(p.shape, generator=g)
            whole = values[name]
            if hasattr(p, "device_mesh"):
                whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
            local_part(p).copy_(local_part(whole))
    return values


def _save_midway(rank: int, world: int, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = fsdp2(make_model(), world)
    set_values(model, 0)
    averages = {m: averages_of_every_kind(model)[m] for m in RESHARDED}
    for step in range(1, SAVED_STEPS + 1):
        set_values(model, step)
        for average in averages.values():
            average.apply(num_updates=step)
    dcp.save({m: a.state_dict() for m, a in averages.items()}, checkpoint_id=folder)


def continue_from(folder: Path, model: nn.Module, out: Path | None, no_dist: bool = False) -> None:
    """Load the averages saved midway into averages of ``model`` and finish the run."""
    import torch.distributed.checkpoint as dcp

    set_values(model, 100)  # nothing of this start may survive the load
    averages = {m: averages_of_every_kind(model)[m] for m in RESHARDED}
    state = {m: a.state_dict() for m, a in averages.items()}
    dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
    for method, average in averages.items():
        average.load_state_dict(state[method])
        assert average.num_applied == SAVED_STEPS
    for step in range(SAVED_STEPS + 1, TOTAL_STEPS + 1):
        set_values(model, step)
        for average in averages.values():
            average.apply(num_updates=step)
    result = {m: gathered(a) for m, a in averages.items()}
    if out is not None:
        torch.save(result, out)


def _load_and_continue(rank: int, world: int, folder: Path, out: Path) -> None:
    continue_from(folder, fsdp2(make_model(), world), out if rank == 0 else None)


def uninterrupted() -> dict[str, dict[str, torch.Tensor]]:
    """The same run in one process without a break: the library's averages and float64 references."""
    model = make_model()
    start = set_values(model, 0)
    averages = {m: averages_of_every_kind(model)[m] for m in RESHARDED}
    refs = {m: Float64Average(m, start) for m in RESHARDED}
    for step in range(1, TOTAL_STEPS + 1):
        values = set_values(model, step)
        for m in RESHARDED:
            averages[m].apply(num_updates=step)
            refs[m].update(values, step)
    return {m: {"engine": gathered(averages[m]), "float64": refs[m].shadow} for m in RESHARDED}


@pytest.fixture(scope="module")
def saved_midway(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """A DCP folder of averages saved at step 4 of a run at a world size (each made once)."""
    made: dict[int, Path] = {}

    def at(world: int) -> Path:
        if world not in made:
            folder = tmp_path_factory.mktemp(f"saved-at-{world}")
            spawn(world, _save_midway, folder, folder / "dcp")
            made[world] = folder / "dcp"
        return made[world]

    return at


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on loading in one process
@pytest.mark.parametrize(("saved", "loaded"), [(2, 3), (3, 2), (2, 1)])
def test_checkpoint_reshards_to_another_world_size(
    saved: int, loaded: int, saved_midway: Callable[[int], Path], tmp_path: Path
) -> None:
    folder = saved_midway(saved)
    out = tmp_path / "out.pt"
    if loaded == 1:  # here, without any process group: DCP reads the shards into plain tensors
        continue_from(folder, make_model(), out, no_dist=True)
    else:
        spawn(loaded, _load_and_continue, tmp_path, folder, out)
    result = torch.load(out, weights_only=True)
    for method, expected in uninterrupted().items():
        assert_close(result[method], expected["engine"], atol=1e-6)
        assert_close(result[method], expected["float64"], atol=1e-6)


# --- one safetensors file from a sharded run ------------------------------------------------------------


def _export(rank: int, world: int, path: Path) -> None:
    from ema_average.online.sharded_export import save_safetensors

    model = fsdp2(make_model(), world)
    ema = ExponentialMovingAverage(model, decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, step, torch.float32)
        ema.apply(num_updates=step)
    assert save_safetensors(ema, path, step=STEPS) == path
    with pytest.raises(OutputError, match="already exists"):  # every rank hears of rank 0's failure
        save_safetensors(ema, path, step=STEPS)


@pytest.mark.multiprocess
def test_safetensors_export_equals_the_one_process_average(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ema_average.offline.plan import AverageSettings
    from ema_average.offline.resume import open_resumed

    path = tmp_path / "ema.safetensors"
    spawn(3, _export, tmp_path, path)
    written = load_file(path)
    assert all(t.dtype == torch.float32 for t in written.values())
    assert_close(written, one_process_reference()["exponential"], atol=1e-6)
    with safe_open(path, "pt") as f:
        assert f.metadata()["last_step"] == str(STEPS)
    # The offline command can continue it: same settings, the gap-aware schedule, the last step.
    resumed = open_resumed(path, AverageSettings(method="exponential", decay=DECAY, schedule="step"))
    assert resumed.progress.last_step == STEPS
    resumed.average.close()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == ["ema.safetensors"]


@pytest.mark.subprocess
def test_offline_command_resumes_an_exported_average(tmp_path: Path) -> None:
    """Checkpoints after the export, each holding the weights of the steps since the last: the offline
    gap-aware continuation then equals the online average applied at every one of those steps."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from ema_average.online.sharded_export import save_safetensors

    model = make_model()
    ema = ExponentialMovingAverage(model, decay=DECAY)
    for step in range(1, 21):
        set_values(model, step)
        ema.apply(num_updates=step)
    save_safetensors(ema, tmp_path / "ema.safetensors", step=20)  # one process: no group needed
    (tmp_path / "run").mkdir()
    for checkpoint in (30, 40):
        values = set_values(model, checkpoint)
        save_file(
            values, tmp_path / "run" / f"step_{checkpoint}.safetensors", metadata={"step": str(checkpoint)}
        )
        for step in range(checkpoint - 9, checkpoint + 1):
            ema.apply(num_updates=step)
    command = [str(Path(sys.executable).parent / "ema-average"), str(tmp_path / "run"), "-q"]
    command += ["--resume", str(tmp_path / "ema.safetensors"), "--decay", str(DECAY), "--schedule", "step"]
    done = subprocess.run([*command, "-o", str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_close(load_file(tmp_path / "out.safetensors"), ema.averages(), atol=1e-6)


def test_export_metadata_of_the_uniform_average_counts_its_values() -> None:
    from ema_average.online.sharded_export import resume_metadata

    average = UniformMovingAverage({"w": torch.zeros(2)})
    for _ in range(3):
        average.apply()
    metadata = resume_metadata(average, step=10)
    assert metadata["schedule"] == "checkpoint" and metadata["steps"] == "[10]"
    assert metadata["values"] == "4"  # the first value and three applies


def test_a_long_uniform_export_stays_small_and_resumes_with_its_count(tmp_path: Path) -> None:
    # 3000 values: one entry per value in the header (as before) would grow it without bound, past
    # safetensors' 100 MB limit at a few million; the count is one number.
    import dataclasses

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ema_average.offline.options import RunOptions
    from ema_average.offline.plan import AverageSettings
    from ema_average.offline.run import average_checkpoints
    from ema_average.online.sharded_export import save_safetensors

    values = torch.randn(3003, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = {"w": torch.nn.Parameter(values[0].float())}
    average = UniformMovingAverage(weights)
    for step in range(1, 3000):
        weights["w"].data.copy_(values[step])
        average.apply()
    save_safetensors(average, tmp_path / "swa.safetensors", step=2999)
    assert (tmp_path / "swa.safetensors").stat().st_size < 2000
    (tmp_path / "run").mkdir()
    for step in (3000, 3001, 3002):
        save_file({"w": values[step].float()}, tmp_path / "run" / f"step_{step}.safetensors")
    settings = AverageSettings(method="uniform")
    options = RunOptions(tmp_path / "run", tmp_path / "out.safetensors", settings=settings)
    average_checkpoints(dataclasses.replace(options, resume=tmp_path / "swa.safetensors"))
    expected = values.float().double().mean(dim=0)  # the float64 mean of every value, the saved ones as saved
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["w"].double(), expected)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert (f.metadata()["values"], f.metadata()["last_step"]) == ("3003", "3002")


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float16, "65504"), (torch.bfloat16, "3.38953e+38")])
def test_export_refuses_finite_averages_the_dtype_cannot_hold(
    tmp_path: Path, dtype: torch.dtype, limit: str
) -> None:
    """The issue's averages [1, 7e4, -1e5, 3.4e38] became [1, inf, -inf, inf] in float16 (3.4e38 in bf16 too):
    what would be written is checked after its rounding, and refused naming the tensor and the dtype."""
    from safetensors.torch import load_file

    from ema_average import OutputRangeError
    from ema_average.online.sharded_export import save_safetensors

    big = {"ok": torch.tensor([1.0, -2.5]), "big": torch.tensor([1.0, 7e4, -1e5, 3.4e38])}
    average = ExponentialMovingAverage({n: nn.Parameter(t) for n, t in big.items()}, decay=DECAY)
    path = tmp_path / "ema.safetensors"
    name = str(dtype).removeprefix("torch.")
    expected = f"tensor 'big' averages to 3.4e+38, beyond what {name} holds ({limit})"
    with pytest.raises(OutputRangeError, match=re.escape(expected)):
        save_safetensors(average, path, step=1, dtype=dtype)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left

    # At the edge: 65519 rounds down to float16's 65504 and is written; Inf or NaN already in the average
    # are the average's own values (kept, as float32 would keep them), not an overflow of the dtype.
    edge = {"edge": torch.tensor([65519.0, -65519.0]), "inf": torch.tensor([float("inf"), float("nan")])}
    fits = ExponentialMovingAverage({n: nn.Parameter(t) for n, t in edge.items()}, decay=DECAY)
    save_safetensors(fits, path, step=1, dtype=torch.float16)
    written = load_file(path)
    assert written["edge"].tolist() == [65504.0, -65504.0]
    assert written["inf"][0].item() == float("inf") and written["inf"][1].isnan()


@pytest.mark.parametrize(
    ("dtype", "limit", "as_"), [(torch.float8_e4m3fn, "448", "448"), (torch.float8_e5m2, "57344", "Inf")]
)
def test_export_writes_float8_and_refuses_what_it_cannot_hold(
    tmp_path: Path, dtype: torch.dtype, limit: str, as_: str
) -> None:
    """save_safetensors(dtype=float8) failed with "aminmax_cpu not implemented for Float8_e4m3fn" (issue 24);
    float8_e4m3fn saturates (1e5 would be written as 448), so the range is checked before the rounding."""
    from safetensors.torch import load_file

    from ema_average import OutputRangeError
    from ema_average.online.sharded_export import save_safetensors

    values = torch.randn(200, generator=torch.Generator().manual_seed(24), dtype=torch.float64) * 100
    average = ExponentialMovingAverage({"w": nn.Parameter(values.float())}, decay=DECAY)
    save_safetensors(average, tmp_path / "ema.safetensors", step=1, dtype=dtype)
    written = load_file(tmp_path / "ema.safetensors")["w"]
    assert written.dtype == dtype and torch.equal(
        written.view(torch.uint8), values.to(dtype).view(torch.uint8)
    )

    big = ExponentialMovingAverage({"w": nn.Parameter(torch.tensor([1.0, -1e5]))}, decay=DECAY)
    name = str(dtype).removeprefix("torch.")
    expected = (
        f"tensor 'w' averages to 1e+05, beyond what {name} holds ({limit}): it would be written as {as_}"
    )
    with pytest.raises(OutputRangeError, match=re.escape(expected)):
        save_safetensors(big, tmp_path / "big.safetensors", step=1, dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors"]


# --- averages in host memory of CUDA values ---------------------------------------------------------------


@CUDA
def test_host_kept_averages_of_cuda_values_update_in_the_background() -> None:
    g = torch.Generator().manual_seed(0)
    params = {n: nn.Parameter(torch.randn(s, generator=g).cuda()) for n, s in (("a", (300, 70)), ("b", (5,)))}
    ema = ExponentialMovingAverage(params, decay=DECAY, device="cpu")
    ref = Float64Average("exponential", params)
    for step in range(1, 6):
        with torch.no_grad():  # ordered after the copy apply() queued: the stream waits for it
            for p in params.values():
                p.mul_(1.1).add_(0.1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ema.apply(num_updates=step)  # queues a copy into pinned memory and returns
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.update(params, step)
    averages = ema.averages()  # waits for the background update
    assert all(t.device.type == "cpu" for t in averages.values())
    assert_close(averages, ref.shadow, atol=2e-6)


def _host_kept_shards(rank: int, world: int, path: Path) -> None:
    from ema_average.online.sharded_export import save_safetensors

    model = fsdp2(make_model().cuda(), world, device="cuda")
    ema = ExponentialMovingAverage(model, decay=DECAY, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, step, torch.float32, device="cuda")
        ema.apply(num_updates=step)
    for average in ema.state_dict()["averages"].values():  # still in host memory, on the CUDA mesh
        assert local_part(average).device.type == "cpu" and average.device_mesh.device_type == "cuda"
    save_safetensors(ema, path, step=STEPS)


@pytest.mark.multiprocess
@CUDA
def test_host_kept_averages_of_cuda_shards_save_and_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spawn(
        torch.cuda.device_count(), _host_kept_shards, tmp_path, tmp_path / "ema.safetensors", backend="nccl"
    )
    assert_close(load_file(tmp_path / "ema.safetensors"), one_process_reference()["exponential"], atol=1e-5)


@pytest.mark.subprocess
def test_the_plain_engine_does_not_import_dtensor() -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch; from ema_average import ExponentialMovingAverage as E;"
        "e = E({'w': torch.nn.Parameter(torch.zeros(3))}); e.apply(); e.state_dict();"
        "print('torch.distributed.tensor' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
