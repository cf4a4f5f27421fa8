"""The exceptions every layer raises.

One small hierarchy so that callers can catch ``EmaAverageError`` for "the user gave us something
wrong" and the CLI can turn any of them into a one-line message and exit code 1. Each class also
derives from the builtin a Python user would reach for first (``ValueError``, ``RuntimeError``...).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's own costs 10 ms: the entry point imports this before its interrupt guard
if TYPE_CHECKING:
    from pathlib import Path


class EmaAverageError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(EmaAverageError, ValueError):
    """A setting is out of range or settings contradict each other (decay, num_updates, options)."""


class PluginError(EmaAverageError, ImportError):
    """An average another installed package declares does not load, or is not a moving average: that
    package's fault, not the command line's (exit 1, not 2)."""


class ParameterError(EmaAverageError, ValueError):
    """The tensors handed to an average cannot be averaged (empty, duplicate names, not floating)."""


class AverageStateError(EmaAverageError, RuntimeError):
    """An average was used in the wrong order, or a saved state does not fit it."""


class CheckpointError(EmaAverageError):
    """A checkpoint file or folder is missing, unreadable, unsafe or inconsistent with its run.

    ``path`` names the file at fault so the message always says which one.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        from pathlib import Path  # here, not above: pathlib costs 4 ms before the entry point's guard

        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class NoCheckpointsError(CheckpointError, FileNotFoundError):
    """A directory holds no checkpoint this tool can read."""


class NoWeightsError(CheckpointError):
    """A file holds no model weights (an empty state dict, trainer state only): beside a run's model it is
    a side file, skipped with a notice; alone it is the error."""


class UnsafeCheckpointError(CheckpointError):
    """A torch file needs arbitrary unpickling, which is refused unless the user opts in."""


class MissingPackageError(CheckpointError):
    """Full unpickling (--trust-pickle) needs a trainer's package that is not installed: not damage."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """Checkpoints of one run disagree on tensor names, shapes or dtypes, or on their steps."""


class NonFiniteError(CheckpointError, ValueError):
    """A checkpoint brings NaN or Inf into the average (refused unless --allow-nonfinite)."""


class OutputError(EmaAverageError, OSError):
    """The output cannot be written where asked (exists without --overwrite, disk full...)."""


class OutputRangeError(EmaAverageError, OverflowError):
    """A finite average does not fit the output dtype (float16 holds at most 65504): rounding it would
    write Inf. Raised by the command's ``--dtype`` and the library's ``save_safetensors(dtype=...)`` alike."""


class DeviceError(EmaAverageError, RuntimeError):
    """The requested device is not available on this machine."""


class TrustPickleWarning(UserWarning):
    """A checkpoint is being fully unpickled because the user passed --trust-pickle: its code can run."""


def interrupted(exc: BaseException) -> bool:
    """Whether a Ctrl-C (or SIGTERM, raised as one) caused ``exc``.

    An interrupt that lands while Python builds a class is re-raised wrapped (``RuntimeError: Error calling
    __set_name__``), and one inside a library's import may come back as that library's own error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        if isinstance(current, SystemExit):  # an exit decided on (after an interrupt it reported, say)
            return False
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False
