"""ema-average: exponential moving averages of PyTorch weights, online and from saved checkpoints."""

from ema_average._version import __version__
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
from ema_average.moving_average import ExponentialMovingAverage, MovingAverage, ema_update_

__all__ = [
    "AverageStateError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigurationError",
    "DeviceError",
    "EmaAverageError",
    "ExponentialMovingAverage",
    "MovingAverage",
    "NoCheckpointsError",
    "OutputError",
    "ParameterError",
    "UnsafeCheckpointError",
    "__version__",
    "ema_update_",
]
