"""What the tests share that is not a fixture: small real checkpoints written the way each producer writes
them, float64 expectations, and hostile payloads. Fixtures (conftest.py) build on these."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import save_file


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> OrderedDict[str, torch.Tensor]:
    """A small model's state dict: floating weights plus an integer buffer, as BatchNorm has."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("encoder.weight", torch.randn(16, 8, generator=g).to(dtype)),
            ("encoder.bias", torch.randn(16, generator=g).to(dtype)),
            ("norm.running_mean", torch.randn(16, generator=g).to(dtype)),
            ("norm.num_batches_tracked", torch.tensor(seed, dtype=torch.int64)),
            ("head.weight", torch.randn(4, 16, generator=g).to(dtype)),
        ]
    )


def write_safetensors_run(
    folder: Path, steps: list[int], dtype: torch.dtype = torch.float32, metadata_key: str | None = "step"
) -> dict[int, OrderedDict[str, torch.Tensor]]:
    """``step_N.safetensors`` files; the step also in the header's metadata when ``metadata_key``."""
    folder.mkdir(parents=True, exist_ok=True)
    states = {}
    for step in steps:
        states[step] = make_state(step, dtype)
        metadata = {metadata_key: str(step)} if metadata_key else None
        save_file(dict(states[step]), str(folder / f"model_step_{step}.safetensors"), metadata=metadata)
    return states


def write_torch_run(
    folder: Path, steps: list[int], *, wrap: str | None = "model", step_key: str | None = "global_step"
) -> dict[int, OrderedDict[str, torch.Tensor]]:
    """``ckpt_N.pt`` files as a typical training loop saves them (``torch.save`` of a dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = {}
    for step in steps:
        states[step] = make_state(step)
        obj: dict = dict(states[step]) if wrap is None else {wrap: states[step], "optimizer": {"lr": 0.1}}
        if step_key is not None and wrap is not None:
            obj[step_key] = step
        torch.save(obj, folder / f"ckpt_{step}.pt")
    return states


def write_fairseq_run(folder: Path, updates: list[int], epoch: int = 1) -> dict[int, OrderedDict]:
    """What fairseq's checkpoint_utils.save_state writes: cfg, args, model, optimizer_history with
    num_updates, extra_state; save_checkpoint names it checkpoint_{epoch}_{updates}.pt and copies the
    newest to checkpoint_last.pt (and checkpoint_best.pt)."""
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    states = {}
    for n in updates:
        states[n] = make_state(n)
        obj = {
            "cfg": OmegaConf.create({"model": {"arch": "transformer"}, "optimization": {"lr": [0.1]}}),
            "args": argparse.Namespace(arch="transformer", lr=[0.1]),
            "model": states[n],
            "optimizer_history": [
                {
                    "criterion_name": "CrossEntropyCriterion",
                    "optimizer_name": "FairseqAdam",
                    "lr_scheduler_state": {"best": 3.2},
                    "num_updates": n,
                }
            ],
            "extra_state": {"train_iterator": {"epoch": epoch, "iterations_in_epoch": n}, "val_loss": 3.2},
            "last_optimizer_state": {"state": {}, "param_groups": []},
        }
        torch.save(obj, folder / f"checkpoint_{epoch}_{n}.pt")
    last = folder / f"checkpoint_{epoch}_{updates[-1]}.pt"
    for copy in ("checkpoint_last.pt", "checkpoint_best.pt"):
        (folder / copy).write_bytes(last.read_bytes())
    return states


def write_lightning_run(
    folder: Path,
    max_steps: int = 12,
    every: int = 4,
    callbacks: Sequence[object] = (),
    checkpoint_class: type | None = None,
) -> Path:
    """A real Lightning Trainer with ModelCheckpoint (or ``checkpoint_class``, a subclass) saving every
    ``every`` steps, and ``callbacks``."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
            )

        def training_step(self, batch, _):  # type: ignore[no-untyped-def]
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    checkpoints = (checkpoint_class or L.pytorch.callbacks.ModelCheckpoint)(
        dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{epoch}-{step}"
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoints, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    return folder


def write_hf_trainer_run(folder: Path, max_steps: int = 6, save_steps: int = 3) -> Path:
    """A real transformers Trainer on a tiny GPT-2 (tied embeddings), built from a config offline."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=max_steps,
        save_steps=save_steps,
        save_strategy="steps",
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=tiny_gpt2(), args=args, train_dataset=_Tokens()).train()
    return folder


def rss_growth(action: Callable[[], object]) -> int:
    """Bytes this process's resident memory grew by while ``action`` ran (for laziness checks)."""
    process = psutil.Process()
    before = process.memory_info().rss
    action()
    return process.memory_info().rss - before


def float64_reference(
    states: list[dict[str, torch.Tensor]],
    steps: list[int],
    decay: float,
    numerator: float = 1.0,
    denominator: float = 10.0,
) -> dict[str, torch.Tensor]:
    """The seed's rule over checkpoints in order, written out plainly in float64: the expectation."""
    shadow = {n: t.double() for n, t in states[0].items() if t.is_floating_point()}
    for state, step in zip(states[1:], steps[1:], strict=True):
        d = min(decay, (numerator + step) / (denominator + step))
        shadow = {n: d * s + (1 - d) * state[n].double() for n, s in shadow.items()}
    return shadow


def assert_weighted_sum(
    out: dict[str, torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    weights: list[float],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Every floating tensor of ``states`` stands in ``out`` as ``sum_i weights[i] * states[i][name]``, summed
    in float64: the oracle for any average whose per-checkpoint weights are known."""
    names = [name for name, tensor in states[0].items() if tensor.is_floating_point()]
    assert names
    for name in names:
        expected = sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        torch.testing.assert_close(
            out[name].double(), expected, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


# Producers of issue 11: each run folder exactly as the trainer writes it --------------------------------


def engine_average(checkpoints: list, decay: float = 0.9) -> dict[str, torch.Tensor]:
    """The checkpoints' floating tensors averaged by the library's engine (the code the pipeline streams
    through), each update at its checkpoint's step: to compare with :func:`float64_reference`."""
    from ema_average import ExponentialMovingAverage

    first = checkpoints[0]
    names = [name for name, spec in first.specs().items() if spec.is_floating]
    ema = ExponentialMovingAverage.from_tensors({n: first.read(n).clone() for n in names}, decay=decay)
    for ckpt in checkpoints[1:]:
        ema.update({n: ckpt.read(n) for n in names}, num_updates=ckpt.step)
    return {name: tensor.double() for name, tensor in ema.averages().items()}


def assert_matches_reference(
    checkpoints: list, states: list[dict[str, torch.Tensor]], decay: float = 0.9
) -> None:
    """What the checkpoints average to equals the float64 average of ``states`` (the producer's tensors)."""
    steps = [c.step for c in checkpoints]
    expected = float64_reference(states, steps, decay)
    got = engine_average(checkpoints, decay)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)


def tiny_gpt2(seed: int = 0, vocab_size: int = 50):  # type: ignore[no-untyped-def]
    """A GPT-2 small enough to train on the CPU in a test, its weights drawn from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=vocab_size, n_positions=16, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def write_peft_lora_run(folder: Path) -> Path:
    """PEFT LoRA through the HF Trainer, saving every 3 steps, then ``trainer.save_model()`` (the final
    adapter in the run folder itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    with warnings.catch_warnings():  # PEFT's Conv1D notes and transformers' deprecations: not ours
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
        args = TrainingArguments(
            output_dir=str(folder),
            max_steps=6,
            save_steps=3,
            per_device_train_batch_size=4,
            learning_rate=0.05,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1000,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
        trainer.train()
        trainer.save_model()
    return folder


def tiny_unet(seed: int = 0):  # type: ignore[no-untyped-def]
    """A diffusers UNet2DModel small enough to train on the CPU in a test, its weights drawn from ``seed``."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def write_diffusers_training_run(folder: Path) -> Path:
    """What diffusers' training scripts (train_unconditional.py and kin) write: ``accelerator.save_state``
    into ``checkpoint-{global_step}`` every 2 steps, with the scripts' save hook putting the model in
    ``unet/`` and the ``EMAModel`` in ``unet_ema/``; at the end the pipeline in the run folder itself.
    The hook and loop are the scripts' (reproduced); accelerate, UNet2DModel, EMAModel, DDPMPipeline real."""
    from accelerate import Accelerator
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=unet.config)

    def save_model_hook(models, weights, output_dir):  # type: ignore[no-untyped-def]
        ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for model in models:
            model.save_pretrained(os.path.join(output_dir, "unet"))
            weights.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.1)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=10)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        clean, noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
        t = torch.randint(0, 10, (2,), generator=g)
        pred = unet(scheduler.add_noise(clean, noise, t), t).sample
        accelerator.backward(torch.nn.functional.mse_loss(pred, noise))
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        if step % 2 == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                accelerator.save_state(os.path.join(folder, f"checkpoint-{step}"))
    DDPMPipeline(unet=accelerator.unwrap_model(unet), scheduler=scheduler).save_pretrained(folder)
    return folder


def write_accelerate_run(folder: Path) -> Path:
    """accelerate ``save_state()`` with automatic naming: ``checkpoints/checkpoint_K``, K counting saves."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(0)
    config = ProjectConfiguration(project_dir=str(folder), automatic_checkpoint_naming=True)
    accelerator = Accelerator(cpu=True, project_config=config)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in range(1, 7):
        accelerator.backward(model(torch.randn(4, 4)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            accelerator.save_state()
    return folder


# (world size, variants) of the real DeepSpeed runs; stages 0-3, fp32 and bf16, one and two ranks.
DEEPSPEED_RUNS = {
    1: ["0:fp32", "0:bf16", "1:bf16", "2:fp32", "3:fp32", "3:bf16"],
    2: ["1:fp32", "2:bf16", "3:bf16"],
}


class WritesMarker:
    """Unpickling this calls os.system to create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


# Children a test sends signals to --------------------------------------------------------------------

# What a shell without job control (``nohup``, ``sh -c '... &'``, some CI runners) may start a job with
# ignored; an ignored disposition survives exec, so the child would never see the test's signal.
SENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP)


def default_signals() -> None:
    """``preexec_fn`` of a child the test signals: every signal it may be sent at its default disposition
    and unblocked, whatever the launcher of the test run ignored or blocked."""
    for sig in SENT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SENT_SIGNALS)


@contextlib.contextmanager
def signalled_child(
    command: Sequence[str], *, watchdog: float = 300.0, **popen: Any
) -> Iterator[subprocess.Popen]:
    """A child process to send signals to, started with :func:`default_signals`, that never outlives the
    test: killed when the block ends with it still running (a failed assertion included), and after
    ``watchdog`` seconds in any case, so a test blocked reading its output fails instead of hanging. A
    failure in the block shows what the child wrote to its stderr pipe, not read yet."""
    proc = subprocess.Popen(command, preexec_fn=default_signals, **popen)
    timer = threading.Timer(watchdog, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        with proc:  # closes the pipes and reaps it
            try:
                yield proc
            except BaseException as exc:
                proc.kill()
                if proc.stderr is not None and not proc.stderr.closed:
                    with contextlib.suppress(Exception):
                        exc.add_note(f"the child's stderr: {proc.communicate(timeout=30)[1]!r}")
                raise
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        timer.cancel()


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """For a test that signals its own process: within the block Ctrl-C raises ``KeyboardInterrupt`` and
    SIGTERM is at its default, as in a Python started from a terminal, even when the launcher of the test
    run ignored them (Python then keeps SIGINT ignored); the launcher's dispositions come back after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def signal_when(proc: subprocess.Popen, sig: int, ready: Callable[[], bool]) -> None:
    """Send ``sig`` at a moment ``ready()`` holds, with no race: the child is stopped (SIGSTOP) while
    ``ready`` looks at it, and the signal is pending before it runs another instruction. Fails if the
    child ends first. Between looks the child runs on for a moment: pacing only, never what decides."""
    while True:
        os.kill(proc.pid, signal.SIGSTOP)
        state = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
        if state is None or state.si_code != os.CLD_STOPPED:
            raise AssertionError("the child ended before it reached the moment to signal it")
        try:
            if ready():
                os.kill(proc.pid, sig)
                return
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)


def holds_unnamed_output(pid: int, output: Path) -> bool:
    """Whether process ``pid`` is writing ``output`` and has not named it yet: it holds the temporary
    (``O_TMPFILE``'s unnamed file, else the hidden ``temp_name``) open, and ``output`` does not exist."""
    from ema_average.output import temp_name

    if output.exists():
        return False
    temporaries = (f"{output.parent}/#", str(temp_name(output, pid)))
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(temporaries):
                return True
    return False


@contextlib.contextmanager
def bounded_python_work(lines: int) -> Iterator[None]:
    """Fail as soon as the block runs more than ``lines`` lines of Python: "constant time" and "refused
    quickly" checked as work done, not as a duration a busy machine can stretch (a loop over 2**40 paths or
    1e11 steps fails here after ``lines`` lines, never hangs)."""
    import sys

    count = 0

    def tracer(frame: object, event: str, arg: object) -> object:
        nonlocal count
        if event == "line":
            count += 1
            if count > lines:
                raise AssertionError(f"more than {lines} lines of Python run")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


@contextlib.contextmanager
def hf_offline(monkeypatch: Any) -> Iterator[None]:
    """No network for the Hugging Face libraries, and their notices not ours to see. huggingface_hub reads
    the variables once, when first imported: its constant is set too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    """A separate Python process running ``code`` (default signal dispositions); returns once it prints
    'ready', and is killed if it never does. It then blocks reading its stdin, a pipe this process holds,
    so it ends when the test run does, however slow the machine, should a test fail before
    :func:`kill_hard`."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
    except BaseException:
        kill_hard(child)
        raise
    return child


def kill_hard(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.stdout is not None and child.stdin is not None
    child.stdout.close()
    child.stdin.close()
