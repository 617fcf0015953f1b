"""The fit loop: the same for every VAE. It only calls ``objective(model, guide, batch)``.

``fit`` reads like its docstring: set up; for each epoch, run the steps, validate, record,
checkpoint, decide whether to stop. Each concern is a small part with its own module and tests:

- :mod:`~pyrovae.train.training`: the one object the parts share (pair, data, optimizer, device,
  schedules, state), set up once;
- :mod:`~pyrovae.train.resume`: resume and checkpoints (with every rank's random stream);
- :mod:`~pyrovae.train.selection`: best-model selection and early stopping;
- :mod:`~pyrovae.train.recovery`: non-finite recovery (finiteness read every ``log_every`` steps);
- :mod:`~pyrovae.train.step`: the step (eager, compiled, autocast) and argument validation;
- :mod:`~pyrovae.train.strategies`: aggressive guide updates;
- :mod:`~pyrovae.train.ranks`: batches, gradient averaging and metrics across ranks;
- :mod:`~pyrovae.train.progress`: messages, the progress bar and ``metrics.jsonl``;
- :mod:`~pyrovae.train.optim`: the optimizer (``"model"`` and ``"guide"`` groups) and its learning rate.

The pair is always called with the whole batch (every key the loader gives) plus the
scheduled inputs' current values as python floats: ``objective(model, guide, {**batch, **inputs})``.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

from pyrovae.analysis.classification import label_metrics
from pyrovae.data.splits import DataSplits
from pyrovae.train import distributed
from pyrovae.train.denormals import denormals_flushed
from pyrovae.train.devices import resolve_device
from pyrovae.train.evaluation import evaluate_objective
from pyrovae.train.optim import FUSED_OPTIMIZERS, OPTIMIZERS, make_optimizer, parameter_groups
from pyrovae.train.progress import Progress, Records, stderr_is_terminal
from pyrovae.train.recovery import FiniteWatch, NonFiniteRecovery, NonFiniteStep
from pyrovae.train.resume import Checkpoints, ReloadBest
from pyrovae.train.selection import DIVERGENCE_FRACTION, DIVERGENCE_NATS, BestAndEarlyStop, diverged
from pyrovae.train.settings import PRECISIONS, FitOptions, TrainConfig
from pyrovae.train.state import FitResult, TrainState
from pyrovae.train.step import Step, argument_validation, set_argument_validation
from pyrovae.train.tracking import Trackers
from pyrovae.train.training import Training

__all__ = [
    "DIVERGENCE_FRACTION",
    "DIVERGENCE_NATS",
    "FUSED_OPTIMIZERS",
    "OPTIMIZERS",
    "PRECISIONS",
    "FitOptions",
    "FitResult",
    "TrainConfig",
    "TrainState",
    "diverged",
    "evaluate_objective",
    "fit",
    "make_optimizer",
    "parameter_groups",
    "resolve_device",
]


def _flushing_denormals(function: Callable) -> Callable:
    """``function(model, guide, objective, data, config, ...)`` run with subnormal floats flushed to
    zero as ``config.flush_denormal`` says (:func:`pyrovae.train.denormals.denormals_flushed`)."""

    @functools.wraps(function)
    def run(model, guide, objective, data, config, **options):
        with denormals_flushed(config.flush_denormal):
            return function(model, guide, objective, data, config, **options)

    return run


@_flushing_denormals
def fit(model, guide, objective: Callable, data: DataSplits, config: TrainConfig, **options) -> FitResult:
    """Train ``model`` and ``guide`` in place for ``config.epochs`` epochs (in total, counting epochs
    done before a resume). ``options`` are :class:`~pyrovae.train.settings.FitOptions`: the
    schedules ``anneal`` (step -> beta), ``anneal_sites`` and ``inputs`` (pure functions of the step,
    so a resumed run sees the values an unbroken one would); ``run_dir``, where
    ``checkpoints/latest.pt`` (every epoch), ``checkpoints/best.pt`` (best validation score: the
    objective's ``selection_metric``) and ``metrics.jsonl`` are written; ``resume`` (continue from
    ``latest.pt`` as if never stopped); ``progress``; ``fingerprint`` and ``run_files`` (stored in checkpoints).

    ``progress``: a bar on a terminal, else one line per epoch. ``trackers``
    (:mod:`pyrovae.train.tracking`) are told of the start, every ``log_every`` steps and each epoch's
    record (rank 0 only); whoever made them closes them.

    Under ``torchrun`` every rank calls ``fit`` with the same arguments; ``config.batch_size`` is the
    global batch, and only rank 0 writes ``run_dir``. Subnormal floats are flushed to zero while it
    runs (``config.flush_denormal``).
    """
    options = FitOptions.of(options)
    run = Training(model, guide, objective, data, config, options)
    trackers = Trackers(options.trackers, active=run.context.is_main)
    checkpoints, records = Checkpoints(run, options.run_dir, options.fingerprint, options.run_files), Records(run, options.run_dir)
    if options.resume:
        checkpoints.resume()
    else:
        checkpoints.start()
    records.start(resumed=options.resume)
    step = Step.for_training(run)
    run.share_and_check()
    recovery, selection, reload_best = NonFiniteRecovery(run), BestAndEarlyStop.for_training(run), ReloadBest(run, checkpoints)
    trackers.start(run, resumed=options.resume)
    with Progress(run, options.progress and stderr_is_terminal()) as progress, argument_validation(run.state.step == 0 and config.validate_first_step):
        while run.state.epoch < config.epochs and not run.state.stopped_early:
            run.learning_rates.set(run.state)
            recovery.start_epoch()
            started = time.perf_counter()
            try:
                train_metrics = _train_epoch(run, step, progress, trackers)
            except NonFiniteStep as failure:
                recovery.restore(failure)
                progress.rewind(run.state.epoch)
                continue
            valid_metrics = _validate(run)
            run.state.epoch += 1
            record = records.epoch(started, train_metrics, valid_metrics)
            record.update(step.epoch_end())
            run.state.history.append(record)
            improved = selection.update(run.state, valid_metrics)
            reload_best.after_epoch(improved, selection.decayed(run.state))
            checkpoints.save(improved)
            records.append(record)
            progress.epoch_end(valid_metrics, record["seconds"])
            selection.announce(run.state)
            reload_best.announce()
            trackers.epoch(run, record)
    return FitResult(state=run.state, stopped_early=run.state.stopped_early, device=run.device)


def _train_epoch(run: Training, step: Step, progress: Progress, trackers: Trackers) -> dict[str, float]:
    """The epoch's steps; returns the training metrics averaged over them. Metrics stay on the
    device, and the device is read every ``log_every`` steps and at the end (see :class:`FiniteWatch`)."""
    run.model.train()
    run.guide.train()
    watch = FiniteWatch(run.state.step, run.context)
    log_every = run.config.log_every
    for batch in run.ranks.batches(run.data, run.config.batch_size):
        watch.history.append(step(batch))
        progress.update()
        if run.state.step % log_every == 0:
            watch.check()
            progress.show_loss(watch.history, run.state.step)
            trackers.steps(run, watch.history, run.state.step)
    watch.check()
    return run.ranks.epoch_metrics(watch.history)


def _validate(run: Training) -> dict[str, float]:
    """The validation metrics after an epoch (empty without ``config.validate``), with every
    rank's batch-norm statistics averaged first."""
    set_argument_validation(False)
    distributed.average_buffers(run.context, run.model, run.guide)
    config = run.config
    if not config.validate:
        return {}
    inputs = run.schedules.input_values(run.state.step)
    metrics = evaluate_objective(
        run.model, run.guide, run.objective, run.data, "valid", config.batch_size, limit=config.valid_examples or None, inputs=inputs, context=run.context
    )
    # A part that classifies (M2's q(y | x)) or clusters: its accuracy on the validation labels,
    # every epoch (empty for other pairs or unlabelled data).
    metrics.update(label_metrics(run.model, run.guide, run.data.valid, config.batch_size, inputs))
    return metrics
