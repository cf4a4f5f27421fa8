"""ema-average: exponential moving averages of PyTorch weights, online and from saved checkpoints."""

from ema_average._version import __version__
from ema_average.checkpoints import Checkpoint, discover, find_run
from ema_average.errors import (
    AverageStateError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    DeviceError,
    EmaAverageError,
    NoCheckpointsError,
    OutputError,
    ParameterError,
    UnsafeCheckpointError,
)
from ema_average.moving_average import (
    ExponentialMovingAverage,
    MovingAverage,
    PowerFunctionMovingAverage,
    UniformMovingAverage,
    ema_update_,
)
from ema_average.pipeline import AverageOptions, Summary, average_checkpoints
from ema_average.plan import AverageSettings, CheckpointSelection, Selection

__all__ = [
    "AverageOptions",
    "AverageSettings",
    "AverageStateError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointSelection",
    "ConfigurationError",
    "DeviceError",
    "EmaAverageError",
    "ExponentialMovingAverage",
    "MovingAverage",
    "NoCheckpointsError",
    "OutputError",
    "ParameterError",
    "PowerFunctionMovingAverage",
    "Selection",
    "Summary",
    "UniformMovingAverage",
    "UnsafeCheckpointError",
    "__version__",
    "average_checkpoints",
    "discover",
    "ema_update_",
    "find_run",
]
