"""The online engine against an independent float64 reference written here."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ema_average import (
    AverageStateError,
    ConfigurationError,
    ExponentialMovingAverage,
    MovingAverage,
    ParameterError,
    PluginError,
    UniformMovingAverage,
)
from ema_average.engine.decay_rules import DecayRule
from ema_average.offline.plan import AverageSettings, update_decays
from plugin_pkg.install import MODULE as PLUGIN_MODULE
from plugin_pkg.install import install_plugin

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


class Float64Reference:
    """The seed's rule, written out plainly in float64: the expectation every test compares to."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float, numerator: float, denominator: float):
        self.shadow = {n: p.detach().double().cpu().clone() for n, p in params.items()}
        self.decay, self.numerator, self.denominator = decay, numerator, denominator

    def apply(self, params: dict[str, torch.Tensor], num_updates: int | None) -> None:
        d = self.decay
        if num_updates is not None:
            d = min(d, (self.numerator + num_updates) / (self.denominator + num_updates))
        for n, p in params.items():
            self.shadow[n] = d * self.shadow[n] + (1 - d) * p.detach().double().cpu()


def make_params(dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (50, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,), "head.weight": (3, 8)}
    return {
        n: torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
        for n, s in shapes.items()
    }


def perturb(params: dict[str, torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_num_updates", [False, True])
def test_matches_float64_reference(device: str, dtype: torch.dtype, with_num_updates: bool) -> None:
    params = make_params(dtype, device)
    ema = ExponentialMovingAverage(params.items(), decay=0.9, numerator=1.0, denominator=10.0)
    ref = Float64Reference(params, 0.9, 1.0, 10.0)
    for step in range(1, 31):
        perturb(params, step)
        n = step if with_num_updates else None
        ema.apply(n)
        ref.apply(params, n)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, avg in ema.averages().items():
        assert avg.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert avg.device.type == device
        torch.testing.assert_close(avg.cpu().double(), ref.shadow[name], rtol=tol, atol=tol)


def test_warmup_rule_is_min_of_decay_and_ratio() -> None:
    ema = ExponentialMovingAverage({"w": torch.zeros(1)}, decay=0.99, numerator=1.0, denominator=10.0)
    assert ema.decay_for(None) == 0.99
    assert ema.decay_for(0) == pytest.approx(0.1)
    assert ema.decay_for(5) == pytest.approx(6 / 15)
    assert ema.decay_for(10**6) == 0.99


def test_one_update_by_hand() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = ExponentialMovingAverage([("p", p)], decay=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 2.0]))
    ema.apply()
    # 0.75 * 0 + 0.25 * 4 = 1 ; 0.75 * 10 + 0.25 * 2 = 8
    assert ema.averages()["p"].tolist() == [1.0, 8.0]
    ema.apply(
        num_updates=2
    )  # min(0.75, 3 / 12) = 0.25 -> 0.25 * 1 + 0.75 * 4 = 3.25 ; 0.25 * 8 + 0.75 * 2 = 3.5
    assert ema.averages()["p"].tolist() == [3.25, 3.5]


def test_bf16_average_keeps_moving_at_high_decay() -> None:
    # In bf16, 1 + 1e-4 rounds back to 1: an EMA kept in the parameter dtype never moves.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([("p", p)], decay=0.9999)
    with torch.no_grad():
        p.fill_(2.0)
    for _ in range(100):
        ema.apply()
    expected = 2.0 - 0.9999**100  # closed form of 100 updates towards 2 from 1
    assert expected > 1.009
    torch.testing.assert_close(
        ema.averages()["p"].double(), torch.full((4,), expected, dtype=torch.float64), rtol=0, atol=5e-6
    )


def test_assign_and_restore_are_bit_exact() -> None:
    params = make_params(torch.bfloat16, "cpu")
    ema = ExponentialMovingAverage(params.items(), decay=0.5)
    perturb(params, 1)
    ema.apply()
    before = {n: p.detach().clone() for n, p in params.items()}
    ema.assign_average_value()
    for n, p in params.items():
        assert torch.equal(p, ema.averages()[n].to(torch.bfloat16))
        assert not torch.equal(p, before[n])
    ema.restore()
    for n, p in params.items():
        assert torch.equal(p.view(torch.int16), before[n].view(torch.int16))


def test_each_restore_puts_back_what_its_own_assign_saw() -> None:
    """A swap lasts from one assign to one restore: after it, another restore is an error and the next
    swap saves the parameters as they are then (not a copy left from the first)."""
    params = make_params(torch.float32, "cpu")
    ema = ExponentialMovingAverage(params.items(), decay=0.5)
    ema.assign_average_value()
    ema.restore()
    with pytest.raises(AverageStateError, match="without assign_average_value"):
        ema.restore()
    perturb(params, 1)
    moved = {n: p.detach().clone() for n, p in params.items()}
    ema.assign_average_value()
    ema.restore()
    assert all(torch.equal(p, moved[n]) for n, p in params.items())


def test_context_manager_restores_on_exception() -> None:
    params = make_params(torch.float32, "cpu")
    ema = ExponentialMovingAverage(params.items(), decay=0.5)
    perturb(params, 1)
    ema.apply()
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(RuntimeError, match="boom"), ema.average_parameters():
        assert torch.equal(params["head.weight"], ema.averages()["head.weight"])
        raise RuntimeError("boom")
    for n, p in params.items():
        assert torch.equal(p, before[n])


def test_restore_without_assign_is_an_error() -> None:
    ema = ExponentialMovingAverage(make_params(torch.float32, "cpu").items())
    with pytest.raises(AverageStateError, match="without assign_average_value"):
        ema.restore()


def test_assign_twice_is_an_error() -> None:
    ema = ExponentialMovingAverage(make_params(torch.float32, "cpu").items())
    ema.assign_average_value()
    with pytest.raises(AverageStateError, match="already assigned"):
        ema.assign_average_value()


def test_update_from_other_tensors_equals_apply() -> None:
    params = make_params(torch.float32, "cpu")
    tracked = ExponentialMovingAverage(params.items(), decay=0.8)
    streamed = ExponentialMovingAverage.from_tensors(
        {n: p.detach().clone() for n, p in params.items()}, decay=0.8
    )
    for step in range(1, 6):
        perturb(params, step)
        tracked.apply(num_updates=step)
        streamed.update({n: p.detach().clone() for n, p in params.items()}, num_updates=step)
    for n in params:
        assert torch.equal(tracked.averages()[n], streamed.averages()[n])
    with pytest.raises(AverageStateError, match="tracks no parameters"):
        streamed.apply()


def test_update_rejects_missing_or_misshapen_values() -> None:
    ema = ExponentialMovingAverage.from_tensors({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ParameterError, match="missing tensor 'b'"):
        ema.update({"a": torch.ones(2)})
    with pytest.raises(ParameterError, match="'b' has shape \\(4,\\)"):
        ema.update({"a": torch.ones(2), "b": torch.ones(4)})


@pytest.mark.parametrize("average_device", DEVICES)
@pytest.mark.parametrize("param_device", DEVICES)
def test_averages_on_any_present_device_match_float64(param_device: str, average_device: str) -> None:
    """Averages kept on ``device=`` (the parameters' own, or the other device present: CUDA parameters with
    host averages, CPU parameters with CUDA averages), of float32 and bf16 parameters: the float64
    reference; a swap copies them across and puts the parameters back bit for bit."""
    params = {
        "a": torch.nn.Parameter(torch.randn(4, 3).to(param_device)),
        "b": torch.nn.Parameter(torch.randn(70).to(param_device, torch.bfloat16)),
    }
    ema = ExponentialMovingAverage(params.items(), decay=0.5, device=average_device)
    ref = Float64Reference(params, 0.5, 1.0, 10.0)
    for step in range(1, 4):
        perturb(params, step)
        ema.apply(num_updates=step)
        ref.apply(params, step)
    for n in params:
        assert ema.averages()[n].device.type == average_device
        torch.testing.assert_close(ema.averages()[n].cpu().double(), ref.shadow[n], rtol=2e-6, atol=2e-6)
    before = {n: p.detach().clone() for n, p in params.items()}
    with ema.average_parameters():
        for n, p in params.items():
            assert p.device.type == param_device
            assert torch.equal(p, ema.averages()[n].to(p.device, p.dtype))
    assert all(torch.equal(p.view(torch.uint8), before[n].view(torch.uint8)) for n, p in params.items())


@CUDA
def test_cuda_params_with_cpu_shadows_and_no_host_sync() -> None:
    params = make_params(torch.bfloat16, "cuda")
    ema = ExponentialMovingAverage(params.items(), decay=0.9, device="cpu")
    ref = Float64Reference(params, 0.9, 1.0, 10.0)
    perturb(params, 1)
    ema.apply(num_updates=3)
    ref.apply(params, 3)
    for n in params:
        assert ema.averages()[n].device.type == "cpu"
        torch.testing.assert_close(ema.averages()[n].double(), ref.shadow[n], rtol=2e-6, atol=2e-6)
    on_gpu = ExponentialMovingAverage(params.items(), decay=0.9)
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu.apply(num_updates=5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_state_dict_round_trip() -> None:
    params = make_params(torch.float32, "cpu")
    ema = ExponentialMovingAverage(params.items(), decay=0.7)
    perturb(params, 1)
    ema.apply()
    state = ema.state_dict()
    fresh = ExponentialMovingAverage(make_params(torch.float32, "cpu", seed=9).items(), decay=0.7)
    fresh.load_state_dict(state)
    for n in params:
        assert torch.equal(fresh.averages()[n], ema.averages()[n])
    assert fresh.num_applied == 1
    assert state["settings"] == {"decay": 0.7, "numerator": 1.0, "denominator": 10.0}


def test_load_state_dict_names_the_first_mismatch() -> None:
    ema = ExponentialMovingAverage({"a": torch.zeros(2), "b": torch.zeros(3)})
    state = ema.state_dict()
    state["averages"]["b"] = torch.zeros(5)
    with pytest.raises(AverageStateError, match="'b' has shape \\(5,\\), expected \\(3,\\)"):
        ema.load_state_dict(state)
    del state["averages"]["a"]
    with pytest.raises(AverageStateError, match="no average for 'a'"):
        ema.load_state_dict(state)
    state = ema.state_dict()
    state["averages"]["c"] = torch.zeros(1)
    with pytest.raises(AverageStateError, match="'c'"):
        ema.load_state_dict(state)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ([], "empty"),
        ([("a", torch.zeros(1)), ("a", torch.zeros(1))], "appears twice"),
        ([("steps", torch.zeros(1, dtype=torch.int64))], "only floating-point"),
        ([("a", [1.0, 2.0])], "not a torch.Tensor"),
    ],
)
def test_bad_parameters(parameters: list, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        ExponentialMovingAverage(parameters)


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_decay_out_of_range(decay: float) -> None:
    with pytest.raises(ConfigurationError, match="decay must be"):
        ExponentialMovingAverage({"a": torch.zeros(1)}, decay=decay)


def test_negative_num_updates() -> None:
    ema = ExponentialMovingAverage({"a": torch.nn.Parameter(torch.zeros(1))})
    with pytest.raises(ConfigurationError, match="non-negative"):
        ema.apply(num_updates=-1)


def test_registry() -> None:
    assert MovingAverage.by_name("exponential") is ExponentialMovingAverage
    assert MovingAverage.default_implementation == "exponential"
    assert MovingAverage.list_available()[0] == "exponential"
    with pytest.raises(ConfigurationError, match="no moving average named 'nope'"):
        MovingAverage.by_name("nope")

    @dataclasses.dataclass(frozen=True)
    class HalfRule(DecayRule):
        """Every update halves the old average's weight; over a gap of n steps, 0.5 ** n."""

        weight: float = 0.5

        def at(self, num_updates: int | None, count: int) -> float:
            return self.weight

        def between(self, after_step: int, to_step: int) -> float:
            return self.weight ** (to_step - after_step)

    @MovingAverage.register("test-half")
    class Half(MovingAverage):
        rule_type = HalfRule

    try:
        # One registered class is all it takes: the engine, the offline plan and its settings find it.
        assert MovingAverage.by_name("test-half") is Half
        avg = Half({"a": torch.zeros(2)}, rule=Half.make_rule())
        avg.update({"a": torch.ones(2)})
        assert avg.averages()["a"].tolist() == [0.5, 0.5]
        settings = AverageSettings(method="test-half", schedule="step")
        assert update_decays([10, 12, 15], settings) == [None, 0.25, 0.125]
        assert settings.as_metadata() == {"method": "test-half", "schedule": "step", "weight": "0.5"}
        with pytest.raises(ConfigurationError, match="--decay does not apply to the test-half average"):
            AverageSettings(method="test-half", decay=0.9).rule()
    finally:
        del MovingAverage._registry["test-half"]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin (tests/plugin_pkg) installed by pip into a folder of its own."""
    return install_plugin(tmp_path_factory.mktemp("plugin"))


@pytest.fixture
def forget_plugin() -> Iterator[None]:
    """Leave the registry and the imported modules as they were: other tests list exactly the built-ins."""
    yield
    MovingAverage._registry.pop("fixed-share", None)
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.mark.subprocess
@pytest.mark.usefixtures("forget_plugin")
def test_average_declared_by_another_package_is_found_by_name(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert "fixed-share" in MovingAverage.list_available()
    with pytest.raises(
        ConfigurationError, match=r"no moving average named 'median'; available: .*fixed-share"
    ):
        MovingAverage.by_name("median")
    assert PLUGIN_MODULE not in sys.modules  # declared names are listed; only the one asked for is loaded
    average = MovingAverage.by_name("fixed-share")
    assert PLUGIN_MODULE in sys.modules and average.__module__ == PLUGIN_MODULE
    assert average.registered_name == "fixed-share" and MovingAverage.by_name("fixed-share") is average
    # its own settings, alternative included, through the one table; online updates by hand: 0.75 kept
    assert average.make_rule(drop=0.25).settings() == {"keep": 0.75}
    ema = average.from_tensors({"w": torch.zeros(2, dtype=torch.float64)}, drop=0.25)
    ema.update({"w": torch.ones(2, dtype=torch.float64)})
    ema.update({"w": torch.full((2,), 3.0, dtype=torch.float64)})
    assert ema.averages()["w"].tolist() == [0.75 * 0.25 + 0.25 * 3.0] * 2
    settings = AverageSettings("fixed-share", schedule="step", keep=0.5)
    assert update_decays([10, 12, 15], settings) == [None, 0.25, 0.125]


def _declare(folder: Path, **entry_points: str) -> None:
    """A distribution's metadata alone, declaring averages under ``ema_average.averages``."""
    info = folder / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(["[ema_average.averages]", *lines, ""]))


def test_declared_average_that_does_not_load_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _declare(tmp_path, missing="no_such_module_for_ema_average:Average", wrong="json:dumps")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginError,
        match=r"^the average 'missing' declared as 'no_such_module_for_ema_average:Average' does not load: "
        "ModuleNotFoundError",
    ):
        MovingAverage.by_name("missing")
    with pytest.raises(
        PluginError, match=r"^the average 'wrong' declared as 'json:dumps' is not a registered"
    ):
        MovingAverage.by_name("wrong")
    assert "wrong" not in MovingAverage._registry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_mixed_dtype_tensors_match_float64(dtype: torch.dtype) -> None:
    """Tensors above the engine's size threshold take the scratch-buffer path: same results."""
    g = torch.Generator().manual_seed(0)
    params = {
        "big": torch.nn.Parameter(torch.randn(300, 400, generator=g).to(dtype)),
        "bigger": torch.nn.Parameter(torch.randn(100_000, generator=g).to(dtype)),
    }
    ema = ExponentialMovingAverage(params.items(), decay=0.9)
    ref = Float64Reference(params, 0.9, 1.0, 10.0)
    for step in range(1, 11):
        perturb(params, step)
        ema.apply(num_updates=step)
        ref.apply(params, step)
    for name, avg in ema.averages().items():
        assert avg.dtype == torch.float32
        torch.testing.assert_close(avg.double(), ref.shadow[name], rtol=2e-6, atol=2e-6)


# --- a saved state: all of it, checked, or none (issue 18) -------------------------------------------------


def saved_average() -> tuple[ExponentialMovingAverage, dict]:
    """An average one update in, and a state of another average of the same parameters two updates in."""
    params = make_params(torch.float32, "cpu")
    source = ExponentialMovingAverage(params.items(), decay=0.7)
    perturb(params, 1)
    source.apply()
    source.apply()
    target = ExponentialMovingAverage(make_params(torch.float32, "cpu", seed=5).items(), decay=0.7)
    return target, source.state_dict()


def assert_untouched(ema: MovingAverage, before: dict[str, torch.Tensor], count: int) -> None:
    assert ema.num_applied == count
    for name, average in ema.averages().items():
        assert torch.equal(average, before[name]), name


@pytest.mark.parametrize(
    ("num_applied", "shown"),
    [
        (-1, "-1"),
        (0.5, "0.5"),
        (2.0, "2.0"),
        (float("nan"), "nan"),
        ([2], r"\[2\]"),
        (True, "True"),
        ("2", "'2'"),
    ],
)
def test_a_bad_update_count_is_refused_and_nothing_is_loaded(num_applied: object, shown: str) -> None:
    target, state = saved_average()
    before = {n: t.clone() for n, t in target.averages().items()}
    state["num_applied"] = num_applied
    with pytest.raises(AverageStateError, match=rf"'num_applied' must be a whole number >= 0, got {shown}"):
        target.load_state_dict(state)
    assert_untouched(target, before, 0)
    del state["num_applied"]
    with pytest.raises(AverageStateError, match="no 'num_applied'"):
        target.load_state_dict(state)


def test_a_uniform_average_with_a_negative_count_is_refused() -> None:
    """The issue's case: the mean of 0 and 1 loaded with count -1 went on as weight -1.0, then divided by 0."""
    average = UniformMovingAverage({"w": torch.nn.Parameter(torch.zeros(2))})
    state = average.state_dict()
    state["averages"]["w"] = torch.full((2,), 0.5)
    state["num_applied"] = -2
    with pytest.raises(AverageStateError, match="'num_applied'"):
        average.load_state_dict(state)
    state["num_applied"] = 1  # the mean of 0 and 1: a third value 2 makes it 1
    average.load_state_dict(state)
    average.update({"w": torch.full((2,), 2.0)})
    assert average.averages()["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([0.0] * 24, "is a list, not a tensor"),
        (torch.zeros(3, 8, dtype=torch.int64), "has dtype int64"),
        (torch.zeros(3, 8, device="meta"), "is on the meta device"),
        (torch.zeros(3, 8).to_sparse(), "is a torch.sparse_coo tensor, not a dense one"),
        (torch.zeros(8, 3), r"has shape \(8, 3\), expected \(3, 8\)"),
    ],
)
def test_a_bad_saved_average_is_named_and_nothing_is_loaded(value: object, problem: str) -> None:
    target, state = saved_average()
    before = {n: t.clone() for n, t in target.averages().items()}
    state["averages"]["head.weight"] = value  # the last one: every other would have loaded before it
    with pytest.raises(AverageStateError, match=rf"'head.weight' {problem}"):
        target.load_state_dict(state)
    assert_untouched(target, before, 0)


def test_a_state_that_is_not_a_mapping_is_refused() -> None:
    target, _ = saved_average()
    with pytest.raises(AverageStateError, match="got a list"):
        target.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_other_settings_are_refused_unless_taken_or_kept() -> None:
    """A state made at decay 0.1 is not silently taken by a 0.9999 average: refused naming both; taken
    (torch_ema's way) or this average's kept (timm's) only when asked, and then the next update says which."""
    p = torch.nn.Parameter(torch.tensor([0.0]))
    source = ExponentialMovingAverage([("p", p)], decay=0.1)
    state = source.state_dict()
    state["averages"]["p"] = torch.tensor([8.0])
    ema = ExponentialMovingAverage([("p", p)], decay=0.9999)
    with pytest.raises(AverageStateError, match=r"made with decay=0\.1, .*this average has decay=0\.9999"):
        ema.load_state_dict(state)
    assert ema.averages()["p"].tolist() == [0.0] and ema.decay == 0.9999

    ema.load_state_dict(state, settings="state")
    assert ema.decay == 0.1
    ema.apply()  # 0.1 * 8 + 0.9 * 0 = 0.8
    assert ema.averages()["p"].tolist() == [pytest.approx(0.8)]

    kept = ExponentialMovingAverage([("p", p)], decay=0.75)
    kept.load_state_dict(state, settings="keep")
    kept.apply()  # 0.75 * 8 + 0.25 * 0 = 6
    assert kept.decay == 0.75 and kept.averages()["p"].tolist() == [6.0]

    for settings, problem in [({"decay": "high"}, "are not a exponential average's"), (None, "found none")]:
        broken = dict(state)
        if settings is None:
            del broken["settings"]
        else:
            broken["settings"] = settings
        with pytest.raises(AverageStateError, match=problem):
            kept.load_state_dict(broken, settings="state")
    with pytest.raises(ConfigurationError, match="settings must be"):
        kept.load_state_dict(state, settings="newest")


# --- apply(): all or nothing, and parameters the module replaced (issue 18) --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: torch.zeros(5, dtype=p.dtype), r"is now \(5,\)"),
        (lambda p: torch.ones(1, dtype=p.dtype), r"is now \(1,\)"),  # a shape lerp would broadcast silently
        (lambda p: p.detach().double(), r"is now \(3,\) float64 on cpu"),
    ],
)
def test_a_failing_apply_leaves_every_average_as_it_was(
    dtype: torch.dtype, change: Callable[[torch.Tensor], torch.Tensor], problem: str
) -> None:
    params = {n: torch.nn.Parameter(torch.randn(3).to(dtype)) for n in ("a", "b", "c")}
    ema = ExponentialMovingAverage(params.items(), decay=0.5)
    perturb(params, 1)
    ema.apply()
    before = {n: t.clone() for n, t in ema.averages().items()}
    params["b"].data = change(params["b"])
    perturb({"a": params["a"], "c": params["c"]}, 2)
    with pytest.raises(ParameterError, match=rf"parameter 'b' {problem}.*none was updated"):
        ema.apply(num_updates=4)
    assert_untouched(ema, before, 1)


def small_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def train_step(model: torch.nn.Module, step: int) -> None:
    """One real SGD step on a fixed regression batch."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)


@pytest.mark.parametrize("given", ["module", "named_parameters"])
def test_parameters_replaced_by_load_state_dict_assign_are_followed(given: str) -> None:
    """``load_state_dict(sd, assign=True)`` puts new Parameter objects in the model: the average goes on
    with them (a float64 reference of the model's own parameters), and swaps go into them."""
    model = small_model(0)
    ema = ExponentialMovingAverage(model if given == "module" else model.named_parameters(), decay=0.8)
    ref = Float64Reference(dict(model.named_parameters()), 0.8, 1.0, 10.0)
    for step in range(1, 4):
        train_step(model, step)
        ema.apply(num_updates=step)
        ref.apply(dict(model.named_parameters()), step)
    old = dict(model.named_parameters())
    model.load_state_dict(small_model(1).state_dict(), assign=True)
    assert all(p is not old[n] for n, p in model.named_parameters())  # new objects, as the issue says
    for step in range(4, 24):
        train_step(model, step)
        ema.apply(num_updates=step)
        ref.apply(dict(model.named_parameters()), step)
    for name, average in ema.averages().items():
        torch.testing.assert_close(average.double(), ref.shadow[name], rtol=2e-6, atol=2e-6)

    x = torch.randn(5, 4)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad(), ema.average_parameters():
        swapped = model(x)
        assert all(torch.equal(p, ema.averages()[n]) for n, p in model.named_parameters())
    expected = torch.func.functional_call(model, {n: t.float() for n, t in ref.shadow.items()}, (x,))
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, training[n]) for n, p in model.named_parameters())


def test_a_replacement_that_does_not_fit_is_refused_by_name() -> None:
    model = small_model(0)
    ema = ExponentialMovingAverage(model, decay=0.8)
    train_step(model, 1)
    ema.apply()
    before = {n: t.clone() for n, t in ema.averages().items()}
    model[2].weight = torch.nn.Parameter(torch.zeros(7, 3))
    with pytest.raises(ParameterError, match=r"'2\.weight' was replaced by \(7, 3\) float32"):
        ema.apply()
    with pytest.raises(ParameterError, match=r"'2\.weight'"):
        ema.assign_average_value()
    assert_untouched(ema, before, 1)
    model[2].weight = None  # type: ignore[assignment]
    with pytest.raises(ParameterError, match=r"'2\.weight' is no longer the module's"):
        ema.apply()
