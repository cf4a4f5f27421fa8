"""How close does an offline average of saved checkpoints come to the EMA an online run kept?

    python examples/offline_vs_online.py [--steps 3000] [--decay 0.998] [--every 10 100 500]

Trains the tiny model for --steps steps with the online ExponentialMovingAverage (decay, num_updates=step),
saving a checkpoint every K steps; then averages the checkpoints offline three ways and prints each one's
relative distance to the online EMA, ||offline - online|| / ||online||, for each K.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from make_example_run import main as make_run
from safetensors.torch import load_file
from tiny_regression import make_model, train_step

from ema_average import ExponentialMovingAverage
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings
from ema_average.offline.run import average_checkpoints


def online_ema(steps: int, decay: float) -> dict[str, torch.Tensor]:
    """The same training as make_example_run, with the EMA kept online at every step."""
    model = make_model()
    ema = ExponentialMovingAverage(model.named_parameters(), decay=decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, steps + 1):
        train_step(model, optimizer, step)
        ema.apply(num_updates=step)
    return {name: t.detach().clone() for name, t in ema.averages().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(a[n].double() - b[n].double()).flatten() for n in b])
    ref = torch.cat([b[n].double().flatten() for n in b])
    return float(diff.norm() / ref.norm())


def main(
    steps: int = 3000, decay: float = 0.998, everies: tuple[int, ...] = (10, 100, 500)
) -> dict[int, dict[str, float]]:
    online = online_ema(steps, decay)
    methods = {
        "checkpoint schedule": AverageSettings(decay=decay, schedule="checkpoint"),
        "step schedule": AverageSettings(decay=decay, schedule="step"),
        "uniform": AverageSettings(method="uniform"),
    }
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for every in everies:
            run = Path(tmp) / f"every-{every}"
            make_run(run, steps, every)
            results[every] = {}
            for label, settings in methods.items():
                out = Path(tmp) / f"every-{every}-{label.replace(' ', '-')}.safetensors"
                average_checkpoints(RunOptions(run, out, settings=settings, dtype="float32"))
                results[every][label] = distance(load_file(str(out)), online)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--decay", type=float, default=0.998)
    parser.add_argument("--every", type=int, nargs="+", default=[10, 100, 500])
    args = parser.parse_args()
    results = main(args.steps, args.decay, tuple(args.every))
    labels = list(next(iter(results.values())))
    print(f"relative distance to the online EMA (decay {args.decay}, {args.steps} steps)")
    print(f"{'checkpoint every':>16}  " + "  ".join(f"{label:>19}" for label in labels))
    for every, row in results.items():
        print(f"{every:>16}  " + "  ".join(f"{row[label]:>19.2e}" for label in labels))
