"""litgpt runs averaged into a folder litgpt loads (output/folder_plan.py's litgpt folder, output/torch_file.py).

The run is reproduced from litgpt 0.5.13's source, not written by litgpt: litgpt cannot be installed beside
the test extra (it pins an older huggingface_hub). ``pretrain.py``'s ``save_checkpoint`` saves
``out/step-{step_count:08d}/lit_model.pth`` with ``fabric.save`` of ``{model, optimizer, iter_num,
step_count}`` (each a state dict or a number) and ``utils.save_config`` writes ``model_config.yaml``
(``yaml.dump(asdict(config))``) beside it; the last save goes to ``out/final/``. The tensor names and shapes
are those of litgpt's ``GPT`` for the config below. That the output loads in litgpt itself was checked by
hand in a separate environment (torch 2.13, litgpt 0.5.13): ``GPT(Config.from_file(DIR /
"model_config.yaml")).load_state_dict(torch.load(DIR / "lit_model.pth"))`` matched every key, as did
``litgpt.utils.lazy_load``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from ema_average.checkpoints.safetensors_format import TensorEntry, TensorSpec
from ema_average.cli.app import app
from ema_average.errors import OutputError
from ema_average.output.torch_file import TorchFileWriter
from helpers import float64_reference

STEPS = [2, 4, 6]
DECAY = 0.9
CONFIG = {  # part of what litgpt's save_config writes for this model; yaml.dump sorts the keys
    "name": "tiny",
    "block_size": 16,
    "vocab_size": 32,
    "padded_vocab_size": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 16,
    "n_query_groups": 2,
    "intermediate_size": 32,
    "mlp_class_name": "LLaMAMLP",
    "norm_class_name": "RMSNorm",
    "bias": False,
}


def gpt_shapes() -> dict[str, tuple[int, ...]]:
    """litgpt's GPT state dict for CONFIG (lm_head and wte untied), in its order."""
    shapes: dict[str, tuple[int, ...]] = {"lm_head.weight": (32, 16), "transformer.wte.weight": (32, 16)}
    for i in range(2):
        block = f"transformer.h.{i}."
        shapes |= {
            block + "norm_1.weight": (16,),
            block + "attn.qkv.weight": (48, 16),
            block + "attn.proj.weight": (16, 16),
            block + "norm_2.weight": (16,),
            block + "mlp.fc_1.weight": (32, 16),
            block + "mlp.fc_2.weight": (32, 16),
            block + "mlp.proj.weight": (16, 32),
        }
    return shapes | {"transformer.ln_f.weight": (16,)}


def write_litgpt_run(out: Path, *, configs_in_steps: bool = True) -> list[dict[str, torch.Tensor]]:
    """``out/step-0000000N/`` and ``out/final/`` as litgpt's pretrain saves them; the model states, oldest first."""
    states = []
    g = torch.Generator().manual_seed(0)
    for step in STEPS:
        model = {name: torch.randn(shape, generator=g) for name, shape in gpt_shapes().items()}
        params = [torch.nn.Parameter(t.clone()) for t in model.values()]
        optimizer = torch.optim.AdamW(params)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        for folder in [out / f"step-{step:08d}"] + ([out / "final"] if step == STEPS[-1] else []):
            folder.mkdir(parents=True)
            state = {
                "model": model,
                "optimizer": optimizer.state_dict(),
                "iter_num": step,
                "step_count": step,
            }
            torch.save(state, folder / "lit_model.pth")
            if configs_in_steps or folder.name == "final":
                (folder / "model_config.yaml").write_text(yaml.dump(CONFIG | {"n_step_note": folder.name}))
        states.append(model)
    return states


def ema64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """docs/command.md's rule in float64, one update per checkpoint (helpers.float64_reference)."""
    return float64_reference(states, STEPS, DECAY)


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_folder_output_is_what_litgpt_loads(tmp_path: Path) -> None:
    states = write_litgpt_run(tmp_path / "out")
    avg = tmp_path / "avg"
    shown = cli(tmp_path / "out", "-o", f"{avg}/", "--decay", str(DECAY))
    assert "lit_model.pth + model_config.yaml" in shown
    assert {p.name for p in avg.iterdir()} == {"lit_model.pth", "model_config.yaml", "ema_average.json"}
    latest = tmp_path / "out" / "step-00000006"
    assert (avg / "model_config.yaml").read_bytes() == (latest / "model_config.yaml").read_bytes()

    loaded = torch.load(avg / "lit_model.pth", weights_only=True)
    assert type(loaded) is dict and list(loaded) == list(gpt_shapes())  # the plain state dict, litgpt's order
    expected = ema64(states)
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].shape == tensor.shape
        torch.testing.assert_close(loaded[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)
    with zipfile.ZipFile(avg / "lit_model.pth") as archive:
        assert archive.testzip() is None  # every record's CRC right: a valid zip, not only one torch reads
    metadata = json.loads((avg / "ema_average.json").read_text())["metadata"]
    assert metadata["ema_average_version"] and "step-00000006" in metadata.values().__repr__()


def test_model_config_comes_from_final_when_the_steps_have_none(tmp_path: Path) -> None:
    write_litgpt_run(tmp_path / "out", configs_in_steps=False)
    avg = tmp_path / "avg"
    cli(tmp_path / "out", "-o", f"{avg}/", "--method", "uniform")
    final = tmp_path / "out" / "final" / "model_config.yaml"
    assert (avg / "model_config.yaml").read_bytes() == final.read_bytes()


def test_an_earlier_output_is_replaced_and_a_users_folder_is_not(tmp_path: Path) -> None:
    states = write_litgpt_run(tmp_path / "out")
    avg = tmp_path / "avg"
    cli(tmp_path / "out", "-o", f"{avg}/", "--method", "uniform")
    cli(tmp_path / "out", "-o", f"{avg}/", "--decay", str(DECAY), "--overwrite")
    loaded = torch.load(avg / "lit_model.pth", weights_only=True)
    torch.testing.assert_close(loaded["lm_head.weight"].double(), ema64(states)["lm_head.weight"])

    users = tmp_path / "users"
    users.mkdir()
    torch.save({"w": torch.ones(2)}, users / "lit_model.pth")  # no ema_average.json: not ours
    result = CliRunner().invoke(app, [str(tmp_path / "out"), "-o", f"{users}/", "--overwrite"])
    assert result.exit_code != 0 and "is not an ema-average output (it holds lit_model.pth)" in result.output
    assert torch.equal(torch.load(users / "lit_model.pth", weights_only=True)["w"], torch.ones(2))


def test_torch_file_writer_takes_pieces_in_any_order_from_threads(tmp_path: Path) -> None:
    tensors = {
        "big": torch.randn(64, 33),
        "empty": torch.empty(0, 4),
        "count": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(5, dtype=torch.bfloat16),
    }
    entries = [TensorEntry(n, TensorSpec(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    writer = TorchFileWriter(tmp_path / "w.pth", entries)
    flat = tensors["big"].reshape(-1)
    pieces = [(start, flat[start : start + 100]) for start in range(0, flat.numel(), 100)]
    threads = [threading.Thread(target=writer.write_range, args=("big", s, p)) for s, p in reversed(pieces)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ["half", "count", "empty"]:
        writer.write(name, tensors[name])
    writer.commit()
    loaded = torch.load(tmp_path / "w.pth", weights_only=True)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with zipfile.ZipFile(tmp_path / "w.pth") as archive:
        assert archive.testzip() is None


def test_torch_file_writer_refuses_what_was_not_planned_and_an_unfinished_file(tmp_path: Path) -> None:
    entries = [
        TensorEntry("a", TensorSpec((4,), torch.float32)),
        TensorEntry("b", TensorSpec((2,), torch.float32)),
    ]
    writer = TorchFileWriter(tmp_path / "w.pth", entries)
    with pytest.raises(OutputError, match="tensor 'c' is not expected"):
        writer.write("c", torch.zeros(1))
    with pytest.raises(OutputError, match="do not fit"):
        writer.write_range("a", 3, torch.zeros(2))
    writer.write("a", torch.ones(4))
    with pytest.raises(OutputError, match="1 tensors were never written"):
        writer.commit()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def write_lora_run(out: Path) -> list[dict[str, torch.Tensor]]:
    """finetune/lora.py's ``save_lora_checkpoint``: ``step-00000N/lit_model.pth.lora`` = ``torch.save({"model":
    lora weights})``, with ``hyperparameters.yaml`` (merge_lora reads the LoRA settings there) beside it."""
    states = []
    for step in STEPS:
        folder = out / f"step-{step:06d}"
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(step)
        lora = {"transformer.h.0.attn.qkv.lora_A": torch.randn(4, 16, generator=g)}
        lora["transformer.h.0.attn.qkv.lora_B"] = torch.randn(48, 4, generator=g)
        torch.save({"model": lora}, folder / "lit_model.pth.lora")
        (folder / "model_config.yaml").write_text(yaml.dump(CONFIG))
        (folder / "hyperparameters.yaml").write_text(yaml.dump({"lora_r": 4, "step": step}))
        states.append(lora)
    return states


def test_a_lora_run_gives_the_adapter_file_merge_lora_reads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    states = write_lora_run(out)
    avg = tmp_path / "avg"
    cli(out, "-o", f"{avg}/", "--decay", str(DECAY))
    names = {"lit_model.pth.lora", "model_config.yaml", "hyperparameters.yaml", "ema_average.json"}
    assert {p.name for p in avg.iterdir()} == names
    latest = out / "step-000006"
    for side in ["model_config.yaml", "hyperparameters.yaml"]:
        assert (avg / side).read_bytes() == (latest / side).read_bytes()
    loaded = torch.load(avg / "lit_model.pth.lora", weights_only=True)
    for name, tensor in ema64(states).items():
        torch.testing.assert_close(loaded[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["lit_model.pth", "lit_model.pth.lora"])
def test_an_output_inside_the_run_is_never_read_back(tmp_path: Path, lora: bool) -> None:
    """A litgpt folder output carries no safetensors metadata: its ``ema_average.json`` marks it. Named for
    a step (step-00000099-avg) it was averaged in at step 99."""
    out = tmp_path / "out"
    states = write_lora_run(out) if lora else write_litgpt_run(out)
    inside = out / "step-00000099-avg"
    cli(out, "-o", f"{inside}/", "--decay", str(DECAY))
    again = tmp_path / "again.safetensors"
    shown = " ".join(cli(out, "-o", again, "--decay", str(DECAY)).split())
    assert f"note: skipped {inside}: written by ema-average itself" in shown
    assert "step-00000099-avg │" not in shown  # not a row of the plan
    got = load_file(str(again))
    expected = ema64(states)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)


def replace_refused(out: Path, avg: Path) -> str:
    """``-o avg/ --overwrite`` in a child: refused in one line, ``avg`` left as it was. A child that blocks
    (opening a FIFO waits for a writer) is let go by opening the FIFO's other end, and the test fails."""
    before = sorted(p.name for p in avg.iterdir())
    exe = Path(sys.executable).parent / "ema-average"
    child = subprocess.Popen(
        [exe, out, "-o", f"{avg}/", "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = child.communicate(timeout=120)  # only ends a hang: a refusal opens nothing that blocks
    except subprocess.TimeoutExpired:
        os.close(os.open(avg / "ema_average.json", os.O_WRONLY | os.O_NONBLOCK))
        child.communicate()
        pytest.fail("the run blocked opening ema_average.json (a FIFO) instead of refusing the folder")
    lines = stderr.strip().splitlines()
    assert child.returncode == 1 and len(lines) == 1, stderr
    assert sorted(p.name for p in avg.iterdir()) == before
    return lines[0]


@pytest.mark.subprocess
def test_a_fifo_marker_in_the_folder_to_replace_is_refused_without_blocking(tmp_path: Path) -> None:
    write_litgpt_run(tmp_path / "out")
    avg = tmp_path / "avg"
    cli(tmp_path / "out", "-o", f"{avg}/", "--method", "uniform")
    (avg / "ema_average.json").unlink()
    os.mkfifo(avg / "ema_average.json")
    line = replace_refused(tmp_path / "out", avg)
    assert f"{avg}: is not an ema-average output (ema_average.json is not a plain file)" in line


@pytest.mark.subprocess
def test_a_deeply_nested_marker_in_the_folder_to_replace_is_one_line(tmp_path: Path) -> None:
    write_litgpt_run(tmp_path / "out")
    avg = tmp_path / "avg"
    cli(tmp_path / "out", "-o", f"{avg}/", "--method", "uniform")
    (avg / "ema_average.json").write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    line = replace_refused(tmp_path / "out", avg)
    assert f"{avg}: is not an ema-average output (it holds ema_average.json)" in line
    assert "RecursionError" not in line
