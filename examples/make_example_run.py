"""Train the tiny model and save a checkpoint every N steps, as a training run would.

    python examples/make_example_run.py RUN_DIR [--steps 2000] [--every 100] [--format safetensors|pt]
        [--posthoc-every N]

safetensors files carry their step in the header metadata; .pt files are {"model": ..., "step": ...}.
--posthoc-every N also keeps power EMAs of sigma_rel 0.05 and 0.10 and snapshots them every N steps into
RUN_DIR/posthoc-ema/, for post-hoc EMA (docs/posthoc-ema.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_regression import make_model, train_step


def main(
    run_dir: Path, steps: int = 2000, every: int = 100, fmt: str = "safetensors", posthoc_every: int = 0
) -> list[Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snapshots = None
    if posthoc_every:
        from ema_average.online.posthoc_training import DEFAULT_FOLDER, PowerEmaSnapshots

        snapshots = PowerEmaSnapshots(model, every=posthoc_every, folder=run_dir / DEFAULT_FOLDER)
    saved = []
    for step in range(1, steps + 1):
        train_step(model, optimizer, step)
        if snapshots is not None:
            snapshots.update(step)
        if step % every == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            path = run_dir / f"step_{step:06d}.{fmt}"
            if fmt == "safetensors":
                save_file(state, str(path), metadata={"step": str(step)})
            else:
                torch.save({"model": state, "step": step}, path)
            saved.append(path)
    return saved


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    parser.add_argument("--posthoc-every", type=int, default=0)
    args = parser.parse_args()
    files = main(args.run_dir, args.steps, args.every, args.format, args.posthoc_every)
    print(f"saved {len(files)} checkpoints in {args.run_dir}")
