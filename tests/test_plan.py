"""Pure planning: decays, weights, selection, chunks, sweeps of settings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch

from ema_average.checkpoints import TensorSpec
from ema_average.engine.averages import MovingAverage
from ema_average.engine.decay_rules import DecayRule
from ema_average.errors import ConfigurationError
from ema_average.offline.plan import (
    AverageSettings,
    CheckpointSelection,
    ResumedProgress,
    TensorSelection,
    chunk_layout,
    effective_weights,
    first_dominates_note,
    one_value_hint,
    output_tensors,
    parse_values,
    settings_sweep,
    sweep_labels,
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
        SPECS, {"model.head.weight": "model.embed.weight"}, TensorSelection(strip_prefix="model."), "float32"
    )
    by_name = {t.name: t for t in outs}
    assert list(by_name) == ["embed.weight", "head.weight", "norm.num_batches_tracked", "layer.weight"]
    assert by_name["head.weight"].alias_of == "model.embed.weight"
    assert not by_name["norm.num_batches_tracked"].averaged
    assert by_name["norm.num_batches_tracked"].out_dtype == torch.int64
    assert by_name["embed.weight"].out_dtype == torch.float32
    as_input = {t.name: t for t in output_tensors(SPECS, {}, TensorSelection(), "as-input")}
    assert as_input["model.embed.weight"].out_dtype == torch.bfloat16


def test_include_exclude() -> None:
    outs = output_tensors(
        SPECS, {}, TensorSelection(include=("model.*.weight",), exclude=("*head*",)), "as-input"
    )
    assert [t.input_name for t in outs] == ["model.embed.weight", "model.layer.weight"]
    with pytest.raises(ConfigurationError, match="no tensors left"):
        output_tensors(SPECS, {}, TensorSelection(include=("nothing*",)), "as-input")


def test_strip_prefix_collision() -> None:
    specs = {"a.w": TensorSpec((1,), torch.float32), "w": TensorSpec((1,), torch.float32)}
    with pytest.raises(ConfigurationError, match="both 'w'"):
        output_tensors(specs, {}, TensorSelection(strip_prefix="a."), "as-input")


def layout_of(chunks) -> list[list[tuple[str, int, int, int]]]:  # type: ignore[no-untyped-def]
    return [[(p.input_name, p.start, p.count, p.offset) for p in c.pieces] for c in chunks]


def test_chunks_split_tensors_of_one_kind_and_carry_tied_twins() -> None:
    outs = output_tensors(SPECS, {"model.head.weight": "model.embed.weight"}, TensorSelection(), "as-input")
    chunks = chunk_layout(outs, {}, 300)
    # embed (800 bf16) is cut at 300; head rides on it; the int64 counter and the fp32 layer are kinds of
    # their own, in saved order of first appearance
    assert layout_of(chunks) == [
        [("model.embed.weight", 0, 300, 0)],
        [("model.embed.weight", 300, 300, 0)],
        [("model.embed.weight", 600, 200, 0)],
        [("model.norm.num_batches_tracked", 0, 1, 0)],
        [("model.layer.weight", 0, 64, 0)],
    ]
    assert chunks[0].pieces[0].names == ("model.embed.weight", "model.head.weight")
    assert [c.averaged for c in chunks] == [True, True, True, False, True]
    assert chunks[0].shadow_dtype == torch.float32 and chunks[0].out_dtype == torch.bfloat16
    assert chunks[0].bytes_read(sources=3) == 300 * 2 * 3 and chunks[3].bytes_read(sources=3) == 8


def test_chunks_pack_small_tensors_end_to_end() -> None:
    specs = {f"w{i}": TensorSpec((5,), torch.float32) for i in range(4)}
    chunks = chunk_layout(output_tensors(specs, {}, TensorSelection(), "as-input"), {}, 8)
    assert layout_of(chunks) == [
        [("w0", 0, 5, 0), ("w1", 0, 3, 5)],
        [("w1", 3, 2, 0), ("w2", 0, 5, 2), ("w3", 0, 1, 7)],
        [("w3", 1, 4, 0)],
    ]
    whole = chunk_layout(output_tensors(specs, {}, TensorSelection(), "as-input"), {}, 8, split=False)
    assert layout_of(whole) == [[("w0", 0, 5, 0)], [("w1", 0, 5, 0)], [("w2", 0, 5, 0)], [("w3", 0, 5, 0)]]


def test_chunks_follow_the_first_sources_dtype() -> None:
    """A resumed float32 average of bf16 checkpoints: its chunks read float32 first, then bf16."""
    specs = {"w": TensorSpec((10,), torch.bfloat16)}
    outs = output_tensors(specs, {}, TensorSelection(), "float32")
    (chunk,) = chunk_layout(outs, {"w": TensorSpec((10,), torch.float32)}, 64)
    assert (chunk.first_dtype, chunk.dtype, chunk.out_dtype) == (torch.float32, torch.bfloat16, torch.float32)
    assert chunk.bytes_read(sources=3) == 10 * 4 + 2 * 10 * 2


def test_sweep_settings_and_labels() -> None:
    sweep = settings_sweep({"decay": parse_values("--decay", "0.999, 0.9999")}, schedule="step")
    assert [s.get("decay") for s in sweep] == [0.999, 0.9999] and {s.schedule for s in sweep} == {"step"}
    assert sweep_labels(sweep) == ["decay0.999", "decay0.9999"]
    assert sweep_labels([AverageSettings(half_life=500), AverageSettings(half_life=2000)]) == [
        "half-life500",
        "half-life2000",
    ]
    assert sweep_labels([AverageSettings(method="power", sigma_rel=x) for x in (0.05, 0.1)]) == [
        "sigma-rel0.05",
        "sigma-rel0.1",
    ]
    assert sweep_labels([AverageSettings()]) == [""]
    assert settings_sweep({"decay": [0.9], "half_life": None}) == [AverageSettings(decay=0.9)]


def test_sweep_refusals() -> None:
    with pytest.raises(ConfigurationError, match="--decay and --half-life both list several values"):
        settings_sweep({"decay": [0.9, 0.99], "half_life": [1.0, 2.0]})
    with pytest.raises(ConfigurationError, match="given twice"):
        sweep_labels([AverageSettings(decay=0.9), AverageSettings(decay=0.9)])
    with pytest.raises(ConfigurationError, match=r"--decay: 'x' is not a number"):
        parse_values("--decay", "0.9,x")


def test_step_schedule_decays_are_gap_products() -> None:
    settings = AverageSettings(decay=0.999, schedule="step")
    decays = update_decays([100, 300, 400], settings)
    rule = settings.rule()
    assert decays == [None, rule.between(100, 300), rule.between(300, 400)]


def test_decays_continue_a_previous_average() -> None:
    settings = AverageSettings(method="uniform")
    # 3 checkpoints already averaged: the 4th gets weight 1/4, the 5th 1/5
    assert update_decays([50, 60], settings, ResumedProgress(count=3, last_step=40)) == [3 / 4, 4 / 5]
    step = AverageSettings(decay=0.99, schedule="step")
    assert update_decays([60], step, ResumedProgress(count=3, last_step=40)) == [step.rule().between(40, 60)]


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


# --- settings as data: a mapping checked against the rule's declared settings (issue 20) -------------------


def test_settings_are_a_mapping_by_name() -> None:
    assert AverageSettings(decay=0.9, numerator=2.0) == AverageSettings(
        values={"numerator": 2.0, "decay": 0.9}
    )
    assert AverageSettings(decay=None) == AverageSettings()  # None: the rule's own default
    power = AverageSettings("power", sigma_rel=0.1)
    assert (power.get("sigma_rel"), power.get("gamma")) == (0.1, None)
    assert dataclasses.replace(power, schedule="step") == AverageSettings(
        "power", schedule="step", sigma_rel=0.1
    )
    assert power.as_metadata() == {
        "method": "power",
        "schedule": "checkpoint",
        "gamma": repr(power.rule().gamma),
    }


def test_a_list_only_where_the_setting_takes_one() -> None:
    with pytest.raises(ConfigurationError, match=r"^--numerator takes one value, not a list$"):
        settings_sweep({"numerator": [1.0, 2.0]})
    assert [s.get("gamma") for s in settings_sweep({"gamma": [3.0, 5.0]}, method="power")] == [3.0, 5.0]


def test_one_value_hint_names_what_varies() -> None:
    sweep = settings_sweep({"half_life": [5.0, 50.0]}, schedule="step")
    assert one_value_hint(sweep) == "give one value of --half-life"


@pytest.fixture
def equal_weights() -> Iterator[str]:
    """A registered average whose rule weighs checkpoints equally, as a third party would write it."""

    @dataclasses.dataclass(frozen=True)
    class EveryOneRule(DecayRule):
        has_gap_product = False
        weighs_equally = True

        def at(self, num_updates: int | None, count: int) -> float:
            return count / (count + 1)

        def between(self, after_step: int, to_step: int) -> float:
            raise AssertionError("no per-step rule")

    @MovingAverage.register("test-every-one")
    class EveryOne(MovingAverage):
        rule_type = EveryOneRule

    yield "test-every-one"
    del MovingAverage._registry["test-every-one"]


def test_equal_weights_come_from_the_rule_not_its_name(equal_weights: str) -> None:
    # No "first checkpoint dominates" note for an average whose rule weighs checkpoints equally (by its
    # declaration: the plan has no list of such names), and no --schedule step for it.
    steps = [100, 200]
    settings = AverageSettings(equal_weights)
    assert first_dominates_note(steps, [0.5, 0.5], settings) is None
    assert first_dominates_note(steps, [0.9, 0.1], settings) is None
    assert first_dominates_note(steps, [0.9, 0.1], AverageSettings(decay=0.9)) is not None
    with pytest.raises(ConfigurationError, match="weighs checkpoints equally, with no per-step rule"):
        AverageSettings(equal_weights, schedule="step").rule()
