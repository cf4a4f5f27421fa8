"""sentence-transformers checkpoints (checkpoints/layouts/sentence_transformers_folder.py and their folder output).

The run is trained with the real ``SentenceTransformerTrainer`` (a 2-layer BERT of width 16, mean Pooling,
Dense 16 -> 8, Normalize), saving ``checkpoint-N/`` as the library does; the averages are checked against a
float64 average of the tensors read from those files with safetensors, and the folder output is loaded back
with ``SentenceTransformer(DIR)``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ema_average.checkpoints import find_run
from ema_average.cli.app import app
from helpers import float64_reference, hf_offline
from producer_cache import produced

pytestmark = pytest.mark.producers  # sentence-transformers' own Trainer writes the run

STEPS = [2, 4, 6]
DECAY = 0.9
SENTENCES = ["a b c", "d e f g", "g a"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e", "f", "g"]
MODULE_WEIGHTS = {"": "model.safetensors", "2_Dense/": "2_Dense/model.safetensors"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network; the libraries' notices are not ours to see."""
    with hf_offline(monkeypatch):
        yield


def train_run(folder: Path) -> Path:
    """A real SentenceTransformerTrainer run saving checkpoint-2, -4, -6 (BERT + Pooling + Dense + Normalize)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    base = folder / "base"
    base.mkdir(parents=True)
    (base / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(base)
    modules = [Transformer(str(base), max_seq_length=16), Pooling(16), Dense(16, 8), Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu")
    pairs = {
        "anchor": ["a b c", "d e", "f g a", "b b c d"] * 4,
        "positive": ["a b", "e d", "g f", "c d b"] * 4,
    }
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "run"),
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
    )
    loss = losses.MultipleNegativesRankingLoss(model)
    SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(pairs), loss=loss
    ).train()
    return folder / "run"


def write_run(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_run(folder)


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run, from the producer cache (tests/producer_cache.py) when it holds one."""
    sources = ("test_sentence_transformers.py",)
    return produced(request.config, tmp_path_factory, "sentence-transformers", write_run, sources) / "run"


def module_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every module's tensors of a saved model, read with safetensors, named by the module's folder."""
    found = {}
    for prefix, file in MODULE_WEIGHTS.items():
        found.update({prefix + name: t for name, t in load_file(str(checkpoint / file)).items()})
    return found


def ema64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """docs/command.md's rule in float64, one update per checkpoint (helpers.float64_reference)."""
    return float64_reference(states, STEPS, DECAY)


def reference_model(run: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The latest checkpoint with the float64 average's weights written in (as float32): what the output
    must load as, built without the tool."""
    from sentence_transformers import SentenceTransformer

    expected = ema64([module_tensors(run / f"checkpoint-{s}") for s in STEPS])
    folder = tmp_path / "reference"
    shutil.copytree(run / "checkpoint-6", folder)
    for prefix, file in MODULE_WEIGHTS.items():
        names = load_file(str(folder / file))
        save_file({n: expected[prefix + n].float() for n in names}, str(folder / file))
    return SentenceTransformer(str(folder), device="cpu"), expected


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_every_module_is_read_as_one_checkpoint(run: Path) -> None:
    found = find_run(run)
    assert [c.step for c in found.checkpoints] == STEPS
    latest = found.checkpoints[-1]
    assert latest.layout == "sentence-transformers"
    assert set(latest.specs()) == set(module_tensors(run / "checkpoint-6"))
    assert "2_Dense/linear.weight" in latest.specs() and "embeddings.word_embeddings.weight" in latest.specs()
    assert latest.other_models == {}  # its module folders are its own, not other models of the step
    assert not any("2_Dense" in notice for notice in found.notices)
    for ckpt in found.checkpoints:
        ckpt.close()


def test_folder_output_loads_as_the_same_model_with_the_averaged_weights(run: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "avg"
    cli(run, "-o", f"{out}/", "--decay", str(DECAY))
    latest = run / "checkpoint-6"
    for config in [
        "modules.json",
        "config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "tokenizer.json",
    ]:
        assert (out / config).read_bytes() == (latest / config).read_bytes(), config
    assert (out / "3_Normalize").is_dir()
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()

    reference, expected = reference_model(run, tmp_path)
    written = module_tensors(out)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)

    model = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert model.get_sentence_embedding_dimension() == 8
    got = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, reference.encode(SENTENCES, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


def test_file_output_holds_every_module_under_its_folder(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    cli(run, "-o", out, "--decay", str(DECAY))
    _, expected = reference_model(run, tmp_path)
    written = load_file(str(out))
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)


def test_an_earlier_output_is_replaced_and_a_users_folder_is_not(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    cli(run, "-o", f"{out}/", "--method", "uniform")
    cli(run, "-o", f"{out}/", "--decay", str(DECAY), "--overwrite")  # sub-folders of ours: replaced
    _, expected = reference_model(run, tmp_path)
    torch.testing.assert_close(
        module_tensors(out)["2_Dense/linear.weight"].double(), expected["2_Dense/linear.weight"]
    )

    (out / "2_Dense" / "notes.txt").write_text("the user's")
    result = CliRunner().invoke(app, [str(run), "-o", f"{out}/", "--overwrite"])
    assert result.exit_code != 0
    assert "is not an ema-average output (it holds 2_Dense/notes.txt)" in result.output
    assert (out / "2_Dense" / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize("path", ["../outside", "/etc", ".hidden"])
def test_a_module_path_outside_the_model_is_refused(run: Path, tmp_path: Path, path: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    listing = copy / "checkpoint-4" / "modules.json"
    modules = json.loads(listing.read_text())
    modules[2]["path"] = path
    listing.write_text(json.dumps(modules))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, [str(copy), "-o", str(tmp_path / "avg.safetensors")])
    assert result.exit_code != 0
    assert f"modules.json: lists module path {path!r}, not a folder inside the model" in result.output
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_max_shard_size_keeps_each_module_in_the_file_it_loads_from(run: Path, tmp_path: Path) -> None:
    """Dense loads one model.safetensors, never an index: a module saved whole stays whole."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "avg"
    cli(run, "-o", f"{out}/", "--decay", str(DECAY), "--max-shard-size", "256")
    assert sorted(p.name for p in (out / "2_Dense").glob("*.safetensors")) == ["model.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    reference, _ = reference_model(run, tmp_path)
    got = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, reference.encode(SENTENCES, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


def test_a_dense_saved_as_pytorch_model_bin_comes_back_as_safetensors(run: Path, tmp_path: Path) -> None:
    """sentence-transformers before 3 saved a Dense layer with ``torch.save(state_dict, pytorch_model.bin)``."""
    from sentence_transformers import SentenceTransformer

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in STEPS:
        dense = copy / f"checkpoint-{step}" / "2_Dense"
        torch.save(load_file(str(dense / "model.safetensors")), dense / "pytorch_model.bin")
        (dense / "model.safetensors").unlink()
    out = tmp_path / "avg"
    cli(copy, "-o", f"{out}/", "--decay", str(DECAY))
    assert sorted(p.name for p in (out / "2_Dense").iterdir()) == ["config.json", "model.safetensors"]
    reference, expected = reference_model(run, tmp_path)
    written = module_tensors(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)
    got = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, reference.encode(SENTENCES, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


def test_an_output_inside_the_run_is_never_read_back(run: Path, tmp_path: Path) -> None:
    """A sentence-transformers folder output in the run folder, named for a step, is the tool's own."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    inside = copy / "checkpoint-99"
    cli(copy, "-o", f"{inside}/", "--decay", str(DECAY))
    again = tmp_path / "again.safetensors"
    shown = " ".join(cli(copy, "-o", again, "--decay", str(DECAY)).split())
    assert f"note: skipped {inside}: written by ema-average itself" in shown
    expected = ema64([module_tensors(run / f"checkpoint-{s}") for s in STEPS])
    got = load_file(str(again))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=2e-6, atol=2e-7, msg=name)


def refused(copy: Path, tmp_path: Path, *args: str) -> str:
    """The command over ``copy``: refused in one error line, nothing written, every input as it was."""
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, [str(copy), "-o", f"{tmp_path / 'avg'}/", *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "avg").exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    return " ".join(result.output.split())


def test_a_top_tensor_named_into_another_modules_folder_is_refused(run: Path, tmp_path: Path) -> None:
    """A top-level tensor named ``2_Dense/extra`` would be written into (and read back from) the Dense's file."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in STEPS:
        top = copy / f"checkpoint-{step}" / "model.safetensors"
        save_file(load_file(str(top)) | {"2_Dense/extra": torch.ones(3)}, str(top))
    shown = refused(copy, tmp_path)
    assert f"{copy / 'checkpoint-2'}: tensor '2_Dense/extra' lies inside module '2_Dense'" in shown


def test_a_module_path_through_a_link_out_of_the_model_is_refused(run: Path, tmp_path: Path) -> None:
    """``sub/3_Dense`` where ``sub`` links to a folder outside the run: only the last part was checked."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in STEPS:
        checkpoint = copy / f"checkpoint-{step}"
        outside = tmp_path / f"outside-{step}"
        outside.mkdir()
        (checkpoint / "2_Dense").rename(outside / "3_Dense")
        (checkpoint / "sub").symlink_to(outside, target_is_directory=True)
        listing = checkpoint / "modules.json"
        listing.write_text(listing.read_text().replace('"2_Dense"', '"sub/3_Dense"'))
    shown = refused(copy, tmp_path)
    listing = copy / "checkpoint-2" / "modules.json"
    assert (
        f"{listing}: lists module path 'sub/3_Dense', which resolves to {tmp_path / 'outside-2' / '3_Dense'}"
        in shown
    )
    assert "outside the model" in shown


def test_a_module_path_with_an_empty_part_is_refused_naming_modules_json(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in STEPS:
        checkpoint = copy / f"checkpoint-{step}"
        (checkpoint / "a").mkdir()
        (checkpoint / "2_Dense").rename(checkpoint / "a" / "b")
        listing = checkpoint / "modules.json"
        listing.write_text(listing.read_text().replace('"2_Dense"', '"a//b"'))
    shown = refused(copy, tmp_path)
    assert f"{copy / 'checkpoint-2' / 'modules.json'}: lists module path 'a//b', with an empty part" in shown


def test_a_modules_weights_file_linking_out_of_the_model_is_refused(run: Path, tmp_path: Path) -> None:
    """``2_Dense/model.safetensors`` a link to a file outside the run: read through it, another model's
    weights were averaged and written as the Dense's (issue 24)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    for step in STEPS:
        weights = copy / f"checkpoint-{step}" / "2_Dense" / "model.safetensors"
        weights.rename(outside / f"dense-{step}.safetensors")
        weights.symlink_to(outside / f"dense-{step}.safetensors")
    shown = refused(copy, tmp_path)
    dense = copy / "checkpoint-2" / "2_Dense" / "model.safetensors"
    assert f"{dense}: links to {outside / 'dense-2.safetensors'}, outside the model" in shown
    assert "every path a file names resolves inside the run" in shown


def test_a_module_with_weights_in_one_checkpoint_only_is_refused(run: Path, tmp_path: Path) -> None:
    """A module folder that held weights in one checkpoint holds them in all: the run's comparison sees the
    module's tensors, so the output never drops them."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoint-6" / "2_Dense" / "model.safetensors").unlink()
    shown = refused(copy, tmp_path)
    assert f"{copy / 'checkpoint-6'}: has no tensor '2_Dense/linear." in shown
