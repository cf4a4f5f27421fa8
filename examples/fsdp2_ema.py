"""Train a small model sharded by FSDP2 over 2 CPU processes, with an EMA of its weights, and export the EMA.

    torchrun --nproc-per-node 2 examples/fsdp2_ema.py [--steps 300] [--out fsdp2-ema.safetensors]
    python examples/fsdp2_ema.py [...]          # starts its 2 processes itself

Each rank keeps float32 averages of its own shards and updates them with no communication. Evaluation
swaps the averages into the shards; the export gathers them one tensor at a time into one ordinary
safetensors file (written by rank 0) that the offline command can ``--resume``.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from tiny_regression import make_data, make_model, test_loss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ema_average import ExponentialMovingAverage
from ema_average.online.sharded_export import save_safetensors


def main(steps: int, out: str, decay: float = 0.99) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: it keeps the last layer
    ema = ExponentialMovingAverage(model, decay=decay)  # the model itself, so swaps reshard FSDP2's root
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        x, y = make_data(32, seed=100 + step * world + rank)  # each rank its own batch
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.apply(num_updates=step)  # this rank's shards only: no collective
    raw = test_loss(model)  # every rank runs the forward: FSDP2 gathers each layer as it goes
    with ema.average_parameters():
        averaged = test_loss(model)
    save_safetensors(ema, out, step=steps, overwrite=True)  # every rank: the gathers are collectives
    if rank == 0:
        print(f"test loss of the trained model {raw:.4f}")
        print(f"test loss of its EMA           {averaged:.4f}")
        print(f"EMA written to {out}")


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        main(args.steps, args.out)
        dist.barrier()  # leave together: a rank that tears gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="fsdp2-ema.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # started by torchrun
        _spawned(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        torch.multiprocessing.spawn(_spawned, args=(2, args), nprocs=2)
