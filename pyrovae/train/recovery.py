"""Non-finite recovery: a NaN or an infinity is found without a per-step device read, and undone.

:class:`FiniteWatch` keeps an epoch's per-step metrics on the device and reads them once every
``log_every`` steps and at the epoch's end: one boolean, "were all losses and gradient norms since
the last read finite?". A per-step read would stall a GPU's queue at every step; steps taken after a
non-finite one are harmless, since the recovery restores the epoch-start state. The first
non-finite step is still named exactly (:class:`NonFiniteStep`). Under ``torchrun`` the ranks agree
on the first non-finite step of any rank, so one rank's NaN rolls back all of them.

:class:`NonFiniteRecovery` snapshots the state at each epoch's start; a non-finite step restores
it, and the next epoch start halves the learning rate (:class:`pyrovae.train.optim.LearningRates`
reads the recoveries so far). After ``max_nonfinite_retries`` recoveries it raises
:class:`~pyrovae.errors.NonFiniteLossError` naming the step and the non-finite terms.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch

from pyrovae.errors import NonFiniteLossError
from pyrovae.train import distributed
from pyrovae.train.state import TrainState


class NonFiniteStep(Exception):
    """Step ``step`` went non-finite in ``terms`` (metric names, ``"loss"``, ``"gradient"``)."""

    def __init__(self, step: int, terms: list[str]):
        super().__init__(f"non-finite {', '.join(terms)} at step {step}")
        self.step, self.terms = step, terms


def raise_if_nonfinite(history: list[dict[str, torch.Tensor]], checked: int, first_step: int) -> int:
    """One host read for the steps not yet checked (``history[checked:]``; ``history[0]`` is step
    ``first_step``); if one went non-finite, raise :class:`NonFiniteStep` for the first such step.
    Returns how many steps are now known finite."""
    # inf + finite, nan + anything: non-finite.
    # Without clipping there is no gradient norm: a non-finite gradient shows in the next step's loss.
    def watched(metrics):
        return metrics["loss"] + metrics["grad_norm"] if "grad_norm" in metrics else metrics["loss"]

    if not history[checked:] or bool(torch.isfinite(torch.stack([watched(m) for m in history[checked:]])).all()):
        return len(history)
    for index, metrics in enumerate(history[checked:], start=checked):
        if not torch.isfinite(watched(metrics)):
            terms = [name for name, value in metrics.items() if name not in ("loss", "grad_norm") and not torch.isfinite(value)]
            if not torch.isfinite(metrics["loss"]):
                terms.append("loss")
            if "grad_norm" in metrics and not torch.isfinite(metrics["grad_norm"]):
                terms.append("gradient")
            raise NonFiniteStep(first_step + index, terms)


def raise_if_nonfinite_anywhere(history: list[dict[str, torch.Tensor]], checked: int, first_step: int, context) -> int:
    """:func:`raise_if_nonfinite` for every rank at once: the ranks agree on the first non-finite
    step of any rank (one small reduction), so one rank's NaN rolls back all of them. The terms
    named are those of the rank that went non-finite first (its own loss before a gradient that
    the averaging made non-finite everywhere)."""
    pending = len(history) - checked
    try:
        raise_if_nonfinite(history, checked, first_step)
        local, terms = pending, []
    except NonFiniteStep as failure:
        local, terms = failure.step - first_step - checked, failure.terms
    # Order: earliest step, then a rank whose own loss or metrics went non-finite, then rank.
    own = 0 if any(term != "gradient" for term in terms) else 1
    code = distributed.min_int(context, (local * 2 + own) * context.world_size + context.rank, "checking for non-finite losses")
    index, source = code // (2 * context.world_size), code % context.world_size
    if index >= pending:
        return len(history)
    terms = distributed.broadcast_object_from(context, terms, source, "naming the non-finite terms")
    raise NonFiniteStep(first_step + checked + index, terms)


class FiniteWatch:
    """An epoch's per-step metrics (``history``, tensors on the device), checked for non-finite
    values when :meth:`check` is called: every ``log_every`` steps and at the epoch's end."""

    def __init__(self, first_step: int, context=None):
        self.history: list[dict[str, torch.Tensor]] = []
        self.first_step, self.context = first_step, context
        self.checked = 0  # history[:checked] is known finite

    def check(self) -> None:
        if self.context is not None and self.context.active:
            self.checked = raise_if_nonfinite_anywhere(self.history, self.checked, self.first_step, self.context)
        else:
            self.checked = raise_if_nonfinite(self.history, self.checked, self.first_step)


def copied_state_dict(state_dict: dict) -> dict:
    """A module's state dict, detached from it: tensors cloned, extra state (any value a module
    saves) deep-copied."""
    return {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value) for key, value in state_dict.items()}


def recovery_snapshot(model, guide, optimizer, state: TrainState) -> dict:
    """What a non-finite-loss recovery restores at the epoch's start: parameters and buffers,
    the optimizer's state and the counters. Not the history (a failed epoch appends nothing to it),
    the random state or the fingerprint, which only checkpoints need."""
    counters = {key: value for key, value in asdict(state).items() if key != "history"}
    return {
        "model": copied_state_dict(model.state_dict()),
        "guide": copied_state_dict(guide.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "state": counters,
    }


class NonFiniteRecovery:
    """Snapshot at each epoch's start (:meth:`start_epoch`); :meth:`restore` after a
    :class:`NonFiniteStep`, or raise :class:`~pyrovae.errors.NonFiniteLossError` once the
    recoveries are spent. Reads and replaces ``training.state``."""

    def __init__(self, training):
        self.training = training
        self.snapshot: dict | None = None

    def start_epoch(self) -> None:
        run = self.training
        self.snapshot = recovery_snapshot(run.model, run.guide, run.optimizer, run.state)

    def restore(self, failure: NonFiniteStep) -> None:
        run, snapshot = self.training, self.snapshot
        config, optimizer, state = run.config, run.optimizer, run.state
        state.nonfinite_retries += 1
        if state.nonfinite_retries > config.max_nonfinite_retries:
            # Half the configured rate: a resume applies the epoch, plateau and recovery factors to it again.
            lower = f"--set train.lr={run.learning_rates.base[0] / 2:.3g} --set train.clip_norm=10"
            if state.epoch == 0:  # no epoch finished: there is no checkpoint to resume from
                advice = f"no epoch has finished, so there is no checkpoint: train again (the same --out works) with {lower}"
            else:
                advice = f"checkpoints/latest.pt holds epoch {state.epoch}: resume from it with a lower learning rate or clipping, e.g. --resume {lower}"
            raise NonFiniteLossError(
                f"training stopped: non-finite {', '.join(failure.terms)} at step {failure.step} "
                f"(epoch {state.epoch + 1}) after {config.max_nonfinite_retries} recoveries, each restoring "
                f"the epoch-start state and halving the learning rate "
                f"(last {optimizer.param_groups[0]['lr']:.3g}); {advice}, or check the data and the model's scales"
            ) from None
        retries = state.nonfinite_retries
        run.model.load_state_dict(snapshot["model"])
        run.guide.load_state_dict(snapshot["guide"])
        optimizer.load_state_dict(snapshot["optimizer"])
        run.state = TrainState(**snapshot["state"], history=state.history)
        run.state.nonfinite_retries = retries
        run.say(
            f"non-finite {', '.join(failure.terms)} at step {failure.step}: restored epoch {run.state.epoch + 1} "
            f"start, learning rate halved to {optimizer.param_groups[0]['lr'] / 2:.3g} "
            f"(recovery {retries}/{config.max_nonfinite_retries})"
        )
