"""Best-model selection and early stopping, from the validation score of each epoch.

The score is the objective's ``selection_metric`` (the ELBO; the K-sample bound under IWAE).
An epoch is the best so far when its score is above the best one's, and the first epoch always
is, so ``best.pt`` exists even if validation went non-finite; without validation every epoch is
the best (``best.pt`` is the latest). After ``patience`` epochs without a better score the run
stops, and the stop is part of the checkpointed state, so a resume trains no further. It also
warns when the score is non-finite although training stayed finite, and once when it falls far
below its first epoch's (divergence without a NaN, see :func:`diverged`).

With ``train.lr_plateau_patience`` (He et al. 2019's schedule), every that many epochs without a
better score the learning rates decay: ``lr_plateau_decays`` counts the decays, and
:class:`~pyrovae.train.optim.LearningRates` applies them from the next epoch's start. With
``lr_plateau_max_decays`` the run stops at that many decays. Its state lives in the checkpointed
:class:`~pyrovae.train.state.TrainState` (``best_valid_score``, ``best_epoch``,
``epochs_without_improvement``, ``lr_plateau_decays``, ``stopped_early``), so a resume continues it.
"""

from __future__ import annotations

import math
from typing import Callable

from pyrovae.train.state import TrainState

# Divergence without NaN: warn when the validation score falls this far below its first epoch's value
# (the larger of an absolute and a relative margin, in the score's units, nats for the ELBO).
DIVERGENCE_NATS, DIVERGENCE_FRACTION = 10.0, 0.5


def diverged(history: list[dict], key: str) -> bool:
    """Whether the latest ``key`` in ``history`` lies far below the first epoch's (see DIVERGENCE_*)."""
    if len(history) < 2 or key not in history[0] or key not in history[-1]:
        return False
    first, last = history[0][key], history[-1][key]
    return math.isfinite(first) and math.isfinite(last) and last < first - max(DIVERGENCE_NATS, DIVERGENCE_FRACTION * abs(first))


class BestAndEarlyStop:
    """:meth:`update` after each epoch (its record already in the history) says whether the epoch is
    the best so far and decides the early stop."""

    def __init__(
        self,
        metric: str,
        patience: int = 0,
        validate: bool = True,
        say: Callable[[str], None] = print,
        plateau_patience: int = 0,
        plateau_max_decays: int = 0,
    ):
        self.metric, self.patience, self.validate, self.say = metric, patience, validate, say
        self.plateau_patience, self.plateau_max_decays = plateau_patience, plateau_max_decays
        self._decayed_at = -1  # the epoch whose end decayed the learning rates (said by announce)

    @classmethod
    def for_training(cls, training) -> "BestAndEarlyStop":
        config = training.config
        return cls(
            training.selection_metric, config.patience, config.validate, training.say,
            config.lr_plateau_patience, config.lr_plateau_max_decays,
        )

    def update(self, state: TrainState, valid_metrics: dict[str, float]) -> bool:
        """Record the epoch's score in ``state``; returns whether it is the best so far."""
        metric = self.metric
        # Without validation every epoch counts as the best so far: best.pt is the latest.
        score = valid_metrics[metric] if self.validate else None
        # The first epoch always writes best.pt, so evaluation finds one even if validation went non-finite.
        improved = score is None or score > state.best_valid_score or state.best_epoch < 0
        if score is not None and not math.isfinite(score):
            self.say(
                f"warning: validation {metric} is {score} at epoch {state.epoch} although training stayed "
                "finite; check the validation data and the model's scales"
            )
        if improved:
            state.best_valid_score, state.best_epoch = (state.best_valid_score if score is None else score), state.epoch
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
            stops_by_patience = bool(self.patience and state.epochs_without_improvement >= self.patience)
            if self.plateau_patience and state.epochs_without_improvement % self.plateau_patience == 0 and not stops_by_patience:
                # He et al. 2019: every plateau_patience epochs without a better score, decay (see TrainConfig).
                state.lr_plateau_decays += 1
                self._decayed_at = state.epoch
        state.stopped_early = self.stops(state)
        key = f"valid/{metric}"
        if diverged(state.history, key) and not diverged(state.history[:-1], key):
            self.say(
                f"warning: validation {metric} {score:.4g} at epoch {state.epoch} is far below its first "
                f"epoch's {state.history[0][key]:.4g}: training is diverging without a NaN; "
                f"consider a lower train.lr or train.clip_norm"
            )
        return improved

    def stops(self, state: TrainState) -> bool:
        """Whether the run is over: ``patience`` epochs without a better score, or the
        ``plateau_max_decays``-th plateau decay."""
        return bool(self.patience and state.epochs_without_improvement >= self.patience) or self._decayed_out(state)

    def decayed(self, state: TrainState) -> bool:
        """Whether the latest :meth:`update` decayed the learning rates."""
        return self._decayed_at == state.epoch

    def _decayed_out(self, state: TrainState) -> bool:
        return bool(self.plateau_max_decays and state.lr_plateau_decays >= self.plateau_max_decays)

    def announce(self, state: TrainState) -> None:
        """After an epoch (and its progress line): say so when it decayed the learning rates or ended the run."""
        if self._decayed_at == state.epoch and not self._decayed_out(state):
            self.say(
                f"no better validation {self.metric} in the last {state.epochs_without_improvement} epoch(s): learning "
                f"rates decayed (plateau decay {state.lr_plateau_decays}) for the epochs after epoch {state.epoch}"
            )
        if state.stopped_early and self._decayed_out(state):
            self.say(f"stopping at epoch {state.epoch}: the learning rates have decayed {state.lr_plateau_decays} times (train.lr_plateau_max_decays)")
        elif state.stopped_early:
            self.say(f"early stopping at epoch {state.epoch}: no better validation {self.metric} for {self.patience} epochs")
