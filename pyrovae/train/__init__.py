"""The fit loop, checkpoints and evaluation on a split."""

from pyrovae.train.checkpoint import BEST, LATEST, load_checkpoint, load_checkpoint_or_previous, previous_path, save_checkpoint
from pyrovae.train.loop import (
    FitResult,
    TrainConfig,
    TrainState,
    evaluate_objective,
    fit,
    make_optimizer,
    parameter_groups,
)
from pyrovae.train.devices import resolve_device

__all__ = [
    "BEST",
    "LATEST",
    "FitResult",
    "TrainConfig",
    "TrainState",
    "evaluate_objective",
    "fit",
    "load_checkpoint",
    "load_checkpoint_or_previous",
    "make_optimizer",
    "parameter_groups",
    "previous_path",
    "resolve_device",
    "save_checkpoint",
]
