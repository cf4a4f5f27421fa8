"""Finding a run's checkpoints and reading them lazily, one module per layout. No averaging here.

Every layout is listed once, in ``layouts.LAYOUTS``; discovery loops over it.
"""

from ema_average.checkpoints.base import (
    Checkpoint,
    Layout,
    ModelChoice,
    OpenOptions,
    SavedModel,
    StepInfo,
    TensorSpec,
)
from ema_average.checkpoints.dcp_folder import DcpCheckpoint
from ema_average.checkpoints.deepspeed_folder import DeepSpeedCheckpoint
from ema_average.checkpoints.discover import Run, discover, find_run, validate_run
from ema_average.checkpoints.hf_folder import HfFolderCheckpoint
from ema_average.checkpoints.layouts import LAYOUTS
from ema_average.checkpoints.safetensors_file import SafetensorsCheckpoint
from ema_average.checkpoints.steps import step_from_name
from ema_average.checkpoints.torch_file import TorchCheckpoint

__all__ = [
    "LAYOUTS",
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
    "StepInfo",
    "TensorSpec",
    "TorchCheckpoint",
    "discover",
    "find_run",
    "step_from_name",
    "validate_run",
]
