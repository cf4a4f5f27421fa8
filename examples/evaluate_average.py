"""Compare the last checkpoint of a run with the average ema-average wrote.

python examples/evaluate_average.py RUN_DIR AVERAGE.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file
from tiny_regression import make_model, test_loss


def main(run_dir: Path, average: Path) -> dict[str, float]:
    model = make_model()
    last = max(run_dir.glob("*.safetensors"))
    model.load_state_dict(load_file(str(last)))
    last_loss = test_loss(model)
    model.load_state_dict(load_file(str(average)))
    return {"last": last_loss, "average": test_loss(model)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("average", type=Path)
    args = parser.parse_args()
    losses = main(args.run_dir, args.average)
    print(f"test loss of the last checkpoint {losses['last']:.4f}")
    print(f"test loss of the average         {losses['average']:.4f}")
