"""The one object the loop's parts share: what is trained, on what, with what, and where it stands.

``Training(...)`` joins the distributed job (if any), resolves the device, moves the pair and
the data there, builds the schedules and the optimizer; ``state`` starts fresh and is replaced by a
resume or a non-finite recovery, so the parts read it from here every time and keep none of it.
"""

from __future__ import annotations

from typing import Callable

from pyrovae.data.splits import DataSplits, check_splits
from pyrovae.errors import ConfigError
from pyrovae.pair import check_pair
from pyrovae.schedules import StepSchedules
from pyrovae.traces import preserved_rng
from pyrovae.train import distributed
from pyrovae.train.optim import LearningRates, make_optimizer
from pyrovae.train.progress import messenger
from pyrovae.train.ranks import Ranks
from pyrovae.train.settings import FitOptions, TrainConfig
from pyrovae.train.state import TrainState
from pyrovae.train.step import autocast_for


class Training:
    """What is trained, on what, with what, and where it stands; set up on construction:

    ``model``, ``guide``, ``objective``, ``data`` (moved to ``device``), ``config``; ``context`` (this
    process's place in a ``torchrun`` job, or the single process) and ``say`` (messages, rank 0
    only); ``schedules`` (beta, per-site beta, named inputs); ``selection_metric`` (the objective's
    model-selection score); ``autocast`` (what the step's forward runs under; None: float32);
    ``optimizer``, ``parameters`` (all of its parameters), ``learning_rates``; ``ranks`` (batches,
    gradient averaging and metrics across ranks); ``state`` (a fresh :class:`TrainState`, replaced
    by a resume or a recovery)."""

    def __init__(self, model, guide, objective, data: DataSplits, config: TrainConfig, options: FitOptions):
        self.context = distributed.setup(config.device)
        self.say: Callable[[str], None] = messenger(self.context)
        self.schedules = StepSchedules.for_pair(model, guide, options.anneal, options.anneal_sites, options.inputs)
        self.selection_metric: str = getattr(objective, "selection_metric", "elbo")
        self.device = distributed.training_device(config.device, self.context)
        self.autocast = autocast_for(config.precision, self.device, self.say)
        model.to(self.device)
        guide.to(self.device)
        self.model, self.guide, self.objective, self.config = model, guide, objective, config
        self.data = data.to(self.device)
        self.optimizer = make_optimizer(model, guide, config)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.learning_rates = LearningRates(self.optimizer, config.lr_decay, config.lr_plateau_factor)
        self.ranks = Ranks(self.context, self.parameters)
        self.state = TrainState(aggressive=config.strategy == "aggressive")

    def share_and_check(self) -> None:
        """Before the first step: every rank takes rank 0's parameters (as DDP does), and the data
        and the pair are checked; a check that fails on one rank stops every rank with its message."""
        distributed.broadcast_module_state(self.context, self.model, self.guide)
        distributed.agree(self.context, self._check, "checking the data and the pair")

    def _check(self) -> None:
        model, data, config, schedules = self.model, self.data, self.config, self.schedules
        # Every split in full, before the first step: a bad row anywhere stops the run now, not after it.
        check_splits(data, model.check_batch, cache_key=_check_key(model))
        with preserved_rng():  # a dynamically binarized batch draws random numbers
            first = next(data.batches("train", min(config.batch_size, 64)))
            clashes = sorted(set(schedules.inputs) & set(first))
            if clashes:
                raise ConfigError(f"scheduled input {clashes[0]!r} has the name of a batch key (the batch has {sorted(first)})")
            check_pair(model, self.guide, {**first, **schedules.input_values(self.state.step)})


def _check_key(model) -> tuple | None:
    """What ``model.check_batch`` depends on, for :func:`check_splits`'s cache (None: not cached)."""
    try:
        key = (type(model), model.data, repr(getattr(model, "config", None)), repr(getattr(model, "likelihood", None)))
        hash(key)
    except TypeError:
        return None
    return key
