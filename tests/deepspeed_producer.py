"""Real DeepSpeed checkpoints on CPU: one process per data-parallel rank, gloo, every ZeRO stage.

Run by conftest as ``python deepspeed_producer.py OUT WORLD RANK PORT STAGE:DTYPE...``; each variant trains a
tiny model (tied embedding and head, a frozen layer, float and integer buffers, odd sizes so that ZeRO pads)
for 6 steps and saves at steps 2, 4 and 6 into ``OUT/zSTAGE-DTYPE-wWORLD/``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.inp = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.frozen = torch.nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.out = torch.nn.Linear(7, 5)
        self.head = torch.nn.Linear(5, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.full((11,), 0.5))
        self.register_buffer("count", torch.tensor(7))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.out(self.frozen(self.norm(self.inp(self.embed(ids)))))
        return self.head(h) * self.scale.to(h.dtype)


def train(out: str, stage: int, dtype: str, world: int) -> None:
    import deepspeed

    torch.manual_seed(0)
    model = Tiny()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    for step in range(1, 7):
        loss = engine(torch.randint(0, 11, (4,), generator=g)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if step % 2 == 0:
            engine.save_checkpoint(f"{out}/z{stage}-{dtype}-w{world}")


def main() -> None:
    out, world, rank, port, *variants = sys.argv[1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world)
    os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.simplefilter("ignore")
    import deepspeed
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None  # a CPU all-reduce kernel built with ninja: not needed
    deepspeed.init_distributed(dist_backend="gloo")
    for variant in variants:
        stage, dtype = variant.split(":")
        train(out, int(stage), dtype, int(world))


if __name__ == "__main__":
    main()
