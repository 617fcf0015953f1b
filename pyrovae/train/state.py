"""What a run keeps: :class:`TrainState` (checkpointed, so a resume continues exactly) and what
``fit`` returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_valid_score: float = -math.inf  # the objective's selection_metric on validation
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    nonfinite_retries: int = 0
    # Plateau decays of the learning rates so far (train.lr_plateau_patience).
    lr_plateau_decays: int = 0
    # Early stopping ended the run: a resume trains no further (it is part of the checkpointed state).
    stopped_early: bool = False
    # Aggressive guide updates: whether the mode is on, the last epoch's validation I(x; z), and the
    # epoch after which the mode ended (-1: not ended).
    aggressive: bool = False
    aggressive_mutual_information: float = -math.inf
    aggressive_ended_epoch: int = -1
    history: list[dict] = field(default_factory=list)


@dataclass
class FitResult:
    state: TrainState
    stopped_early: bool
    device: torch.device
