"""What a checkpoint holds, decided by shape (issue 25): the model inside a container beside a metric,
wrapper prefixes that appear mid-run, optimizer state by its structure, whatever the trainer calls it.

Producers: nanoGPT's ``train.py`` save and ``model.py`` GPT (reproduced from its source in
``nanogpt_producer.py``: nanoGPT is scripts, not a package); fastai's ``Learner.save(..., with_opt=True)``
(``fastai/learner.py`` ``save_model`` and ``fastai/optimizer.py`` ``Optimizer.state_dict``, reproduced below:
fastai pulls in torchvision, which does not install beside this torch). Every output equals the float64
reference of the producer's own weights and loads into the producer's model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cli_helpers import run_cli
from ema_average.checkpoints import find_run
from helpers import float64_reference
from nanogpt_producer import GPT, GPTConfig, write_nanogpt_run


def average(run: Path, output: Path, *args: str) -> str:
    """The command on ``run`` (decay 0.9) writing ``output``; its stderr (the plan and notices)."""
    result = run_cli(run, "-o", output, "--decay", "0.9", *args)
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout


def assert_reference(output: Path, states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The output holds exactly the model's names, each the float64 reference of the saved weights."""
    steps = sorted(states)
    expected = float64_reference([states[s] for s in steps], steps, 0.9)
    out = load_file(str(output))
    assert set(out) == set(states[steps[0]])
    for name, tensor in expected.items():
        torch.testing.assert_close(out[name].double(), tensor, rtol=2e-6, atol=2e-7)
    return out


# nanoGPT: {model, optimizer, model_args, iter_num, best_val_loss (0-d), config}, compiled from mid-run ----


@pytest.fixture(scope="module")
def nanogpt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    out = tmp_path_factory.mktemp("nanogpt") / "out"
    states = write_nanogpt_run(out, evals=[2, 4, 6], compile_from=3)
    return out, states


@pytest.mark.slow
def test_nanogpt_file_holds_a_metric_beside_a_compiled_model(nanogpt_run: tuple[Path, dict]) -> None:
    out, _ = nanogpt_run
    saved = torch.load(out / "iter_4" / "ckpt.pt", weights_only=True)
    assert saved["best_val_loss"].dim() == 0
    assert next(iter(saved["model"])).startswith("_orig_mod.")  # what the test relies on
    assert not next(iter(torch.load(out / "iter_2" / "ckpt.pt", weights_only=True)["model"])).startswith("_")


@pytest.mark.slow
def test_nanogpt_run_averages_the_model_and_loads_into_gpt(
    nanogpt_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, states = nanogpt_run
    run = find_run(out)
    assert [(c.step, c.step_origin) for c in run.checkpoints] == [(s, "metadata:iter_num") for s in (2, 4, 6)]
    assert all("best_val_loss" not in name for c in run.checkpoints for name in c.specs())
    text = average(out, tmp_path / "ema.safetensors", "--overwrite")
    averaged = assert_reference(tmp_path / "ema.safetensors", states)
    model = GPT(GPTConfig())
    model.load_state_dict(averaged)  # strict: every name GPT has, none other
    assert "best_val_loss" in text  # named as not averaged
    assert "'_orig_mod.'" in text  # the plan says what was stripped


# fastai: Learner.save(name, with_opt=True) = {'model': sd, 'opt': {'state': [...], 'hypers': [...]}} ----


class FastaiAdam:
    """fastai's ``Adam``: ``Optimizer(params, [weight_decay, partial(average_grad, dampening=True),
    average_sqr_grad, step_stat, adam_step])``; per-parameter state ``{'grad_avg', 'sqr_avg', 'step'}``
    (``do_wd`` False on norm and bias parameters: ``Learner.create_opt`` with ``wd_bn_bias=False``)."""

    def __init__(self, params: list[nn.Parameter], norm_bias: set[int], lr: float = 1e-2) -> None:
        self.params = params
        self.hypers = [{"wd": 0.01, "sqr_mom": 0.99, "lr": lr, "mom": 0.9, "eps": 1e-5}]
        self.state: dict[int, dict] = {
            i: ({"do_wd": False} if i in norm_bias else {}) for i in range(len(params))
        }

    def step(self) -> None:
        h = self.hypers[0]
        for i, p in enumerate(self.params):
            s = self.state[i]
            grad_avg = s.get("grad_avg", torch.zeros_like(p)).mul_(h["mom"]).add_(p.grad, alpha=1 - h["mom"])
            sqr_avg = (
                s.get("sqr_avg", torch.zeros_like(p))
                .mul_(h["sqr_mom"])
                .addcmul_(p.grad, p.grad, value=1 - h["sqr_mom"])
            )
            s.update(grad_avg=grad_avg, sqr_avg=sqr_avg, step=s.get("step", 0) + 1)
            debias1, debias2 = 1 - h["mom"] ** s["step"], 1 - h["sqr_mom"] ** s["step"]
            with torch.no_grad():
                p.addcdiv_(grad_avg, (sqr_avg / debias2).sqrt() + h["eps"], value=-h["lr"] / debias1)

    def state_dict(self) -> dict:
        """``Optimizer.state_dict``: ``{'state': [self.state[p] for p in params], 'hypers': self.hypers}``."""
        return {"state": [self.state[i] for i in range(len(self.params))], "hypers": self.hypers}


def fastai_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def write_fastai_run(models: Path, epochs: int) -> dict[int, dict[str, torch.Tensor]]:
    """``SaveModelCallback(every_epoch=True, with_opt=True)``: ``learn.save(f'model_{epoch}', with_opt=True)``
    -> ``save_model(file, model, opt)``: ``torch.save({'model': model.state_dict(), 'opt': opt.state_dict()},
    models/model_{epoch}.pth)``."""
    model = fastai_model()
    norm_bias = {
        i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("1.") or n.endswith("bias")
    }
    opt = FastaiAdam(list(model.parameters()), norm_bias)
    models.mkdir(parents=True)
    states = {}
    for epoch in range(epochs):
        for _ in range(3):
            x = torch.randn(16, 6)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            model.zero_grad()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, models / f"model_{epoch}.pth")
        states[epoch] = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return states


def test_fastai_optimizer_state_is_not_averaged(tmp_path: Path) -> None:
    states = write_fastai_run(tmp_path / "models", epochs=3)
    run = find_run(tmp_path / "models")
    assert [c.step for c in run.checkpoints] == [0, 1, 2]
    assert set(run.checkpoints[0].specs()) == set(states[0])  # no grad_avg, no sqr_avg, no 'model.' prefix
    text = average(tmp_path / "models", tmp_path / "ema.safetensors")
    averaged = assert_reference(tmp_path / "ema.safetensors", states)
    fastai_model().load_state_dict(averaged)
    assert "optimizer state (opt)" in " ".join(text.split())


# Names across a run: a DDP wrapper appears on resume; --strip-prefix applies to the names read -----------


def test_ddp_prefix_appearing_on_resume_and_strip_prefix_on_input(tmp_path: Path) -> None:
    """A LightningModule-like wrapper (``net.``) saved plainly, then resumed under DDP (``module.net.``):
    one run, read under the names the bare module loads once ``--strip-prefix net.`` is given."""
    torch.manual_seed(0)
    states = {s: {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4)} for s in (10, 20, 30)}
    run = tmp_path / "run"
    run.mkdir()
    for step, state in states.items():
        prefix = "net." if step == 10 else "module.net."
        model = {prefix + n: t for n, t in state.items()}
        torch.save(
            {"state_dict": model, "global_step": step, "val_loss": torch.tensor(0.5)}, run / f"s_{step}.pt"
        )
    found = find_run(run, strip_prefix="net.")
    assert [sorted(c.specs()) for c in found.checkpoints] == [["0.bias", "0.weight"]] * 3
    assert [c.notes for c in found.checkpoints][1:] == [
        ["names read without the prefix 'module.' and 'net.'"]
    ] * 2
    text = average(run, tmp_path / "ema.safetensors", "--strip-prefix", "net.", "--include", "0.*")
    averaged = assert_reference(tmp_path / "ema.safetensors", states)
    nn.Sequential(nn.Linear(3, 4)).load_state_dict(averaged)
    assert "val_loss" in text
    assert "matched by --include/--exclude: 0.weight, 0.bias" in " ".join(text.split())


# Side files that are not the model: skipped with a notice, never fatal --------------------------------


def test_side_files_beside_the_run_are_skipped_with_a_notice(tmp_path: Path) -> None:
    """A loss function's state (``nn.CrossEntropyLoss(weight=...)``: one class-weight tensor) and an empty
    state dict (a model-less callback's) saved beside the checkpoints, in the run folder and in a step
    folder."""
    torch.manual_seed(0)
    states = {s: {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)} for s in (100, 200, 300)}
    run = tmp_path / "run"
    for step, state in states.items():
        (run / f"step_{step}").mkdir(parents=True)
        torch.save(state, run / f"step_{step}" / "model.pt")
        torch.save(nn.CrossEntropyLoss(weight=torch.rand(4)).state_dict(), run / f"step_{step}" / "loss.pt")
    torch.save(nn.CrossEntropyLoss(weight=torch.rand(4)).state_dict(), run / "criterion.pt")
    torch.save({}, run / "callback_state.pt")
    found = find_run(run)
    assert [(c.path.name, c.step) for c in found.checkpoints] == [(f"step_{s}", s) for s in states]
    assert (
        f"skipped {run / 'criterion.pt'}: no step, and its tensors (weight) are not the run's model"
        in found.notices
    )
    assert any(n.startswith(f"skipped {run / 'callback_state.pt'}: no model weights") for n in found.notices)
    assert all(c.model.startswith("model") for c in found.checkpoints)  # not the loss's weight
    average(run, tmp_path / "ema.safetensors")
    model = nn.Module()
    model.fc = nn.Linear(3, 4)
    model.load_state_dict(assert_reference(tmp_path / "ema.safetensors", states))


# EMA copies as sibling files: NeMo's exp_manager with EMA writes X.ckpt and X-EMA.ckpt ----------------


def write_nemo_ema_run(folder: Path) -> Path:
    """A real Lightning run with NeMo's EMA save followed from its source: ``NeMoModelCheckpoint.
    _save_checkpoint`` (nemo/utils/callbacks/nemo_model_checkpoint.py) saves the checkpoint, then, inside
    ``EMA.save_ema_model`` (nemo/collections/common/callbacks/ema.py: the averaged parameters swapped into
    the module), saves it again to ``filepath.replace('.ckpt', '-EMA.ckpt')``. NeMo itself does not install
    beside this torch."""
    import lightning as L

    class EMA(L.Callback):
        def __init__(self, decay: float = 0.8) -> None:
            self.decay, self.average = decay, None

        def on_train_batch_end(self, trainer, module, *args) -> None:  # type: ignore[no-untyped-def]
            params = [p.detach() for p in module.parameters()]
            if self.average is None:
                self.average = [p.clone() for p in params]
            for a, p in zip(self.average, params, strict=True):
                a.mul_(self.decay).add_(p, alpha=1 - self.decay)

        def swap(self, module) -> None:  # type: ignore[no-untyped-def]
            for a, p in zip(self.average, module.parameters(), strict=True):
                tmp = p.detach().clone()
                p.data.copy_(a)
                a.copy_(tmp)

    class NeMoModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath: str) -> None:  # type: ignore[no-untyped-def]
            super()._save_checkpoint(trainer, filepath)
            ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
            ema.swap(trainer.lightning_module)  # with ema_callback.save_ema_model(trainer):
            super()._save_checkpoint(
                trainer, filepath.replace(self.FILE_EXTENSION, f"-EMA{self.FILE_EXTENSION}")
            )
            ema.swap(trainer.lightning_module)

    from helpers import write_lightning_run

    return write_lightning_run(folder, callbacks=[EMA()], checkpoint_class=NeMoModelCheckpoint)


@pytest.mark.producers
def test_nemo_ema_sibling_files_are_skipped_or_chosen(tmp_path: Path) -> None:
    run = write_nemo_ema_run(tmp_path / "run")
    raw = sorted(run.glob("*=?.ckpt")) + sorted(run.glob("*=??.ckpt"))
    emas = [p.with_name(p.stem + "-EMA.ckpt") for p in raw]
    assert all(p.is_file() for p in emas) and len(raw) == 3

    def states(paths: list[Path]) -> dict[int, dict[str, torch.Tensor]]:
        loaded = [torch.load(p, weights_only=True) for p in paths]
        return {ckpt["global_step"]: ckpt["state_dict"] for ckpt in loaded}

    found = find_run(run)
    assert [c.path for c in found.checkpoints] == raw
    assert (
        f"skipped {emas[0]}: an average kept beside {raw[0].name} (the EMA); read the averages with --submodel ema"
        in found.notices
    )
    text = average(run, tmp_path / "raw.safetensors")
    assert_reference(tmp_path / "raw.safetensors", states(raw))
    assert "--submodel ema" in text
    assert [c.path for c in find_run(run, submodel="ema").checkpoints] == emas
    average(run, tmp_path / "ema.safetensors", "--submodel", "ema")
    assert_reference(tmp_path / "ema.safetensors", states(emas))
    assert not torch.equal(
        load_file(str(tmp_path / "ema.safetensors"))["net.0.weight"],
        load_file(str(tmp_path / "raw.safetensors"))["net.0.weight"],
    )


# Rank sub-folders: Megatron-LM's legacy save, iter_0000100/mp_rank_00/model_optim_rng.pt ---------------


class MegatronLike(nn.Module):
    """A few of megatron-core GPTModel's names (embedding.word_embeddings, decoder.layers.N.*,
    decoder.final_layernorm, output_layer), for a test: megatron-core does not install beside this torch."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(16, width)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.decoder.final_layernorm = nn.LayerNorm(width)
        self.output_layer = nn.Linear(width, 16, bias=False)


def write_megatron_run(run: Path, iterations: list[int], tp: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """megatron/training/checkpointing.py, legacy (torch) format followed from its source: every rank saves
    ``{args, checkpoint_version, iteration, model, optimizer, opt_param_scheduler, rng_state,
    num_floating_point_operations_so_far}`` to ``iter_{:07d}/mp_rank_{tp:02d}/model_optim_rng.pt``, then rank
    0 writes the tracker ``latest_checkpointed_iteration.txt``; the distributed optimizer's state goes to
    ``distrib_optim.pt`` beside it (flat fp32 buffers per bucket, larger than the model). Each TP rank here saves its own copy (the
    test's ranks are not split)."""
    import argparse
    import random

    import numpy as np

    torch.manual_seed(0)
    model = MegatronLike()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, lr=1e-2)
    states = {}
    for iteration in range(max(iterations) + 1):
        loss = sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if iteration not in iterations:
            continue
        for rank in range(tp):
            state = {
                "args": args,
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "opt_param_scheduler": {"num_steps": iteration, "max_lr": 1e-2},
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {},
                    }
                ],
                "num_floating_point_operations_so_far": 1.0e9 * iteration,
            }
            folder = run / f"iter_{iteration:07d}" / f"mp_rank_{rank:02d}"
            folder.mkdir(parents=True)
            torch.save(state, folder / "model_optim_rng.pt")
            moments = {"param": torch.randn(40), "exp_avg": torch.randn(40), "exp_avg_sq": torch.rand(40)}
            torch.save({0: {(torch.float32, torch.float32): moments}}, folder / "distrib_optim.pt")
        (run / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        states[iteration] = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return states


def test_megatron_legacy_rank_folder_is_read_as_its_step(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints"
    states = write_megatron_run(run, [100, 200, 300])
    found = find_run(run)
    assert [(c.path.name, c.step, c.step_origin) for c in found.checkpoints] == [
        (f"iter_{s:07d}", s, "metadata:iteration") for s in (100, 200, 300)
    ]
    average(run, tmp_path / "ema.safetensors")
    MegatronLike().load_state_dict(assert_reference(tmp_path / "ema.safetensors", states))


def test_megatron_tensor_parallel_ranks_are_refused_in_one_line_or_read_one_by_one(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints"
    states = write_megatron_run(run, [100, 200], tp=2)
    result = run_cli(run, "-o", tmp_path / "ema.safetensors")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "holds 2 model-parallel ranks (mp_rank_00, mp_rank_01)" in line, line
    assert "--submodel mp_rank_00" in line
    average(run, tmp_path / "rank0.safetensors", "--submodel", "mp_rank_00")  # the hint works on this run
    assert_reference(tmp_path / "rank0.safetensors", states)


def test_torchtnt_plan_shows_the_names_selection_flags_match(tmp_path: Path) -> None:
    """torchtnt's DistributedCheckpointSaver: a DCP folder per step (``epoch_0_train_step_N``) of
    ``{"app_state": {"module": ..., "train_progress": ...}}`` (torchtnt/framework/callbacks/dcp_saver.py)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    states = {}
    for step in (4, 8):
        model = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
        progress = {"num_steps_completed": torch.tensor(step), "num_epochs_completed": torch.tensor(0)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(
                {"app_state": {"module": model, "train_progress": progress}},
                checkpoint_id=tmp_path / "run" / f"epoch_0_train_step_{step}",
            )
        states[step] = model
    run = find_run(tmp_path / "run")
    assert (
        "tensor names as read, written and matched by --include/--exclude: fc.weight, fc.bias" in run.notices
    )
    text = average(tmp_path / "run", tmp_path / "ema.safetensors", "--include", "fc.*")
    assert_reference(tmp_path / "ema.safetensors", states)
    assert "fc.weight" in text
