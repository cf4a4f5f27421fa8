"""Finding a run's checkpoints and reading them lazily, one module per layout. No averaging here.

Every layout is known through the registry (:func:`layouts`, :func:`register`); discovery asks it alone.
"""

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    ModelChoice,
    OpenOptions,
    SavedModel,
    SavedWeights,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.contents.steps import step_from_name
from ema_average.checkpoints.discovery.discover import Run, discover, find_run, validate_run
from ema_average.checkpoints.layouts.dcp_folder import DcpCheckpoint
from ema_average.checkpoints.layouts.deepspeed_folder import DeepSpeedCheckpoint
from ema_average.checkpoints.layouts.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.layouts.save_pretrained import HfFolderCheckpoint
from ema_average.checkpoints.layouts.torch_file import TorchCheckpoint
from ema_average.checkpoints.registry import layouts, register

__all__ = [
    "Checkpoint",
    "DcpCheckpoint",
    "DeepSpeedCheckpoint",
    "HfFolderCheckpoint",
    "Layout",
    "ModelChoice",
    "OpenOptions",
    "Run",
    "SafetensorsCheckpoint",
    "SavedModel",
    "SavedWeights",
    "StepInfo",
    "TensorSpec",
    "TorchCheckpoint",
    "discover",
    "find_run",
    "layouts",
    "register",
    "step_from_name",
    "validate_run",
]
