"""Folder outputs that the producing library's ``from_pretrained`` loads as they are (output/folder_plan.py).

Runs are written with the real producers (transformers, PEFT, diffusers ``save_pretrained``) and the
averages loaded back with the real consumers, against an independent float64 average of the same tensors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ema_average.checkpoints.contents.keys import LOADER_FILES
from ema_average.cli.app import app
from ema_average.errors import CheckpointError, ConfigurationError, OutputError
from ema_average.offline.options import RunOptions
from ema_average.offline.plan import AverageSettings
from ema_average.offline.run import average_checkpoints, prepare
from ema_average.output import folder_plan as output_folder
from helpers import hf_offline, tiny_gpt2, tiny_unet

VOCAB = 12  # the tiny tokenizer's words

STEPS = [2, 4, 6]
UNIFORM = AverageSettings(method="uniform")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test here may reach the network, and the producers' notices are not ours to see; for this test
    only. huggingface_hub reads the variables once, when first imported: its constant is set too."""
    with hf_offline(monkeypatch):
        yield


# --- Independent oracles ----------------------------------------------------------------------------


def ema64(states: list[dict[str, torch.Tensor]], steps: list[int], decay: float) -> dict[str, torch.Tensor]:
    """docs/command.md's rule, one update per checkpoint: d = min(decay, (1 + step) / (10 + step))."""
    average = {name: t.double() for name, t in states[0].items()}
    for state, step in zip(states[1:], steps[1:], strict=True):
        d = min(decay, (1 + step) / (10 + step))
        average = {name: d * average[name] + (1 - d) * state[name].double() for name in average}
    return average


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: sum(s[name].double() for s in states) / len(states) for name in states[0]}  # type: ignore[misc]


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal within float32 rounding of the float64 result."""
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=2e-6, atol=2e-7)


def cli(*args: str | Path) -> str:
    """The command in this process; its output (plan and summary), failing the test on a non-zero exit."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def nothing_written(tmp_path: Path, kept: set[str]) -> bool:
    """Only the inputs are there: no output, no staging folder."""
    return files(tmp_path) == kept


# --- Producers --------------------------------------------------------------------------------------


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level tokenizer built offline with ``tokenizers``, wrapped as transformers saves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def write_gpt2_run(run: Path, *, shard: str | None = None) -> list[dict[str, torch.Tensor]]:
    """``checkpoint-N/`` as the HF Trainer saves them: weights, configs, tokenizer, trainer files."""
    states = []
    tokenizer = tiny_tokenizer()
    for step in STEPS:
        folder = run / f"checkpoint-{step}"
        model = tiny_gpt2(step, vocab_size=VOCAB)
        model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        (folder / "notes.txt").write_text("not a side file")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder, sharded or not."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def write_hf_like_run(run: Path, side: dict[str, bytes]) -> list[dict[str, torch.Tensor]]:
    """A cheap ``checkpoint-N/model.safetensors`` run (no library needed) with the given side files."""
    states = []
    for step in STEPS:
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(step))}
        save_file(state, str(folder / "model.safetensors"))
        for name, data in side.items():
            (folder / name).write_bytes(data)
        states.append(state)
    return states


# --- transformers -----------------------------------------------------------------------------------


def test_transformers_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    states = write_gpt2_run(tmp_path / "run")
    out = tmp_path / "avg"
    shown = cli(tmp_path / "run", "-o", f"{out}/", "--decay", "0.9")
    assert "model.safetensors + config.json, generation_config.json, tokenizer.json" in shown
    latest = tmp_path / "run" / "checkpoint-6"
    copied = {"config.json", "generation_config.json"} | TOKENIZER_FILES
    assert copied <= files(latest)
    assert files(out) == {"model.safetensors"} | (files(latest) & set(LOADER_FILES))
    for name in files(out) - {"model.safetensors"}:
        assert (out / name).read_bytes() == (latest / name).read_bytes(), name

    model = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(str(latest / "model.safetensors"))
    expected = ema64([{n: s[n] for n in saved} for s in states], STEPS, 0.9)
    assert_close({n: t for n, t in model.state_dict().items() if n in saved}, expected)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # tied again by the library
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("the cat sat")["input_ids"] == [2, 3, 4]


def test_sharded_input_gives_shards_and_index_that_load(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    write_gpt2_run(tmp_path / "run", shard="10KB")
    inputs = [saved_weights(tmp_path / "run" / f"checkpoint-{s}") for s in STEPS]
    latest = tmp_path / "run" / "checkpoint-6"
    assert (latest / "model.safetensors.index.json").is_file()
    out = tmp_path / "avg"
    average_checkpoints(RunOptions(tmp_path / "run", out, settings=UNIFORM))
    assert (out / "model.safetensors.index.json").is_file()
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_close({n: t for n, t in model.state_dict().items() if n in inputs[0]}, mean64(inputs))


def test_max_shard_size_shards_an_unsharded_input(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    states = write_gpt2_run(tmp_path / "run")
    out = tmp_path / "avg"
    average_checkpoints(RunOptions(tmp_path / "run", out, settings=UNIFORM, max_shard_size=8000))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and "config.json" in files(out)
    saved = load_file(str(tmp_path / "run" / "checkpoint-6" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = mean64([{n: s[n] for n in saved} for s in states])
    assert_close({n: t for n, t in model.state_dict().items() if n in saved}, expected)


# --- PEFT -------------------------------------------------------------------------------------------


@pytest.mark.producers
def test_peft_adapter_folder_loads_with_peft_model(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    run = tmp_path / "run"
    for step in STEPS:
        torch.manual_seed(100 + step)  # random A and B: every checkpoint's adapter differs
        config = LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0, init_lora_weights=False)
        get_peft_model(tiny_gpt2(0, vocab_size=VOCAB), config).save_pretrained(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    out = tmp_path / "adapter-avg"
    average_checkpoints(RunOptions(run, out, settings=UNIFORM))
    latest = run / "checkpoint-6"
    assert files(out) == {"adapter_model.safetensors", "adapter_config.json"}
    assert (out / "adapter_config.json").read_bytes() == (latest / "adapter_config.json").read_bytes()

    loaded = PeftModel.from_pretrained(tiny_gpt2(0, vocab_size=VOCAB), out)
    inputs = [load_file(str(run / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in STEPS]
    assert_close(get_peft_model_state_dict(loaded), mean64(inputs))


# --- diffusers --------------------------------------------------------------------------------------


def unet_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.producers
def test_diffusers_save_pretrained_run_loads_with_from_pretrained(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    run = tmp_path / "run"
    states = []
    for step in STEPS:
        unet = tiny_unet(step)
        unet.save_pretrained(run / f"step_{step}")
        states.append(unet_state(unet))
    out = tmp_path / "unet-avg"
    average_checkpoints(RunOptions(run, out, settings=UNIFORM))
    assert files(out) == {"diffusion_pytorch_model.safetensors", "config.json"}
    assert_close(unet_state(UNet2DModel.from_pretrained(out)), mean64(states))


@pytest.mark.producers
def test_diffusers_training_checkpoint_reads_unet_and_copies_its_config(tmp_path: Path) -> None:
    """``checkpoint-N/unet/`` + ``unet_ema/`` (diffusers training scripts): the raw unet is averaged and
    written with unet/'s config; ``--submodel unet_ema`` takes unet_ema/'s."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    run = tmp_path / "run"
    raw, emas = [], []
    for step in STEPS:
        unet = tiny_unet(step)
        ema = EMAModel(unet.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=unet.config)
        ema.optimization_step = step
        with torch.no_grad():
            for p in ema.shadow_params:
                p.mul_(0.5)
        unet.save_pretrained(run / f"checkpoint-{step}" / "unet")
        ema.save_pretrained(str(run / f"checkpoint-{step}" / "unet_ema"))
        raw.append(unet_state(unet))
        emas.append(
            load_file(str(run / f"checkpoint-{step}" / "unet_ema" / "diffusion_pytorch_model.safetensors"))
        )
    out = tmp_path / "unet-avg"
    shown = cli(run, "-o", out, "--method", "uniform")
    assert "diffusion_pytorch_model.safetensors + config.json" in shown and "unet" in shown
    assert files(out) == {"diffusion_pytorch_model.safetensors", "config.json"}
    latest = run / "checkpoint-6"
    assert (out / "config.json").read_bytes() == (latest / "unet" / "config.json").read_bytes()
    assert_close(unet_state(UNet2DModel.from_pretrained(out)), mean64(raw))

    ema_out = tmp_path / "unet-ema-avg"
    average_checkpoints(RunOptions(run, ema_out, settings=UNIFORM, submodel="unet_ema"))
    assert (ema_out / "config.json").read_bytes() == (latest / "unet_ema" / "config.json").read_bytes()
    loaded = load_file(str(ema_out / "diffusion_pytorch_model.safetensors"))
    assert_close(loaded, mean64(emas))


# --- What is copied, from where ---------------------------------------------------------------------


def test_inputs_with_no_hf_name_give_a_bare_model_safetensors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    states = []
    for step in STEPS:
        state = {"w": torch.randn(5, generator=torch.Generator().manual_seed(step))}
        torch.save({"model": state, "step": step}, run / f"ckpt_{step}.pt")
        (run / "config.json").write_text("{}")  # beside the files, not a model folder: not copied
        states.append(state)
    average_checkpoints(RunOptions(run, tmp_path / "out", settings=UNIFORM))
    assert files(tmp_path / "out") == {"model.safetensors"}
    assert_close(load_file(str(tmp_path / "out" / "model.safetensors")), mean64(states))


def test_pytorch_model_bin_is_written_as_model_safetensors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    states = []
    for step in STEPS:
        (run / f"checkpoint-{step}").mkdir(parents=True)
        state = {"w": torch.randn(3, generator=torch.Generator().manual_seed(step))}
        torch.save(state, run / f"checkpoint-{step}" / "pytorch_model.bin")
        (run / f"checkpoint-{step}" / "config.json").write_text(f'{{"step": {step}}}')
        states.append(state)
    average_checkpoints(RunOptions(run, tmp_path / "out", settings=UNIFORM))
    assert files(tmp_path / "out") == {"model.safetensors", "config.json"}
    assert (tmp_path / "out" / "config.json").read_text() == '{"step": 6}'
    assert_close(load_file(str(tmp_path / "out" / "model.safetensors")), mean64(states))


def test_adapter_config_is_not_copied_beside_full_weights(tmp_path: Path) -> None:
    """transformers would load an adapter instead of the weights it finds beside an adapter_config.json."""
    side = {"config.json": b"{}", "adapter_config.json": b"{}", "optimizer.pt": b"x"}
    states = write_hf_like_run(tmp_path / "run", side)
    for step in STEPS:
        save_file(
            {"a": torch.ones(2)}, str(tmp_path / "run" / f"checkpoint-{step}" / "adapter_model.safetensors")
        )
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "out", settings=UNIFORM))
    assert files(tmp_path / "out") == {"model.safetensors", "config.json"}
    assert_close(load_file(str(tmp_path / "out" / "model.safetensors")), mean64(states))


def test_safetensors_output_is_still_one_file(tmp_path: Path) -> None:
    states = write_hf_like_run(tmp_path / "run", {"config.json": b"{}"})
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "o.safetensors", settings=UNIFORM))
    average_checkpoints(RunOptions(tmp_path / "run", settings=UNIFORM))
    for file in (tmp_path / "o.safetensors", tmp_path / "run-ema.safetensors"):
        assert file.is_file()
        assert_close(load_file(str(file)), mean64(states))
    assert prepare(RunOptions(tmp_path / "run", tmp_path / "x.safetensors")).folder is None


def test_several_averages_give_several_folders(tmp_path: Path) -> None:
    states = write_hf_like_run(tmp_path / "run", {"config.json": b'{"a": 1}'})
    sweep = [AverageSettings(decay=0.5), AverageSettings(decay=0.9)]
    summary = average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "out", settings=sweep))
    for decay in (0.5, 0.9):
        folder = tmp_path / f"out-decay{decay}"
        assert files(folder) == {"model.safetensors", "config.json"}
        assert folder / "config.json" in summary.outputs
        assert_close(load_file(str(folder / "model.safetensors")), ema64(states, STEPS, decay))


def test_folder_replaced_only_with_overwrite_and_only_if_ours(tmp_path: Path) -> None:
    write_hf_like_run(tmp_path / "run", {"config.json": b'{"v": 1}', "tokenizer.json": b"{}"})
    out = tmp_path / "out"
    average_checkpoints(RunOptions(tmp_path / "run", out))
    with pytest.raises(OutputError, match="--overwrite"):
        average_checkpoints(RunOptions(tmp_path / "run", out))
    (tmp_path / "run" / "checkpoint-6" / "tokenizer.json").unlink()
    average_checkpoints(RunOptions(tmp_path / "run", out, overwrite=True))
    assert files(out) == {"model.safetensors", "config.json"}  # the earlier output's tokenizer.json went too

    mine = tmp_path / "mine"
    mine.mkdir()
    save_file({"w": torch.zeros(4, 3)}, str(mine / "model.safetensors"))
    (mine / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="not an ema-average output"):
        average_checkpoints(RunOptions(tmp_path / "run", mine, overwrite=True))
    assert files(mine) == {"model.safetensors", "config.json"}


def test_resume_and_watch_refuse_a_folder_in_one_line(tmp_path: Path) -> None:
    from ema_average.offline.watch import watch

    write_hf_like_run(tmp_path / "run", {})
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "e.safetensors"))
    with pytest.raises(ConfigurationError, match=r"--resume continues a single \.safetensors file"):
        prepare(RunOptions(tmp_path / "run", tmp_path / "out", resume=tmp_path / "e.safetensors"))
    with pytest.raises(ConfigurationError, match=r"--watch refreshes a single \.safetensors file"):
        watch(RunOptions(tmp_path / "run", tmp_path / "out"), poll=1.0, on_refresh=print, on_notice=print)


# --- Untrusted side files ---------------------------------------------------------------------------


def assert_refused(tmp_path: Path, match: str) -> None:
    """Refused in one line naming the side file, before anything is written."""
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match=match) as caught:
        average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "out"))
    assert "\n" not in str(caught.value)
    assert str(tmp_path / "run" / "checkpoint-6") in str(caught.value)
    assert nothing_written(tmp_path, before)


def test_side_file_linking_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    write_hf_like_run(tmp_path / "run", {"config.json": b"{}"})
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (tmp_path / "run" / "checkpoint-6" / "tokenizer.json").symlink_to(secret)
    assert_refused(tmp_path, r"tokenizer\.json: links to .*secret\.txt, outside the checkpoint")


def test_side_file_linking_inside_the_checkpoint_is_copied(tmp_path: Path) -> None:
    write_hf_like_run(tmp_path / "run", {"config.json": b'{"x": 2}'})
    (tmp_path / "run" / "checkpoint-6" / "generation_config.json").symlink_to("config.json")
    average_checkpoints(RunOptions(tmp_path / "run", tmp_path / "out"))
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == b'{"x": 2}'
    assert not (tmp_path / "out" / "generation_config.json").is_symlink()


def test_side_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    write_hf_like_run(tmp_path / "run", {"config.json": b"{}"})
    fifo = tmp_path / "run" / "checkpoint-6" / "tokenizer.json"
    os.mkfifo(fifo)
    failure: list[BaseException] = []

    def refuse() -> None:
        try:
            assert_refused(tmp_path, r"tokenizer\.json: is not a regular file .* copied as side files")
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)

    run = threading.Thread(target=refuse, daemon=True)
    run.start()
    run.join(120)  # only ends a hang: a refusal opens nothing
    if run.is_alive():  # blocked opening the FIFO for reading: a writer lets it go, and the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        run.join()
        pytest.fail(f"{fifo.name}: opened (it blocks until a writer comes) instead of refused")
    if failure:
        raise failure[0]


def test_side_file_larger_than_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_hf_like_run(tmp_path / "run", {"config.json": b"{}", "vocab.txt": b"x" * 2048})
    monkeypatch.setattr(output_folder, "MAX_SIDE_FILE_BYTES", 1024)
    assert_refused(tmp_path, r"vocab\.txt: is larger than")


# --- Several weights files (sentence-transformers modules, litgpt) -----------------------------------


def test_a_folder_of_several_weights_files_routes_each_tensor_by_its_prefix(tmp_path: Path) -> None:
    from ema_average.output import ShardedWriter, TensorEntry, TensorSpec
    from ema_average.output.folder import WeightsFile

    tensors = {
        "emb.weight": torch.randn(6, 4),
        "2_Dense/linear.weight": torch.randn(2, 4),
        "2_Dense/b": torch.ones(2),
    }
    entries = [TensorEntry(n, TensorSpec(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    layout = [WeightsFile(), WeightsFile(folder="2_Dense", prefix="2_Dense/")]
    meta = {"ema_average_version": "test"}
    for overwrite in (False, True):  # the second replaces the first: its sub-folders are ours
        writer = ShardedWriter(
            tmp_path / "out",
            entries,
            meta,
            overwrite=overwrite,
            max_shard_size=2**30,
            weights=layout,
            folders=["3_Normalize"],
            side_files=["1_Pooling/config.json"],  # declared up front, as a replacing writer must
        )
        for name, tensor in tensors.items():
            writer.write(name, tensor * (2 if overwrite else 1))
        writer.add_file("1_Pooling/config.json", b"{}")
        writer.commit()
    out = tmp_path / "out"
    assert load_file(str(out / "model.safetensors")).keys() == {"emb.weight"}
    dense = load_file(str(out / "2_Dense" / "model.safetensors"))
    assert torch.equal(dense["linear.weight"], tensors["2_Dense/linear.weight"] * 2) and set(dense) == {
        "linear.weight",
        "b",
    }
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"{}" and (out / "3_Normalize").is_dir()
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # no staging folder left


def test_a_folder_output_keeps_every_name_inside_it(tmp_path: Path) -> None:
    from ema_average.output import ShardedWriter, TensorEntry, TensorSpec
    from ema_average.output.folder import WeightsFile

    entries = [TensorEntry("2_Dense/w", TensorSpec((2,), torch.float32))]
    with pytest.raises(OutputError, match="tensor '2_Dense/w' belongs to none of the output's weights files"):
        ShardedWriter(
            tmp_path / "o",
            entries,
            None,
            overwrite=False,
            max_shard_size=64,
            weights=[WeightsFile(folder="x", prefix="x/")],
        )
    with pytest.raises(OutputError, match="not a plain relative name"):
        ShardedWriter(
            tmp_path / "o",
            entries,
            None,
            overwrite=False,
            max_shard_size=64,
            weights=[WeightsFile(folder="../up")],
        )
    writer = ShardedWriter(tmp_path / "o", entries, None, overwrite=False, max_shard_size=64)
    for name in ["../escape.json", "a/../../b.json", ".hidden/config.json", "sub/model.safetensors"]:
        with pytest.raises(OutputError, match="cannot be a side file"):
            writer.add_file(name, b"{}")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_an_output_inside_the_run_is_never_read_back(tmp_path: Path) -> None:
    """A transformers folder output (weights, config, tokenizer) named for a step of the run, inside it
    (a sharded one: test_discover)."""
    states = write_hf_like_run(tmp_path / "run", {"config.json": b"{}", "tokenizer.json": b"{}"})
    inside = tmp_path / "run" / "checkpoint-99"
    cli(tmp_path / "run", "-o", f"{inside}/", "--method", "uniform")
    assert files(inside) == {"model.safetensors", "config.json", "tokenizer.json"}
    shown = " ".join(cli(tmp_path / "run", "-o", tmp_path / "again", "--method", "uniform").split())
    assert f"note: skipped {inside}: written by ema-average itself" in shown
    assert_close(saved_weights(tmp_path / "again"), mean64(states))


SPARSE = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"]
_RSS_CHILD = """
import resource, sys
from pathlib import Path
from ema_average.offline.run import average_checkpoints
from ema_average.offline.options import RunOptions

def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

small, big, out = map(Path, sys.argv[1:])
average_checkpoints(RunOptions(small, out / "small"))  # the same work with small side files: the baseline
before = peak()
average_checkpoints(RunOptions(big, out / "big"))
print(before, peak())
"""


def sparse_side_files(folder: Path, names: list[str]) -> None:
    """64 MiB side files (the cap each) that take a few KiB on disk."""
    for name in names:
        with open(folder / name, "wb") as f:
            f.write(b'{"start": 1}')
            f.truncate(output_folder.MAX_SIDE_FILE_BYTES)


@pytest.mark.subprocess
def test_side_files_are_copied_without_being_held_in_memory(tmp_path: Path) -> None:
    """Three sparse 64 MiB side files: copied a block at a time, not all held at once (+192 MiB of peak)."""
    import subprocess
    import sys

    write_hf_like_run(tmp_path / "small", {"config.json": b"{}"})
    write_hf_like_run(tmp_path / "big", {"config.json": b"{}"})
    sparse_side_files(tmp_path / "big" / "checkpoint-6", SPARSE[:3])
    out = tmp_path / "outputs"
    out.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, tmp_path / "small", tmp_path / "big", out],
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr
    before, after = map(int, child.stdout.split())
    copied = out / "big" / "tokenizer.json"
    assert copied.stat().st_size == output_folder.MAX_SIDE_FILE_BYTES
    with open(copied, "rb") as f:
        assert f.read(12) == b'{"start": 1}'
    assert after - before < 32 * 2**20, f"peak RSS grew by {(after - before) / 2**20:.0f} MiB"


def test_side_files_larger_together_than_the_bound_are_refused(tmp_path: Path) -> None:
    """Five sparse 64 MiB side files (320 MiB) pass the bound on all of them together (256 MiB)."""
    write_hf_like_run(tmp_path / "run", {"config.json": b"{}"})
    sparse_side_files(tmp_path / "run" / "checkpoint-6", SPARSE)
    assert_refused(tmp_path, "holds side files larger than 256 MiB together; a folder output copies no more")


def _small_files() -> None:
    """In the child: files of at most 64 KiB (as a nearly full disk allows), refused with EFBIG, not a signal."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))


@pytest.mark.subprocess
def test_a_folder_output_that_cannot_be_written_is_named_not_its_staging_file(tmp_path: Path) -> None:
    """The error names the output the user gave (the staging folder is hidden and gone after the failure)."""
    import subprocess
    import sys

    for step in STEPS:
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.full((40_000,), float(step))}, str(folder / "model.safetensors"))
    out = tmp_path / "avg"
    exe = Path(sys.executable).parent / "ema-average"
    child = subprocess.run(
        [exe, tmp_path / "run", "-o", f"{out}/"], capture_output=True, text=True, preexec_fn=_small_files
    )
    lines = child.stderr.strip().splitlines()
    assert child.returncode == 1 and len(lines) == 1, child.stderr
    assert f"error: {out}: cannot write model.safetensors (File too large); nothing was replaced" in lines[0]
    assert files(tmp_path) == {"run"}  # no output, no staging folder


def test_a_full_disk_is_said_as_such() -> None:
    import errno

    from ema_average.output.folder import _reason

    assert _reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "the disk is full"
    assert _reason(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))) == "the disk is full"
