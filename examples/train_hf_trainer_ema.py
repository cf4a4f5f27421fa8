"""Train a tiny GPT-2 with the Hugging Face Trainer and the EMA callback, then load the EMA it saved.

    python examples/train_hf_trainer_ema.py [--steps 40] [--out out/]

The Trainer's evaluations (every ``steps // 2`` steps) run on the EMA; every ``checkpoint-N/`` also holds
``ema/``, which ``from_pretrained`` loads. ``ema-average out/ --submodel ema`` averages those copies.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ema_average.online.transformers import EMACallback


class Repeats(torch.utils.data.Dataset):
    """Sequences of 16 tokens that repeat a 4-token motif: something a tiny model can learn."""

    def __init__(self, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, 64, (count, 4), generator=g)
        self.ids = motifs.repeat(1, 4)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(steps: int = 40, out: Path | None = None, decay: float = 0.99) -> dict[str, float]:
    """Train; the Trainer's last evaluation loss (on the EMA), that of the EMA it saved, loaded, and the raw
    weights' (evaluated after training, when the callback no longer swaps)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    ema = EMACallback(decay=decay)
    with tempfile.TemporaryDirectory() as scratch:
        folder = out or Path(scratch)
        args = TrainingArguments(
            output_dir=str(folder), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
            eval_strategy="steps", eval_steps=steps // 2, save_strategy="steps", save_steps=steps // 2,
            report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10**9,
        )  # fmt: skip
        evaluation = Repeats(32, seed=1)
        trainer = Trainer(
            model=GPT2LMHeadModel(config), args=args, train_dataset=Repeats(256, seed=0),
            eval_dataset=evaluation, callbacks=[ema],
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
            during = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]  # on the EMA
            raw = trainer.evaluate(metric_key_prefix="eval_raw")[
                "eval_raw_loss"
            ]  # after train(): raw weights
            averaged = GPT2LMHeadModel.from_pretrained(folder / f"checkpoint-{steps}" / "ema")
            reloaded = Trainer(model=averaged, args=args, eval_dataset=evaluation).evaluate()["eval_loss"]
    return {
        "of the EMA while training": during,
        "of the EMA saved and reloaded": reloaded,
        "of the raw weights": raw,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    cli = parser.parse_args()
    for what, loss in main(cli.steps, cli.out).items():
        print(f"evaluation loss {what}: {loss:.4f}")
