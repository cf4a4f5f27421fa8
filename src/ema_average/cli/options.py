"""The command line's options: each one declared once (type, help, panel) and its value parsed where typer
parses options, so that a bad value is a usage error (exit 2) before anything runs.

:mod:`ema_average.cli.app` names these declarations in its command's signature, in the order ``--help`` lists
them; ``--help`` groups them in rich panels by what they are for. Torch-free, so ``--help`` and
``--version`` answer without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ema_average._version import __version__
from ema_average.cli.report import out
from ema_average.engine.decay_rules import DecayRule, ExponentialRule, PowerRule, flag_of
from ema_average.errors import ConfigurationError
from ema_average.offline import choices


class Choice(str, Enum):
    """A word from a fixed list, as typer offers it; the word is its ``value``."""

    _value_: str


def _choices(name: str, names: tuple[str, ...]) -> type[Choice]:
    """A typer choice type made from one of the real lists in :mod:`ema_average.offline.choices`."""
    # typeshed types the functional API as giving type[Enum], whatever ``type`` it mixes in
    return Enum(name, {n: n for n in names}, type=Choice)  # type: ignore[return-value]


if TYPE_CHECKING:  # to mypy, each is a Choice: its members are made when the module runs, from the lists
    Schedule = Choice
    OutputDtype = Choice
    StepsFrom = Choice
else:
    Schedule = _choices("Schedule", choices.SCHEDULES)
    OutputDtype = _choices("OutputDtype", choices.OUTPUT_DTYPES)
    StepsFrom = _choices("StepsFrom", choices.STEPS_FROM)
DEFAULT_SCHEDULE = Schedule(choices.SCHEDULES[0])
DEFAULT_DTYPE = OutputDtype(choices.OUTPUT_DTYPES[0])
DEFAULT_STEPS_FROM = StepsFrom(choices.STEPS_FROM[0])

_LIST = "FLOAT[,FLOAT...]"  # one average per value, in one pass
# --help groups the options by what they are for (rich help panels).
_READ, _AVERAGE, _OUTPUT, _SAFETY, _SPEED = (
    "What to read",
    "How to average",
    "Output",
    "Safety",
    "Performance",
)


# Parsing: values typer cannot parse by their type alone -----------------------------------------------


class Numbers(tuple):  # a tuple subclass typer does not take for a multi-value option
    """A comma list of numbers as given on the command line: one average per value."""


class Steps(tuple):
    """A comma list of whole training steps (``--steps 500,1000``)."""


def ascii_number(kind: type[int] | type[float], text: str) -> int | float:
    """``int(text)`` or ``float(text)`` for ASCII text only: Python's own read any Unicode digit (an
    Arabic-Indic one as 1, say), and a number on the command line is written in ASCII. Raises ValueError
    otherwise. (click's own INTEGER and FLOAT options already refuse them.)"""
    if not text.isascii():
        raise ValueError(f"{text!r} is not a number written in ASCII digits")
    return kind(text)


def _numbers(text: str) -> Numbers:
    """``0.999,0.9999``; parsed where typer parses options, so a bad list is a usage error (exit 2)."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(ascii_number(float, item.strip())))
        except ValueError:
            raise typer.BadParameter(f"{item.strip()!r} is not a number (give e.g. 0.999,0.9999)") from None
    return Numbers(values)


@dataclass(frozen=True)
class Assignment:
    """One ``--set NAME=VALUE[,VALUE...]``: a setting of the chosen average, by its declared name."""

    name: str
    values: Numbers


def _assignment(text: str) -> Assignment:
    """``keep=0.25`` or ``half-life=50,500``; parsed where typer parses options, so a bad one exits 2."""
    name, equals, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not (equals and name.isidentifier()):
        raise typer.BadParameter(f"takes NAME=VALUE (e.g. decay=0.999), got {text!r}")
    return Assignment(name, _numbers(values))


def _steps(text: str) -> Steps:
    try:
        return Steps(int(ascii_number(int, part)) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"takes whole numbers separated by commas, got {text!r}") from None


def _size(text: str) -> int:
    from ema_average.output.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"ema-average {__version__}")
        raise typer.Exit()


def _setting_help(rule: type[DecayRule], name: str) -> str:
    """A built-in setting's help as its rule declares it, with the rule's default."""
    setting = rule.setting(name)
    assert setting is not None, name
    shown = "" if setting.default is None else f" \\[default: {setting.default}]"  # \\[: not rich markup
    return setting.help + shown


def settings_given(
    flags: Mapping[str, Sequence[float] | None], assignments: list[Assignment]
) -> dict[str, list[float]]:
    """The settings given by their own flags and by ``--set``, by name; one given twice is refused."""
    given = {name: list(values) for name, values in flags.items() if values is not None}
    for assignment in assignments:
        if assignment.name in given:
            raise ConfigurationError(f"{flag_of(assignment.name)} is given twice (by its flag or --set)")
        given[assignment.name] = list(assignment.values)
    return given


def one(value: float | None) -> tuple[float] | None:
    """A setting that takes one number, as a list of one (the form every setting is given in)."""
    return None if value is None else (value,)


# What to read ------------------------------------------------------------------------------------------

CheckpointDir = Annotated[
    Path,
    typer.Argument(metavar="CKPT_DIR", help="Folder holding the run's checkpoints (searched recursively)."),
]
Last = Annotated[int | None, typer.Option(help="Use only the newest N checkpoints.", rich_help_panel=_READ)]
FromStep = Annotated[
    int | None, typer.Option(help="Use checkpoints from this step on.", rich_help_panel=_READ)
]
ToStep = Annotated[int | None, typer.Option(help="Use checkpoints up to this step.", rich_help_panel=_READ)]
Every = Annotated[
    int | None,
    typer.Option(help="Use every K-th checkpoint, counted back from the newest.", rich_help_panel=_READ),
]
Include = Annotated[
    list[str] | None,
    typer.Option(help="Only tensors matching this glob (repeatable).", rich_help_panel=_READ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(help="Leave out tensors matching this glob (repeatable).", rich_help_panel=_READ),
]
StateDictKey = Annotated[
    str | None,
    typer.Option(
        help="Key of the weights inside torch files (e.g. ema); default: found automatically.",
        rich_help_panel=_READ,
    ),
]
StepsFromOption = Annotated[
    StepsFrom,
    typer.Option(
        help="Where steps come from: metadata, filename, or auto (metadata, then filename).",
        rich_help_panel=_READ,
    ),
]
Submodel = Annotated[
    str | None,
    typer.Option(
        help="In a checkpoint holding several models (diffusers unet/unet_ema, an adapter beside the full "
        "model, DeepSpeed's module vs fp32 master weights), read this one; the plan names the others.",
        rich_help_panel=_READ,
    ),
]
StepEvery = Annotated[
    int | None,
    typer.Option(
        help="Checkpoints numbered by a count of saves or epochs (accelerate checkpoint_K, timm/torchtune "
        "epochs): training steps between saves. step = (count + 1) x N for counts from 0 (timm, "
        "ultralytics, torchtune, accelerate), count x N for epochs completed counted from 1 (open_clip, "
        "mmengine); the plan says which.",
        rich_help_panel=_READ,
    ),
]
StepList = Annotated[
    Steps | None,
    typer.Option(
        parser=_steps,
        metavar="INT[,INT...]",
        help="Each checkpoint's training step, oldest first, comma-separated (e.g. 500,1000,1500).",
        rich_help_panel=_READ,
    ),
]
Glob = Annotated[
    list[str] | None,
    typer.Option(
        help="Use only checkpoints whose name matches (repeatable), e.g. 'checkpoint_*_*.pt' (fairseq's "
        "update checkpoints).",
        rich_help_panel=_READ,
    ),
]

# How to average ----------------------------------------------------------------------------------------

Method = Annotated[
    str,
    typer.Option(
        help="A registered moving average: exponential (EMA), uniform (mean of the checkpoints), power "
        "(EDM2 power-function EMA), one added with @MovingAverage.register, or one another installed package "
        "declares (entry-point group ema_average.averages); its settings by --set NAME=VALUE. posthoc: CKPT_DIR "
        "holds post-hoc EMA snapshots; --sigma-rel (or --gamma) names the power EMAs to reconstruct from them.",
        rich_help_panel=_AVERAGE,
    ),
]
ScheduleOption = Annotated[
    Schedule,
    typer.Option(
        help="checkpoint: one update per checkpoint (num_updates = its step); step: the per-step rule over "
        "every training step between checkpoints, as an online EMA would have applied it.",
        rich_help_panel=_AVERAGE,
    ),
]


def _setting_list(rule: type[DecayRule], name: str) -> typer.models.OptionInfo:
    """A built-in setting that takes a comma list (one average per value), its help as its rule declares."""
    return typer.Option(
        parser=_numbers, metavar=_LIST, help=_setting_help(rule, name), rich_help_panel=_AVERAGE
    )


def _setting_one(rule: type[DecayRule], name: str) -> typer.models.OptionInfo:
    """A built-in setting that takes one number, its help as its rule declares."""
    return typer.Option(help=_setting_help(rule, name), rich_help_panel=_AVERAGE)


Decay = Annotated[Numbers | None, _setting_list(ExponentialRule, "decay")]
HalfLife = Annotated[Numbers | None, _setting_list(ExponentialRule, "half_life")]
Gamma = Annotated[Numbers | None, _setting_list(PowerRule, "gamma")]
SigmaRel = Annotated[Numbers | None, _setting_list(PowerRule, "sigma_rel")]
Numerator = Annotated[float | None, _setting_one(ExponentialRule, "numerator")]
Denominator = Annotated[float | None, _setting_one(ExponentialRule, "denominator")]
SetAssignments = Annotated[
    list[Assignment] | None,
    typer.Option(
        "--set",
        parser=_assignment,
        metavar="NAME=VALUE[,VALUE...]",
        help="Any setting the --method's rule declares, by name (e.g. --set decay=0.999, or a setting of an "
        "average another package adds); repeatable; a comma list where the setting takes one.",
        rich_help_panel=_AVERAGE,
    ),
]
AtStep = Annotated[
    int | None,
    typer.Option(
        help="--method posthoc: the training step to reconstruct the EMAs at, from the snapshots at or before "
        "it. Default: the last snapshot's.",
        rich_help_panel=_AVERAGE,
    ),
]
SnapshotSigmaRel = Annotated[
    Numbers | None,
    typer.Option(
        parser=_numbers,
        metavar=_LIST,
        help="--method posthoc over ema-pytorch PostHocEMA snapshots (N.STEP.pt): the sigma_rel of each "
        "profile, in its index order (their files do not record them), e.g. 0.05,0.28.",
        rich_help_panel=_AVERAGE,
    ),
]
Resume = Annotated[
    Path | None,
    typer.Option(
        help="Continue this earlier output with the newer checkpoints only (same settings). Default output: itself.",
        rich_help_panel=_AVERAGE,
    ),
]
Watch = Annotated[
    bool,
    typer.Option(
        "--watch",
        help="Keep running: take each new checkpoint when complete, refresh the output; Ctrl-C stops.",
        rich_help_panel=_AVERAGE,
    ),
]
Poll = Annotated[
    float,
    typer.Option(
        help="With --watch: seconds between looks (a file must hold still this long).",
        rich_help_panel=_AVERAGE,
    ),
]

# Output ------------------------------------------------------------------------------------------------

Output = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        help="Output .safetensors file, or (any other name) a folder that the producing library's "
        "from_pretrained loads: weights named as the input's, with its config and tokenizer files. "
        "Default: CKPT_DIR-ema.safetensors beside CKPT_DIR. With several averages each output is named "
        "for its setting: OUT-decay0.999.safetensors.",
        rich_help_panel=_OUTPUT,
    ),
]
Dtype = Annotated[
    OutputDtype,
    typer.Option(
        help="Output dtype of averaged tensors; as-input keeps each tensor's saved dtype.",
        rich_help_panel=_OUTPUT,
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output.", rich_help_panel=_OUTPUT)
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Show the plan and stop; write nothing.", rich_help_panel=_OUTPUT)
]
MaxShardSize = Annotated[
    int | None,
    typer.Option(
        parser=_size,
        metavar="SIZE",
        help="Write the output folder in shards of at most this size (e.g. 5GB) with an index.json.",
        rich_help_panel=_OUTPUT,
    ),
]
StripPrefix = Annotated[
    str, typer.Option(help="Remove this prefix from output names (e.g. 'model.').", rich_help_panel=_OUTPUT)
]

# Safety ------------------------------------------------------------------------------------------------

TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="UNSAFE: fully unpickle torch files that need it (runs their code).",
        rich_help_panel=_SAFETY,
    ),
]
AllowNonfinite = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Average NaN/Inf values instead of refusing the checkpoint holding them.",
        rich_help_panel=_SAFETY,
    ),
]

# Performance, and the command's own --------------------------------------------------------------------

Device = Annotated[
    str, typer.Option(help="Where the averages live: cpu, cuda, cuda:N or mps.", rich_help_panel=_SPEED)
]
Threads = Annotated[
    int | None,
    typer.Option(
        help="Worker threads, each reading, averaging and writing chunks of its own. Default: one per core.",
        rich_help_panel=_SPEED,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No plan, progress or summary; errors only.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
Version = Annotated[
    bool | None,
    typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
]
