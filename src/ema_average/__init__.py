"""ema-average: exponential moving averages of PyTorch weights, online and from saved checkpoints.

The names below are imported on first use (PEP 562), so ``import ema_average`` and the command's
``--version`` and ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib

from ema_average._platform.torch_floor import check_torch_version
from ema_average._version import __version__
from ema_average.errors import (
    AverageStateError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigurationError,
    DeviceError,
    EmaAverageError,
    NoCheckpointsError,
    NonFiniteError,
    OutputError,
    OutputRangeError,
    ParameterError,
    PluginError,
    TrustPickleWarning,
    UnsafeCheckpointError,
)

check_torch_version()

TYPE_CHECKING = False  # not typing's: importing typing costs 10 ms before the command's interrupt guard

_LAZY = {
    "Checkpoint": "ema_average.checkpoints",
    "discover": "ema_average.checkpoints",
    "find_run": "ema_average.checkpoints",
    "ExponentialMovingAverage": "ema_average.engine.averages",
    "MovingAverage": "ema_average.engine.averages",
    "PowerFunctionMovingAverage": "ema_average.engine.averages",
    "UniformMovingAverage": "ema_average.engine.averages",
    "ema_update_": "ema_average.engine.averages",
    "PowerEmaSnapshots": "ema_average.online.posthoc_training",
    "RunOptions": "ema_average.offline.options",
    "Summary": "ema_average.offline.run",
    "average_checkpoints": "ema_average.offline.run",
    "save_safetensors": "ema_average.online.sharded_export",
    "AverageSettings": "ema_average.offline.plan",
    "CheckpointSelection": "ema_average.offline.plan",
    "TensorSelection": "ema_average.offline.plan",
}

if TYPE_CHECKING:
    from typing import Any

    from ema_average.checkpoints import Checkpoint, discover, find_run
    from ema_average.engine.averages import (
        ExponentialMovingAverage,
        MovingAverage,
        PowerFunctionMovingAverage,
        UniformMovingAverage,
        ema_update_,
    )
    from ema_average.offline.options import RunOptions
    from ema_average.offline.plan import AverageSettings, CheckpointSelection, TensorSelection
    from ema_average.offline.run import Summary, average_checkpoints
    from ema_average.online.posthoc_training import PowerEmaSnapshots
    from ema_average.online.sharded_export import save_safetensors


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ema_average' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
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
    "NonFiniteError",
    "OutputError",
    "OutputRangeError",
    "ParameterError",
    "PluginError",
    "PowerEmaSnapshots",
    "PowerFunctionMovingAverage",
    "RunOptions",
    "Summary",
    "TensorSelection",
    "TrustPickleWarning",
    "UniformMovingAverage",
    "UnsafeCheckpointError",
    "__version__",
    "average_checkpoints",
    "discover",
    "ema_update_",
    "find_run",
    "save_safetensors",
]
