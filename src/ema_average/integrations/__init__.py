"""EMA callbacks for training frameworks: thin adapters over the one engine.

``ema_average.integrations.lightning.EMACallback`` (a ``lightning.pytorch.Callback``) and
``ema_average.integrations.transformers.EMACallback`` (a ``transformers.TrainerCallback``) keep an
:class:`~ema_average.ExponentialMovingAverage` of the model's parameters while it trains. What they share
lives here, free of either framework, so the package imports without them: when to update (once per
optimizer step, ``num_updates`` = the trainer's global step), swapping the averages in for evaluation,
the state saved with the trainer's checkpoint and read back on resume, and the refusal of models whose
parameters are not there between steps (DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ema_average.errors import AverageStateError, ConfigurationError
from ema_average.moving_average import ExponentialMovingAverage, is_dtensor, local_part
from ema_average.moving_average.parameters import fsdp_modules

__all__ = [
    "EVALUATE_CHOICES",
    "EmaTracker",
    "average_model_state",
    "averaged_parameters",
    "unwrap_model",
    "weights_digest",
]

# What validation and test run on: the averages (swapped in), the training weights, or both (the raw
# weights' metrics logged under their own names).
EVALUATE_CHOICES = ("ema", "raw", "both")

# The trainer-independent part of the callbacks' saved state (beside the averages themselves).
STATE_KEYS = ("method", "settings", "num_applied", "last_step")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DeepSpeed wrappers: the names its own ``state_dict`` has."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
        type(model).__name__ == "DeepSpeedEngine"
        and isinstance(getattr(model, "module", None), torch.nn.Module)
    ):
        model = model.module
    return model


def _refuse_unsupported(model: torch.nn.Module, dtensor_refusal: str | None) -> None:
    """Refuse, before the first step, parameters the callbacks cannot average and save correctly.

    ZeRO-3 partitions parameters and gathers them only inside forward: an average of the empty placeholders
    would be a silent wrong EMA; FSDP (the first) flattens them into shards named for none of them. Sharded
    DTensor parameters (FSDP2, tensor parallel) the engine averages shard by shard; a callback that cannot
    save such averages passes ``dtensor_refusal``, the reason it gives.
    """
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ConfigurationError(
            "the model is wrapped in FSDP (FullyShardedDataParallel), whose flat parameters are not the "
            "model's: the EMA callbacks cannot average them; use FSDP2 (fully_shard) under Lightning, DDP, "
            "or ExponentialMovingAverage(model) in the loop"
        )
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise ConfigurationError(
                f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (empty outside forward): the EMA "
                "callback cannot average it; use ZeRO stage 1 or 2, or DDP"
            )
        if dtensor_refusal is not None and is_dtensor(param):
            raise ConfigurationError(
                f"parameter {name!r} is sharded (a DTensor: FSDP2 or tensor parallel): {dtensor_refusal}"
            )


def averaged_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer moves (all of them if none is trainable, as for a model only evaluated).

    A frozen parameter's average is the parameter itself, bit for bit (``lerp`` of equal values), so it is
    saved from the model like a buffer rather than kept twice: a LoRA run does not hold a float32 copy of
    its frozen base model. A parameter unfrozen later in the run is not averaged.
    """
    named = list(model.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    return trainable or named


def weights_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """A SHA-256 of the named tensors' names, dtypes, shapes and raw bytes (this rank's part of a DTensor).

    Recorded beside a saved EMA with the training weights it was saved with, and compared on resume with
    the weights the trainer has just restored: the EMA continued is the one of exactly those weights,
    whatever folder they were found in, never another run's.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        value = local_part(tensor).detach()
        digest.update(f"{name}|{str(value.dtype).removeprefix('torch.')}|{tuple(value.shape)}\n".encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class EmaTracker:
    """The average of one model while it trains, and the bookkeeping both callbacks need around it.

    The engine is built once the trainer has placed the model (on its device, inside its wrappers): a
    state read from a checkpoint before that is kept and loaded into it then.
    """

    def __init__(
        self,
        decay: float,
        numerator: float,
        denominator: float,
        *,
        device: torch.device | str | None,
        every: int,
        evaluate: str,
        dtensor_refusal: str | None = None,
    ) -> None:
        self.rule = ExponentialMovingAverage.make_rule(
            decay=decay, numerator=numerator, denominator=denominator
        )  # bad settings fail here, before training starts
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"every must be a whole number of optimizer steps >= 1, got {every!r}")
        if evaluate not in EVALUATE_CHOICES:
            raise ConfigurationError(
                f"evaluate must be one of {', '.join(EVALUATE_CHOICES)}, got {evaluate!r}"
            )
        self.device = device
        self.every = every
        self.evaluate = evaluate
        self.dtensor_refusal = dtensor_refusal
        self.average: ExponentialMovingAverage | None = None
        self.model: torch.nn.Module | None = None
        self.tracked: list[tuple[str, torch.nn.Parameter]] = []  # the parameters averaged, by name
        self.last_step = 0  # the global step of the last update (or of the start)
        self.swapped = False  # the averages are in the model, the training weights kept aside
        self._fsdp: list[torch.nn.Module] = []  # FSDP2 modules, resharded around a swap
        self._pending: dict[str, Any] | None = None

    # --- building ---------------------------------------------------------------------------------

    def start(self, model: torch.nn.Module, global_step: int, *, training: bool) -> ExponentialMovingAverage:
        """The average of ``model``, with any state read from a checkpoint loaded into it.

        Built anew for another model, or when training starts from an earlier step than the last update (a
        new run with a callback used before): continuing an average from a later step would skip every
        update up to it. An evaluation on its own (a new trainer, step 0) uses the average as it is.
        """
        model = unwrap_model(model)
        went_back = training and global_step < self.last_step
        if self.average is None or self.model is not model or went_back:
            _refuse_unsupported(model, self.dtensor_refusal)
            self.swap_out()  # never leave the averages in a model this tracker stops following
            rule = self.rule
            self.tracked = averaged_parameters(model)
            self.average = ExponentialMovingAverage(
                self.tracked, rule.decay, rule.numerator, rule.denominator, device=self.device
            )
            self.model = model
            self._fsdp = fsdp_modules(model)
            self.last_step = global_step
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending, global_step, training=training)
        return self.average

    # --- updating ---------------------------------------------------------------------------------

    def step(self, global_step: int) -> bool:
        """Update after an optimizer step: once per global step, every ``every`` steps; whether it did.

        ``every == 1`` is ``apply(num_updates=global_step)``, the library's own loop. With gaps, the update
        takes the product of the skipped steps' decays (the offline ``--schedule step`` rule), so the
        average stays that of every step's weights as nearly as the values seen allow.
        """
        if self.average is None or global_step <= self.last_step or global_step % self.every:
            return False
        if global_step - self.last_step == 1:
            self.average.apply(num_updates=global_step)
        else:
            values = [p for _, p in self.tracked]
            self.average.update_with_decay(values, self.rule.between(self.last_step, global_step))
        self.last_step = global_step
        return True

    # --- evaluation -------------------------------------------------------------------------------

    def swap_in(self) -> bool:
        """Put the averages into the model (training weights kept); whether they were put in."""
        if self.average is None or self.evaluate == "raw" or self.swapped:
            return False
        self._reshard()
        self.average.assign_average_value()
        self.swapped = True
        return True

    def swap_out(self) -> None:
        """Put the training weights back, bit for bit, if the averages are in."""
        if self.swapped:
            assert self.average is not None
            self.average.restore()
            self.swapped = False
            self._reshard()

    def _reshard(self) -> None:
        """Drop FSDP2's gathered weights (local, no communication), as the engine does for a model given whole.

        The averages cover the trainable parameters only, so the engine is given them by name and does not
        know the modules: after a forward FSDP2's root keeps its gathered weights, and a forward after a swap
        would run on them rather than on the shards just swapped.
        """
        for module in self._fsdp:
            module.reshard()  # type: ignore[operator]

    # --- saving and resuming ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What resuming needs beside the averages: the rule, the update count, the last step."""
        if self.average is None:
            return {}
        return {
            "method": self.average.registered_name,
            "settings": self.average.settings(),
            "num_applied": self.average.num_applied,
            "last_step": self.last_step,
        }

    def load(self, state: object, averages: object, where: str) -> None:
        """Resume from a checkpoint's saved state and averages, at the next :meth:`start`.

        The record is untrusted input, checked as ``load_state_dict`` checks a state: anything but the
        mapping :meth:`state` writes (empty, ``null``, a list) is refused with one line naming ``where``,
        never taken as "no average" (that would throw the saved one away and start anew).
        """
        if not isinstance(state, Mapping):
            raise AverageStateError(
                f"{where}: the EMA callback's saved state must be the mapping it writes, got "
                f"{type(state).__name__} {_shown(state)}"
            )
        if not state:
            raise AverageStateError(
                f"{where}: the EMA callback's saved state is empty: the checkpoint holds no average to "
                "continue; resume from a checkpoint saved with the callback, or start a new run from these "
                "weights"
            )
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise AverageStateError(f"{where}: the EMA callback's saved state lacks {', '.join(missing)}")
        if not isinstance(averages, Mapping):
            raise AverageStateError(
                f"{where}: the EMA callback's saved averages must be a mapping of tensors, got "
                f"{type(averages).__name__}"
            )
        last_step = _saved_step(where, state["last_step"])
        num_applied = state["num_applied"]
        if isinstance(num_applied, int) and not isinstance(num_applied, bool) and num_applied > last_step:
            raise AverageStateError(
                f"{where}: the EMA callback's saved state counts {num_applied} updates by step {last_step}: "
                "at most one update a step; the record is inconsistent"
            )
        self._pending = {
            "method": state["method"],
            "settings": state["settings"],
            "num_applied": num_applied,  # checked by the engine's load_state_dict
            "last_step": last_step,
            "averages": averages,
            "where": where,
        }  # loaded by start(), once the trainer has placed the model it belongs to

    def _load(self, pending: dict[str, Any], global_step: int, *, training: bool) -> None:
        """Load a checked record into the average: all of it, or a one-line refusal naming the file."""
        assert self.average is not None
        where = pending["where"]
        if training and pending["last_step"] > global_step:
            raise AverageStateError(
                f"{where}: the EMA callback's last update is at step {pending['last_step']}, after the "
                f"trainer's step {global_step} restored from the same checkpoint: the record is not this "
                "checkpoint's (continuing it would skip every update up to that step)"
            )
        live = self.average.averages()
        names = list(live)
        averages = pending["averages"]
        absent = [n for n in names if n not in averages]
        if absent:
            raise AverageStateError(
                f"{where}: holds no EMA of parameter {absent[0]!r} ({len(absent)} missing); "
                "was it saved from another model?"
            )
        self._check_settings(pending["method"], pending["settings"], where)
        chosen = {}
        for name in names:
            saved = averages[name]
            if isinstance(saved, torch.Tensor) and saved.is_floating_point() and not _finite(saved):
                raise AverageStateError(
                    f"{where}: the saved EMA of parameter {name!r} holds NaN or infinite values; "
                    "continuing it would carry them into every later save"
                )
            chosen[name] = _laid_out_as(live[name], saved)
        state = {
            "method": pending["method"],
            "settings": pending["settings"],
            "num_applied": pending["num_applied"],
            "averages": chosen,
        }
        try:
            self.average.load_state_dict(state, settings="state")  # the settings checked just above
        except AverageStateError as exc:
            raise AverageStateError(f"{where}: {exc}") from None
        self.last_step = pending["last_step"]

    def _check_settings(self, method: object, settings: object, where: str) -> None:
        """The saved rule is this callback's, or a refusal whose advice a callback's user can follow."""
        assert self.average is not None
        name = self.average.registered_name
        if method != name:
            raise AverageStateError(f"{where}: the saved average is {method!r}, this callback keeps {name!r}")
        try:
            saved = type(self.average).make_rule(**settings) if isinstance(settings, Mapping) else None
        except (ConfigurationError, TypeError, ValueError):
            saved = None
        if saved is None:
            raise AverageStateError(
                f"{where}: the saved settings {_shown(settings)} are not an {name} average's"
            )
        if saved != self.rule:
            raise AverageStateError(
                f"{where}: the EMA was saved with {_settings_text(saved.settings())}, this callback has "
                f"{_settings_text(self.rule.settings())}; build EMACallback({_settings_text(saved.settings())}) "
                "to continue it"
            )


def average_model_state(
    model: torch.nn.Module, averages: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every averaged parameter's entry (tied names included) replaced by its
    average.

    Buffers (batch-norm statistics) and frozen parameters are the model's own: what ``load_state_dict`` /
    ``from_pretrained`` needs to rebuild the averaged model. The averages are the live float32 tensors, not
    copies.
    """
    by_identity = {id(p): name for name, p in model.named_parameters() if name in averages}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = by_identity.get(id(value))
        state[key] = averages[name] if name is not None else value.detach()
    return state


def _laid_out_as(live: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A whole saved average of a sharded one as this rank's shard alone (a DTensor of ``live``'s layout,
    cut locally with no communication), so that resuming holds one whole tensor at a time, not the model."""
    if not is_dtensor(live) or not isinstance(saved, torch.Tensor) or is_dtensor(saved):
        return saved  # checked, and loaded or refused, by the engine's load_state_dict
    if tuple(saved.shape) != tuple(live.shape):
        return saved  # the engine names the mismatch
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh, placements = live.device_mesh, live.placements  # type: ignore[attr-defined]
    shard = distribute_tensor(saved.to(live.device), mesh, placements, src_data_rank=None)
    local = local_part(shard).clone()  # not a view that keeps the whole tensor alive
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=live.shape, stride=live.stride()
    )


def _saved_step(where: str, value: Any) -> int:
    """The trainer step of the last update, as saved: a whole number >= 0 (2.7 is not truncated to 2)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AverageStateError(
            f"{where}: the EMA callback's saved last_step must be a whole number >= 0, got {value!r}"
        )
    return value


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a saved average (this rank's part of a DTensor) is finite."""
    return bool(torch.isfinite(local_part(tensor)).all())


def _shown(value: object, limit: int = 60) -> str:
    """A short repr of an untrusted value for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())
