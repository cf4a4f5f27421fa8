"""Pure planning: decays, weights, selection, grouping, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from ema_average.checkpoints import TensorSpec
from ema_average.errors import ConfigurationError
from ema_average.plan import (
    AverageSettings,
    CheckpointSelection,
    Previous,
    Selection,
    effective_weights,
    first_dominates_note,
    group_by_budget,
    output_tensors,
    parse_size,
    update_decays,
)


def test_decays_follow_the_seed_rule() -> None:
    decays = update_decays([0, 10, 1000], AverageSettings(decay=0.9))
    assert decays[0] is None
    assert decays[1] == pytest.approx(11 / 20)  # min(0.9, (1 + 10) / (10 + 10))
    assert decays[2] == 0.9


def test_weights_by_hand() -> None:
    # start with c0; then 0.5 * avg + 0.5 * c1; then 0.75 * avg + 0.25 * c2
    # c0: 0.5 * 0.75 = 0.375, c1: 0.5 * 0.75 = 0.375, c2: 0.25
    assert effective_weights([None, 0.5, 0.75]) == [0.375, 0.375, 0.25]
    weights = effective_weights(update_decays(list(range(0, 5000, 100)), AverageSettings()))
    assert math.fsum(weights) == pytest.approx(1.0)


def test_first_dominates_note() -> None:
    steps = [1000, 2000, 3000, 4000]
    weights = effective_weights(update_decays(steps, AverageSettings(decay=0.9999)))
    assert weights[0] > 0.99
    note = first_dominates_note(steps, weights, AverageSettings(decay=0.9999))
    assert note is not None and "step 1000" in note and "~1000 steps apart" in note
    even = effective_weights([None, 0.5, 2 / 3, 0.75])
    assert first_dominates_note(steps, even, AverageSettings(decay=0.75)) is None


SPECS = {
    "model.embed.weight": TensorSpec((100, 8), torch.bfloat16),
    "model.head.weight": TensorSpec((100, 8), torch.bfloat16),
    "model.norm.num_batches_tracked": TensorSpec((), torch.int64),
    "model.layer.weight": TensorSpec((8, 8), torch.float32),
}


def test_output_tensors_kinds_and_dtypes() -> None:
    outs = output_tensors(
        SPECS, {"model.head.weight": "model.embed.weight"}, Selection(strip_prefix="model."), "float32"
    )
    by_name = {t.name: t for t in outs}
    assert list(by_name) == ["embed.weight", "head.weight", "norm.num_batches_tracked", "layer.weight"]
    assert by_name["head.weight"].alias_of == "model.embed.weight"
    assert not by_name["norm.num_batches_tracked"].averaged
    assert by_name["norm.num_batches_tracked"].out_dtype == torch.int64
    assert by_name["embed.weight"].out_dtype == torch.float32
    as_input = {t.name: t for t in output_tensors(SPECS, {}, Selection(), "as-input")}
    assert as_input["model.embed.weight"].out_dtype == torch.bfloat16


def test_include_exclude() -> None:
    outs = output_tensors(SPECS, {}, Selection(include=("model.*.weight",), exclude=("*head*",)), "as-input")
    assert [t.source for t in outs] == ["model.embed.weight", "model.layer.weight"]
    with pytest.raises(ConfigurationError, match="no tensors left"):
        output_tensors(SPECS, {}, Selection(include=("nothing*",)), "as-input")


def test_strip_prefix_collision() -> None:
    specs = {"a.w": TensorSpec((1,), torch.float32), "w": TensorSpec((1,), torch.float32)}
    with pytest.raises(ConfigurationError, match="both 'w'"):
        output_tensors(specs, {}, Selection(strip_prefix="a."), "as-input")


def test_groups_respect_the_budget_and_keep_tied_weights_together() -> None:
    outs = output_tensors(SPECS, {"model.head.weight": "model.embed.weight"}, Selection(), "as-input")
    # embed: 800 params x (4 + 2) = 4800 bytes; layer: 64 x (4 + 4) = 512 bytes; head is embed's alias
    groups = group_by_budget(outs, budget=5000)
    assert [[t.source for t in g] for g in groups] == [
        ["model.embed.weight", "model.head.weight", "model.norm.num_batches_tracked"],
        ["model.layer.weight"],
    ]
    assert len(group_by_budget(outs, budget=10**9)) == 1
    assert len(group_by_budget(outs, budget=1)) == 2  # a tensor over the budget stands alone


@pytest.mark.parametrize(
    ("text", "value"),
    [("512MB", 512 * 10**6), ("4GiB", 4 * 2**30), ("1.5G", 15 * 10**8), ("1000", 1000), ("64KiB", 65536)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_size(text)


def test_step_schedule_decays_are_gap_products() -> None:
    settings = AverageSettings(decay=0.999, schedule="step")
    decays = update_decays([100, 300, 400], settings)
    rule = settings.rule()
    assert decays == [None, rule.between(100, 300), rule.between(300, 400)]


def test_decays_continue_a_previous_average() -> None:
    settings = AverageSettings(method="uniform")
    # 3 checkpoints already averaged: the 4th gets weight 1/4, the 5th 1/5
    assert update_decays([50, 60], settings, Previous(count=3, last_step=40)) == [3 / 4, 4 / 5]
    step = AverageSettings(decay=0.99, schedule="step")
    assert update_decays([60], step, Previous(count=3, last_step=40)) == [step.rule().between(40, 60)]


def test_half_life_sets_the_decay() -> None:
    rule = AverageSettings(half_life=100, schedule="step").rule()
    assert rule.settings()["decay"] == pytest.approx(0.5 ** (1 / 100))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (AverageSettings(method="uniform", schedule="step"), "weighs checkpoints equally"),
        (AverageSettings(method="power", half_life=10), "--half-life does not apply to the power average"),
        (AverageSettings(method="exponential", gamma=3), "--gamma does not apply to the exponential average"),
        (AverageSettings(method="uniform", decay=0.9), "--decay does not apply to the uniform average"),
        (AverageSettings(decay=0.9, half_life=5), "give --decay or --half-life, not both"),
        (AverageSettings(method="power", gamma=5, sigma_rel=0.1), "not both"),
        (AverageSettings(method="power", sigma_rel=0.0), r"sigma_rel must be in \(0, 1\)"),
        (AverageSettings(method="median"), "no moving average named 'median'; available: "),
        (AverageSettings(schedule="epoch"), "--schedule must be one of"),
        (AverageSettings(decay=1.5), "decay must be"),
    ],
)
def test_bad_settings(settings: AverageSettings, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        settings.rule()


def test_checkpoint_selection() -> None:
    steps = [10, 20, 30, 40, 50, 60, 70]
    assert CheckpointSelection(every=3).indices(steps) == [0, 3, 6]  # the newest is always kept
    assert CheckpointSelection(from_step=20, to_step=60, last=2).indices(steps) == [4, 5]
    assert CheckpointSelection(from_step=25, every=2).indices(steps) == [2, 4, 6]
    assert CheckpointSelection().indices(steps) == list(range(7))
    with pytest.raises(ConfigurationError, match="--last must be at least 1"):
        CheckpointSelection(last=0).indices(steps)
