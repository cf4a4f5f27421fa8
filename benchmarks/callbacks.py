"""What the EMA callbacks cost per training step, against the same loop without them.

Prints a table: median milliseconds per optimizer step of a plain torch loop, of Lightning's ``Trainer`` and of
the Hugging Face ``Trainer``, each without an EMA, with one and with two (``ExponentialMovingAverage.apply`` per
average in the torch loop, ``EMACallback(decay=[0.999, 0.9999])`` in the trainers), and with one EMA plus post-hoc
snapshots (``PowerEmaSnapshots`` of EDM2's two profiles in the torch loop, ``EMACallback(posthoc_every=N)`` in the
trainers: two power EMAs updated every step, two files written every N), the differences and ratios. Each trainer's time is measured from its
own train-start to train-end hooks (set-up excluded), runs interleaved so that machine noise hits both alike.

    python benchmarks/callbacks.py [--width 256] [--steps 200] [--repeats 5] [--device cpu] [--threads 1]
                                   [--posthoc-every 50]

One CPU thread by default: a tiny model's step is dominated by thread hand-offs otherwise, and on a shared
machine by the other processes' load.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ema_average import ExponentialMovingAverage, PowerEmaSnapshots

DECAYS = [0.999, 0.9999]  # the first n of them: one EMA, or two


def make_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )  # fmt: skip


def make_data(steps: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(32 * steps, 32, generator=g), torch.randn(32 * steps, 1, generator=g)
    )


# --- a plain torch loop ----------------------------------------------------------------------------------


def torch_loop(width: int, steps: int, device: str, emas: int, posthoc: int | None = None) -> float:
    """Seconds per step of SGD on ``steps`` batches of 32, with ``emas`` ``apply()`` after each step (and
    ``PowerEmaSnapshots.update`` writing every ``posthoc`` steps)."""
    import tempfile

    model = make_model(width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    averages = [ExponentialMovingAverage(model, decay=d) for d in DECAYS[:emas]]
    folder = tempfile.TemporaryDirectory()
    snapshots = PowerEmaSnapshots(model, every=posthoc, folder=folder.name) if posthoc else None
    batches = [
        (x.to(device), y.to(device)) for x, y in torch.utils.data.DataLoader(make_data(steps), batch_size=32)
    ]
    _sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, start=1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for average in averages:
            average.apply(num_updates=step)
        if snapshots is not None:
            snapshots.update(step)
    _sync(device)
    seconds = time.perf_counter() - start
    folder.cleanup()
    return seconds / steps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- Lightning -------------------------------------------------------------------------------------------


def lightning_loop(width: int, steps: int, device: str, emas: int, posthoc: int | None = None) -> float:
    import tempfile

    import lightning as L

    from ema_average.online.lightning import EMACallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(width)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    callbacks: list[L.Callback] = [clock]
    if emas:
        callbacks.insert(0, EMACallback(decay=DECAYS[:emas], posthoc_every=posthoc))
    root = tempfile.TemporaryDirectory()  # posthoc-ema/ goes into default_root_dir
    trainer = L.Trainer(
        default_root_dir=root.name,
        max_steps=steps, callbacks=callbacks, accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(make_data(steps), batch_size=32))
    root.cleanup()
    return clock.seconds / steps


# --- the Hugging Face Trainer -----------------------------------------------------------------------------


class _Regression(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = make_model(width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, steps: int) -> None:
        self.data = make_data(steps)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"x": x, "y": y}


def hf_loop(width: int, steps: int, device: str, emas: int, posthoc: int | None = None) -> float:
    import tempfile

    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from ema_average.online.transformers import EMACallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=0.01,
            lr_scheduler_type="constant", optim="sgd", report_to=[], save_strategy="no", disable_tqdm=True,
            logging_steps=10**9, use_cpu=not device.startswith("cuda"), dataloader_pin_memory=False,
        )  # fmt: skip
        callbacks: list[TrainerCallback] = [clock]
        if emas:
            callbacks.insert(0, EMACallback(decay=DECAYS[:emas], posthoc_every=posthoc))
        trainer = Trainer(
            model=_Regression(width), args=args, train_dataset=_Pairs(steps), callbacks=callbacks
        )
        trainer.remove_callback(PrinterCallback)  # its summary line, printed at the end of every run
        trainer.train()
    return clock.seconds / steps


# --- the table -------------------------------------------------------------------------------------------


LOOPS: dict[str, Callable[..., float]] = {
    "torch loop (apply)": torch_loop,
    "Lightning Trainer": lightning_loop,
    "HF Trainer": hf_loop,
}


VARIANTS = [(0, False), (1, False), (2, False), (1, True)]  # (EMAs, post-hoc snapshots)


def median_ms(loop: Callable[..., float], args: argparse.Namespace) -> list[float]:
    """Median ms per step of each variant (no, one, two EMAs; one EMA and snapshots), runs interleaved
    (after one warm-up run of each)."""
    times: dict[tuple[int, bool], list[float]] = {v: [] for v in VARIANTS}
    for rounds in range(args.repeats + 1):
        for emas, posthoc in VARIANTS:
            every = args.posthoc_every if posthoc else None
            ms = loop(args.width, args.steps, args.device, emas, every) * 1e3
            if rounds:  # the first round warms up
                times[emas, posthoc].append(ms)
    return [statistics.median(times[v]) for v in VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--posthoc-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    params = sum(p.numel() for p in make_model(args.width).parameters())
    table = Table(
        title=f"ms per optimizer step, {params:,} fp32 parameters, batch 32, {args.device}, "
        f"{args.threads} thread(s), median of {args.repeats} runs of {args.steps} steps; snapshots "
        f"of 2 profiles every {args.posthoc_every} steps"
    )
    columns = (
        "loop",
        "bare",
        "1 EMA",
        "cost",
        "ratio",
        "2 EMAs",
        "cost ",
        "ratio ",
        "1 EMA+snap",
        "snap cost",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "loop" else "right")
    for name, loop in LOOPS.items():
        bare, one, two, snap = median_ms(loop, args)
        table.add_row(
            name, f"{bare:.3f}", f"{one:.3f}", f"{one - bare:+.3f}", f"{one / bare:.2f}x",
            f"{two:.3f}", f"{two - bare:+.3f}", f"{two / bare:.2f}x", f"{snap:.3f}", f"{snap - one:+.3f}",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
