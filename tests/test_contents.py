"""What a checkpoint holds: one rule tells model, averages, optimizer, scheduler and trainer state apart.

The trees below are the shapes trainers save, written out from their source (no trainer is imported):
Lightning's ``.ckpt`` (``lightning/pytorch/trainer/connectors/checkpoint_connector.py``), timm's
``CheckpointSaver`` (``timm/utils/checkpoint_saver.py``), torchtitan's DCP step folders
(``torchtitan/components/checkpoint.py``: model flattened to the top level beside ``optimizer``,
``lr_scheduler``, ``train_state``, ``dataloader``), torchtnt's ``DistributedCheckpointSaver``
(``app_state.{module, optimizer, train_progress}``), and a VQ model whose codebook module is called ``ema``.
Each test states the split a person reading the file would make.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ema_average.checkpoints.contents.parts import KeyPath, split, structure_of


def torch_paths(obj: Mapping[str, Any], path: KeyPath = ()) -> Iterator[tuple[KeyPath, str]]:
    """A nested torch dict as paths of keys; list items under their index; every tensor a string here."""
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
    for key, value in items:
        if isinstance(value, Mapping | list):
            yield from torch_paths(value, (*path, str(key)))
        elif value == "T":
            yield (*path, str(key)), "T"


def torch_structure(obj: Any, path: KeyPath = ()) -> dict[KeyPath, Any]:
    found: dict[KeyPath, Any] = {}
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, list) else ()
    if isinstance(obj, Mapping) and (kind := structure_of(obj)) is not None:
        found[path] = kind
    for key, value in items:
        found.update(torch_structure(value, (*path, str(key))))
    return found


def split_torch(obj: Mapping[str, Any]) -> list[tuple[str, str, list[str]]]:
    parts = split(torch_paths(obj), torch_structure(obj))
    return [(p.key, p.kind, sorted(p.tensors)) for p in parts]


def split_dcp(names: list[str]) -> list[tuple[str, str, list[str]]]:
    parts = split(((tuple(n.split(".")), "T") for n in names), dotted=True)
    return [(p.key, p.kind, sorted(p.tensors)) for p in parts]


MODEL = {"encoder.weight": "T", "encoder.bias": "T", "head.weight": "T"}
ADAM = {
    "state": {str(i): {"step": "T", "exp_avg": "T", "exp_avg_sq": "T"} for i in range(3)},
    "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}],
}


def test_lightning_checkpoint_is_its_state_dict() -> None:
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": MODEL,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2}}}},
        "callbacks": {"ModelCheckpoint{...}": {"best_model_score": "T"}},
        "optimizer_states": [ADAM],
        "lr_schedulers": [{"last_epoch": 10, "base_lrs": [0.1], "_step_count": 11}],
    }
    parts = split_torch(ckpt)
    assert parts[0] == ("state_dict", "model", sorted(MODEL))
    assert [(key, kind) for key, kind, _ in parts[1:]] == [
        ("optimizer_states", "optimizer"),
        ("callbacks", "trainer"),
    ]


def test_timm_saver_keeps_the_average_apart() -> None:
    ckpt = {"epoch": 3, "arch": "resnet", "state_dict": MODEL, "state_dict_ema": MODEL, "optimizer": ADAM}
    assert split_torch(ckpt) == [
        ("state_dict", "model", sorted(MODEL)),
        ("state_dict_ema", "average", sorted(MODEL)),
        (
            "optimizer",
            "optimizer",
            sorted(f"state.{i}.{m}" for i in range(3) for m in ("step", "exp_avg", "exp_avg_sq")),
        ),
    ]


def test_an_optimizer_is_known_by_its_structure_under_any_key() -> None:
    parts = split_torch({"net": MODEL, "opt": ADAM})
    assert [(key, kind) for key, kind, _ in parts] == [("net", "model"), ("opt", "optimizer")]


def test_copies_of_one_model_side_by_side_are_offered_as_models() -> None:
    # Lightning's EMAWeightAveraging: the average under state_dict, the training weights beside it.
    parts = split_torch({"state_dict": MODEL, "current_model_state": MODEL, "global_step": 5})
    assert parts == [("state_dict", "model", sorted(MODEL)), ("current_model_state", "model", sorted(MODEL))]


def test_torchtitan_step_folder_model_at_the_top_level() -> None:
    model = [
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.0.attention_norm.weight",
        "norm.weight",
        "output.weight",
    ]
    names = [
        *model,
        *(f"optimizer.state.{m}.{s}" for m in model for s in ("step", "exp_avg", "exp_avg_sq")),
        "lr_scheduler.last_epoch",
        "train_state.step",
        "dataloader.dp_rank_0",
    ]
    parts = split_dcp(names)
    assert parts[0] == ("", "model", sorted(model))
    assert [(key, kind) for key, kind, _ in parts[1:]] == [
        ("optimizer", "optimizer"),
        ("lr_scheduler", "scheduler"),
        ("train_state", "trainer"),
        ("dataloader", "trainer"),
    ]
    assert len(parts[1][2]) == 15


def test_torchtitan_model_only_save_is_the_same_model() -> None:
    model = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    assert split_dcp(model) == [("", "model", sorted(model))]


def test_lightning_sharded_save_numbers_its_optimizers() -> None:
    # ModelParallelStrategy's DCP folder (lightning/pytorch/strategies/model_parallel.py save_checkpoint):
    # the module under state_dict, each optimizer under optimizer_<i>, the EMA callback's averages under ema.
    model = ["layer.weight", "layer.bias", "head.weight"]
    names = [
        *(f"state_dict.{m}" for m in model),
        *(f"optimizer_0.state.{m}.momentum_buffer" for m in model),
        *(f"optimizer_1.state.{m}.exp_avg" for m in model),
        *(f"ema.{m}" for m in model),
    ]
    parts = split_dcp(names)
    assert parts[0] == ("state_dict", "model", sorted(model))
    assert [(key, kind) for key, kind, _ in parts[1:]] == [
        ("ema", "average"),
        ("optimizer_0", "optimizer"),
        ("optimizer_1", "optimizer"),
    ]


def test_torchtnt_app_state_is_looked_through() -> None:
    names = [
        "app_state.module.fc.weight",
        "app_state.module.fc.bias",
        "app_state.optimizer.state.fc.weight.exp_avg",
        "app_state.optimizer.state.fc.bias.exp_avg",
        "app_state.train_progress.num_steps_completed",
    ]
    parts = split_dcp(names)
    assert parts[0] == ("app_state.module", "model", ["fc.bias", "fc.weight"])
    assert [(key, kind) for key, kind, _ in parts[1:]] == [
        ("app_state.optimizer", "optimizer"),
        ("app_state.train_progress", "trainer"),
    ]


def test_a_model_prefix_that_is_a_module_is_kept() -> None:
    # Hugging Face causal LMs: ``model.*`` beside ``lm_head``; only a lone container key is looked through.
    names = [
        "model.layers.0.w",
        "model.embed.weight",
        "lm_head.weight",
        "optimizer.state.lm_head.weight.exp_avg",
    ]
    assert split_dcp(names)[0] == ("", "model", ["lm_head.weight", "model.embed.weight", "model.layers.0.w"])
    assert split_dcp(["model.a.weight", "model.b.weight"]) == [("model", "model", ["a.weight", "b.weight"])]


def test_a_submodule_named_ema_that_is_no_copy_stays_in_the_model() -> None:
    names = ["enc.weight", "enc.bias", "quant.ema.embed", "quant.ema.cluster_size", "quant.proj.weight"]
    assert split_dcp(names) == [("", "model", sorted(names))]


def test_moments_saved_beside_their_parameters_are_optimizer_state() -> None:
    parts = split_torch({"w": "T", "b": "T", "w.exp_avg": "T", "w.exp_avg_sq": "T", "b.momentum_buffer": "T"})
    assert parts == [
        ("", "model", ["b", "w"]),
        ("", "optimizer", ["b.momentum_buffer", "w.exp_avg", "w.exp_avg_sq"]),
    ]


def test_a_bare_state_dict_is_all_model() -> None:
    assert split_torch(MODEL) == [("", "model", sorted(MODEL))]


def test_a_parameter_called_like_a_moment_without_its_parameter_is_a_weight() -> None:
    # ``sum`` is an Adagrad moment's name, but with no ``pool`` tensor beside it ``pool.sum`` is a weight.
    assert split_torch({"pool.sum": "T", "fc.weight": "T"}) == [("", "model", ["fc.weight", "pool.sum"])]


# By shape (issue 25): leaves are the tensors' shapes here, ``shape_of`` gives them back.


def split_shapes(obj: Mapping[str, Any]) -> list[tuple[str, str, list[str]]]:
    def paths(node: Mapping[str, Any], path: KeyPath = ()) -> Iterator[tuple[KeyPath, tuple[int, ...]]]:
        for key, value in node.items() if isinstance(node, Mapping) else enumerate(node):
            if isinstance(value, Mapping | list):
                yield from paths(value, (*path, str(key)))
            else:
                yield (*path, str(key)), value

    parts = split(paths(obj), torch_structure(obj), shape_of=lambda shape: shape)
    return [(p.key, p.kind, sorted(p.tensors)) for p in parts]


GPT_SHAPES = {"wte.weight": (64, 16), "h.0.ln.weight": (16,), "h.0.ln.bias": (16,), "head.weight": (64, 16)}


def test_a_metric_beside_a_state_dict_is_trainer_state() -> None:
    # nanoGPT's ckpt.pt: best_val_loss, a 0-d tensor, sits beside model under no key anyone lists.
    parts = split_shapes(
        {"model": GPT_SHAPES, "best_val_loss": (), "optimizer": {"state": {}, "param_groups": []}}
    )
    assert parts == [("model", "model", sorted(GPT_SHAPES)), ("best_val_loss", "trainer", ["best_val_loss"])]


def test_a_parameter_beside_module_state_dicts_stays_in_the_model() -> None:
    # A positional embedding saved beside its encoder's state dict is a weight, not trainer state.
    parts = split_shapes({"encoder": GPT_SHAPES, "pos_embedding": (1, 16, 64), "step_loss": ()})
    assert parts[0] == ("", "model", sorted(["pos_embedding", *(f"encoder.{n}" for n in GPT_SHAPES)]))
    assert parts[1:] == [("step_loss", "trainer", ["step_loss"])]


def test_per_parameter_state_under_any_key_is_optimizer_state() -> None:
    # fastai's opt.state: a list with one dict per parameter, moments of the parameter's shape.
    opt = {"state": [{"grad_avg": s, "sqr_avg": s} for s in GPT_SHAPES.values()], "hypers": []}
    parts = split_shapes({"model": GPT_SHAPES, "opt": opt})
    assert [(key, kind) for key, kind, _ in parts] == [("model", "model"), ("opt", "optimizer")]


def test_tensors_repeating_the_models_shapes_twice_are_optimizer_state() -> None:
    moments = {name: {"m": shape, "v": shape} for name, shape in GPT_SHAPES.items()}
    parts = split_shapes({"weights": GPT_SHAPES, "slots": moments})
    assert [(key, kind) for key, kind, _ in parts] == [("weights", "model"), ("slots", "optimizer")]


def test_two_state_dicts_of_one_model_are_no_optimizer() -> None:
    # An encoder and a decoder twice as deep: the decoder repeats the encoder's shapes, and is a module.
    encoder = {"down.0.w": (8, 8), "down.0.b": (8,)}
    decoder = {f"up.{i}.{n}": s for i in range(4) for n, s in (("w", (8, 8)), ("b", (8,)))}
    parts = split_shapes({"encoder": encoder, "decoder": decoder})
    names = [*(f"encoder.{n}" for n in encoder), *(f"decoder.{n}" for n in decoder)]
    assert parts == [("", "model", sorted(names))]


def test_a_module_list_of_state_dicts_is_no_per_parameter_state() -> None:
    parts = split_shapes({"models": [GPT_SHAPES, {"x.weight": (3, 3), "x.bias": (3,)}]})
    assert [kind for _, kind, _ in parts] == ["model"]
