"""The Hugging Face Trainer EMA callback, with the real transformers Trainer on the CPU (a tiny GPT-2 with tied
embeddings): the EMA equals a float64 reference of the weights after each optimizer step, the Trainer's
evaluations see the averages, ``checkpoint-N/ema`` loads with ``from_pretrained``, and a run resumed from a
checkpoint ends with the uninterrupted run's EMA, bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from cli_helpers import run_cli  # noqa: E402
from ema_average.errors import CheckpointError, ConfigurationError  # noqa: E402
from ema_average.online.transformers import STATE_METADATA_KEY, EMACallback  # noqa: E402
from helpers import float64_reference, tiny_gpt2  # noqa: E402

DECAY = 0.9


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 32, offset: int = 0) -> None:
        self.count, self.offset = count, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i + self.offset))
        return {"input_ids": ids, "labels": ids}


class Recorder(TrainerCallback):
    """The weights at the start and after each optimizer step, in float64: the reference's input."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def _record(self, step: int, model: torch.nn.Module) -> None:
        self.steps.append(step)
        self.weights.append({n: p.detach().double().clone() for n, p in model.named_parameters()})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._record(state.global_step, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._record(state.global_step, model)


def arguments(out: Path, **kwargs: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
        "save_strategy": "no",
        "seed": 0,
    }
    options.update(kwargs)
    return TrainingArguments(**options)


def train(
    out: Path,
    callbacks: list[TrainerCallback],
    model: torch.nn.Module | None = None,
    resume: str | None = None,
    eval_dataset: torch.utils.data.Dataset | None = None,
    **kwargs: Any,
) -> Trainer:
    trainer = Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=arguments(out, **kwargs),
        train_dataset=Tokens(),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def reference(recorder: Recorder, until: int | None = None) -> dict[str, torch.Tensor]:
    """The TF rule written out plainly in float64 over the recorded per-step weights."""
    shadow = dict(recorder.weights[0])
    for step, weights in zip(recorder.steps[1:], recorder.weights[1:], strict=True):
        if until is not None and step > until:
            break
        d = min(DECAY, (1 + step) / (10 + step))
        shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
    return shadow


def assert_close_to(averages: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(averages) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(averages[name].double(), tensor, rtol=1e-5, atol=1e-6)


def test_ema_equals_float64_reference_of_every_optimizer_step(tmp_path: Path) -> None:
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    train(tmp_path, [recorder, ema], max_steps=6)
    assert recorder.steps == list(range(7))
    assert ema.moving_average is not None and ema.moving_average.num_applied == 6
    assert_close_to(ema.moving_average.averages(), reference(recorder))


@pytest.mark.slow
def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path: Path) -> None:
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    train(tmp_path, [recorder, ema], max_steps=3, gradient_accumulation_steps=4)  # 12 batches, 3 steps
    assert recorder.steps == [0, 1, 2, 3]
    assert ema.moving_average is not None and ema.moving_average.num_applied == 3
    assert_close_to(ema.moving_average.averages(), reference(recorder))


def eval_loss_of(weights: dict[str, torch.Tensor], data: torch.utils.data.Dataset, out: Path) -> float:
    """The stock Trainer's evaluation loss of a fresh GPT-2 holding ``weights`` (no EMA callback)."""
    model = tiny_gpt2(seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(model=model, args=arguments(out), eval_dataset=data).evaluate()["eval_loss"]


@pytest.mark.parametrize(
    ("named", "save"),
    [(False, "no"), (True, "no"), (False, "steps")],
    ids=["one-dataset", "dict-of-datasets", "saving-after-evaluating"],
)
@pytest.mark.slow
def test_evaluations_while_training_see_the_averages_and_training_goes_on_from_raw_weights(
    tmp_path: Path, named: bool, save: str
) -> None:
    ema, recorder, plain = EMACallback(decay=DECAY), Recorder(), Recorder()
    datasets = {"a": Tokens(8, offset=1000), "b": Tokens(8, offset=2000)}
    held_out = datasets if named else datasets["a"]
    schedule = {"eval_strategy": "steps", "eval_steps": 3, "eval_dataset": held_out}
    saving = {"save_strategy": save, "save_steps": 3}
    trainer = train(tmp_path / "a", [recorder, ema], max_steps=6, **schedule, **saving)
    train(tmp_path / "b", [plain], max_steps=6, **schedule)  # the same evaluations, on its own weights
    for swapped, undisturbed in zip(recorder.weights, plain.weights, strict=True):
        for name in undisturbed:
            assert torch.equal(swapped[name], undisturbed[name]), name  # restored bit for bit
    for key, data in datasets.items() if named else [("", datasets["a"])]:
        metric = f"eval_{key}_loss" if key else "eval_loss"
        evaluated = {entry["step"]: entry[metric] for entry in trainer.state.log_history if metric in entry}
        assert sorted(evaluated) == [3, 6]
        for step, loss in evaluated.items():
            ema_loss = eval_loss_of(reference(plain, until=step), data, tmp_path / "c")
            raw_loss = eval_loss_of(plain.weights[step], data, tmp_path / "c")
            assert abs(ema_loss - raw_loss) > 2e-4  # the two are told apart (10x the tolerance below)
            assert loss == pytest.approx(ema_loss, rel=5e-6), (metric, step)
    if save == "steps":  # the Trainer's own save of the model holds the training weights, not the EMA
        saved = load_file(str(tmp_path / "a" / "checkpoint-3" / "model.safetensors"))
        for name, tensor in plain.weights[3].items():
            if name in saved:
                assert torch.equal(saved[name].double(), tensor), name


@pytest.mark.slow
def test_an_epoch_end_save_after_a_step_evaluation_saves_the_training_weights(tmp_path: Path) -> None:
    """Step 8 ends the epoch: evaluated on the EMA at the step's end, saved at the epoch's end."""
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    schedule = {"eval_strategy": "steps", "eval_steps": 8, "eval_dataset": Tokens(8, offset=1000)}
    train(tmp_path, [recorder, ema], max_steps=8, save_strategy="epoch", **schedule)
    saved = load_file(str(tmp_path / "checkpoint-8" / "model.safetensors"))
    for name, tensor in recorder.weights[8].items():
        if name in saved:
            assert torch.equal(saved[name].double(), tensor), name
    assert (tmp_path / "checkpoint-8" / "ema" / "model.safetensors").is_file()


@pytest.mark.slow
def test_evaluate_raw_leaves_the_trainer_evaluating_training_weights(tmp_path: Path) -> None:
    ema, recorder = EMACallback(decay=DECAY, evaluate="raw"), Recorder()
    held_out = Tokens(8, offset=1000)
    trainer = train(
        tmp_path, [recorder, ema], max_steps=3, eval_strategy="steps", eval_steps=3, eval_dataset=held_out
    )
    (loss,) = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert loss == pytest.approx(eval_loss_of(recorder.weights[3], held_out, tmp_path / "c"), rel=1e-5)


@pytest.mark.slow
def test_each_checkpoint_holds_an_ema_folder_that_from_pretrained_loads(tmp_path: Path) -> None:
    ema, recorder = EMACallback(decay=DECAY), Recorder()
    train(tmp_path, [recorder, ema], max_steps=6, save_strategy="steps", save_steps=3)
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}" / "ema"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        loaded = GPT2LMHeadModel.from_pretrained(folder)
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied again
        assert_close_to(
            {n: p.detach() for n, p in loaded.named_parameters()}, reference(recorder, until=step)
        )
    assert not list(tmp_path.glob("checkpoint-*/.ema*"))  # nothing left aside


@pytest.mark.slow
def test_stop_and_resume_gives_the_uninterrupted_ema_bit_for_bit(tmp_path: Path) -> None:
    whole = EMACallback(decay=DECAY)
    whole_trainer = train(tmp_path / "whole", [whole], max_steps=8, save_strategy="steps", save_steps=4)

    train(tmp_path / "parts", [EMACallback(decay=DECAY)], max_steps=4, save_strategy="steps", save_steps=4)
    resumed = EMACallback(decay=DECAY)
    resumed_trainer = train(
        tmp_path / "parts",
        [resumed],
        model=tiny_gpt2(seed=5),  # other weights: all must come back from the checkpoint
        resume=str(tmp_path / "parts" / "checkpoint-4"),
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
    )
    assert whole.moving_average is not None and resumed.moving_average is not None
    assert resumed.moving_average.num_applied == whole.moving_average.num_applied == 8
    got, expected = resumed.moving_average.averages(), whole.moving_average.averages()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    raw = dict(whole_trainer.model.named_parameters())
    for name, p in resumed_trainer.model.named_parameters():
        assert torch.equal(p, raw[name]), name


@pytest.mark.slow
def test_a_callback_used_before_resumes_from_the_checkpoint_not_from_its_own_average(tmp_path: Path) -> None:
    ema = EMACallback(decay=DECAY)
    train(tmp_path, [ema], max_steps=8, save_strategy="steps", save_steps=4)
    assert ema.moving_average is not None
    uninterrupted = {n: t.clone() for n, t in ema.moving_average.averages().items()}
    train(tmp_path, [ema], resume=str(tmp_path / "checkpoint-4"), max_steps=8, save_strategy="no")
    assert ema.moving_average.num_applied == 8
    for name, tensor in ema.moving_average.averages().items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_resuming_a_checkpoint_without_ema_folder_is_one_clear_error(tmp_path: Path) -> None:
    train(tmp_path, [], max_steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: holds no ema/model\.safetensors"):
        train(tmp_path, [EMACallback(decay=DECAY)], resume=str(tmp_path / "checkpoint-2"), max_steps=4)


def test_the_saved_counter_is_in_the_weights_metadata(tmp_path: Path) -> None:
    train(tmp_path, [EMACallback(decay=DECAY)], max_steps=3, save_strategy="steps", save_steps=3)
    with safe_open(str(tmp_path / "checkpoint-3" / "ema" / "model.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()[STATE_METADATA_KEY])
    raw = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    digest = hashlib.sha256()  # the training weights saved beside, as the record says it digests them
    for name in [n for n, _ in tiny_gpt2().named_parameters()]:
        tensor = raw[name]
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert record.pop("weights_sha256") == digest.hexdigest()
    assert record == {
        "method": "exponential",
        "settings": {"decay": DECAY, "numerator": 1.0, "denominator": 10.0},
        "num_applied": 3,
        "last_step": 3,
    }


def test_evaluate_both_is_refused_with_the_way_to_get_both() -> None:
    with pytest.raises(ConfigurationError, match="metric_key_prefix"):
        EMACallback(evaluate="both")


@pytest.mark.subprocess
def test_the_command_averages_the_callbacks_ema_folders_with_submodel_ema(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema-of-ema.safetensors"
    train(run, [EMACallback(decay=DECAY)], max_steps=6, save_strategy="steps", save_steps=2)
    done = run_cli(run, "--submodel", "ema", "--decay", "0.5", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "read ema (the EMA kept while training); also here: model (--submodel model)" in done.stdout
    states = [load_file(str(run / f"checkpoint-{step}" / "ema" / "model.safetensors")) for step in (2, 4, 6)]
    expected = float64_reference(states, [2, 4, 6], 0.5)
    got = load_file(str(out))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-6, atol=1e-7)
    raw = load_file(str(run / "checkpoint-6" / "model.safetensors"))
    assert not torch.allclose(got["transformer.h.0.mlp.c_fc.weight"], raw["transformer.h.0.mlp.c_fc.weight"])


DEEPSPEED_SCRIPT = """
import json, os, sys, warnings
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from ema_average.errors import ConfigurationError
from ema_average.online.transformers import EMACallback

class Tokens(torch.utils.data.Dataset):
    def __len__(self): return 32
    def __getitem__(self, i):
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

class Recorder(TrainerCallback):
    def __init__(self): self.weights = []
    def _record(self, model): self.weights.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    def on_train_begin(self, args, state, control, model=None, **kw): self._record(model)
    def on_step_end(self, args, state, control, model=None, **kw): self._record(model)

def tiny():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))

def trainer(stage, callbacks):
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    args = TrainingArguments(output_dir=f"{out}/z{stage}", per_device_train_batch_size=4, max_steps=3, report_to=[],
                             disable_tqdm=True, deepspeed=config, save_strategy="no", learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1000)
    return Trainer(model=tiny(), args=args, train_dataset=Tokens(), callbacks=callbacks)

out = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
warnings.simplefilter("ignore")
ema, recorder = EMACallback(decay=0.9), Recorder()
trainer(2, [recorder, ema]).train()
shadow = dict(recorder.weights[0])
for step, weights in enumerate(recorder.weights[1:], start=1):
    d = min(0.9, (1 + step) / (10 + step))
    shadow = {n: d * s + (1 - d) * weights[n] for n, s in shadow.items()}
averages = ema.moving_average.averages()
record = {"num_applied": ema.moving_average.num_applied,
          "gap": max(float((averages[n].double() - shadow[n]).abs().max()) for n in shadow),
          "averages": {n: t.tolist() for n, t in averages.items()}}
try:
    trainer(3, [EMACallback(decay=0.9)]).train()
    record["zero3"] = "trained"
except ConfigurationError as exc:
    record["zero3"] = str(exc)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(record, f)
"""


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_deepspeed_zero2_on_two_gloo_ranks_and_zero3_refused(tmp_path: Path) -> None:
    """The real Trainer with DeepSpeed on two CPU ranks (torchrun, gloo): under ZeRO-2 each rank's EMA is
    the float64 reference of its weights and equal across ranks; ZeRO-3 is refused with one line."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "deepspeed_ema.py"
    script.write_text(DEEPSPEED_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_applied"] == ranks[1]["num_applied"] == 3
    assert ranks[0]["gap"] < 1e-6 and ranks[1]["gap"] < 1e-6
    assert ranks[0]["averages"] == ranks[1]["averages"]
    for rank in ranks:
        assert rank["zero3"] == (
            "parameter 'transformer.wte.weight' is partitioned by DeepSpeed ZeRO-3 (empty outside forward): "
            "the EMA callback cannot average it; use ZeRO stage 1 or 2, or DDP"
        )


@pytest.mark.slow
def test_peft_lora_keeps_and_saves_averages_of_the_adapter_alone(tmp_path: Path) -> None:
    """The frozen base model holds no average (it would be itself); ema/ holds the averaged adapter weights
    under the PeftModel's names, and a resumed run continues them bit for bit."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0)
        models = [peft.get_peft_model(tiny_gpt2(), lora) for _ in range(2)]
    whole, recorder = EMACallback(decay=DECAY), Recorder()
    train(tmp_path / "whole", [recorder, whole], model=models[0], max_steps=4)
    assert whole.moving_average is not None
    averages = whole.moving_average.averages()
    assert averages and all("lora_" in name for name in averages)
    expected = reference(recorder)
    assert_close_to(averages, {n: expected[n] for n in averages})
    for name in expected:
        if name not in averages:  # frozen: never moved
            assert torch.equal(recorder.weights[-1][name], recorder.weights[0][name]), name

    train(tmp_path / "parts", [EMACallback(decay=DECAY)], model=models[1], max_steps=2, save_strategy="steps",
          save_steps=2)  # fmt: skip
    folder = tmp_path / "parts" / "checkpoint-2" / "ema"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert len(saved) == len(averages) and not any(".default." in key for key in saved)  # PEFT's own keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), folder)  # PEFT's loader reads it
        written = tmp_path / "written-by-peft"
        loaded.save_pretrained(written)  # and writes the very same layout back
    assert sorted(p.name for p in written.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again = load_file(str(written / "adapter_model.safetensors"))
    assert set(again) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(again[key], tensor.to(again[key].dtype)), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = peft.get_peft_model(tiny_gpt2(), lora)
    resumed = EMACallback(decay=DECAY)
    train(tmp_path / "parts", [resumed], model=base, resume=str(folder.parent), max_steps=4)
    assert resumed.moving_average is not None
    for name, tensor in resumed.moving_average.averages().items():
        assert torch.equal(tensor, averages[name]), name


FSDP2_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState, TrainingArguments
from ema_average.errors import ConfigurationError
from ema_average.online.transformers import EMACallback

dist.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
fully_shard(model)
args = TrainingArguments(sys.argv[1], use_cpu=True, report_to=[])
try:
    EMACallback(decay=0.9).on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    print("averaged")
except ConfigurationError as exc:
    print(exc)
dist.destroy_process_group()
"""


@pytest.mark.subprocess
def test_fsdp2_sharded_parameters_are_refused_when_training_starts(tmp_path: Path) -> None:
    """FSDP2's DTensors (fully_shard on a real one-rank gloo group): the Trainer runs FSDP2 only on
    accelerators (accelerate drops the plugin on the CPU), where its ema/ save is untested, so one line."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1:] == [
        "parameter '0.weight' is sharded (a DTensor: FSDP2 or tensor parallel): the Hugging Face EMA callback "
        "does not average sharded parameters (accelerate runs FSDP2 on accelerators only, where its ema/ "
        "save is untested); use Lightning's EMA callback, ExponentialMovingAverage(model) in the loop, or DDP"
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
