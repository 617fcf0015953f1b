"""Training strategies: what the fit loop does around each model update.

The loop has one optimizer with a ``"model"`` and a ``"guide"`` parameter group
(:func:`pyrovae.train.optim.parameter_groups`). A strategy decides which groups a step updates,
and may add guide-only steps; it never runs a loop of its own over the data.

``plain``: every step updates model and guide together on one batch.

``aggressive`` (He et al. 2019, "Lagging inference networks and posterior collapse"): while
aggressive mode is on, each model update is preceded by guide-only updates

    phi <- phi - lr * grad_phi L(theta, phi; batch_k),   k = 0, 1, 2, ...

where batch_0 is the model step's own batch and batch_1, batch_2, ... are fresh random batches of
the training split. Every ``m = aggressive_check_every`` inner steps the mean inner loss of those
m steps (per word for sequences, as He et al. normalise it) is compared with that of the m before it; the inner loop ends when it no longer falls, or
after ``aggressive_max_steps`` inner steps. Then the model step updates theta only, on batch_0:

    theta <- theta - lr * grad_theta L(theta, phi; batch_0).

At the end of every epoch in aggressive mode the loop estimates the mutual information
I_q(x; z) on (up to ``aggressive_mi_examples``) validation examples
(:func:`pyrovae.analysis.mutual_information`, He et al.'s estimator). Aggressive mode ends for good
after the first epoch whose MI is not above the previous epoch's; from then on steps are plain
(model and guide together). The mode, the MI and the switch are part of the checkpointed
:class:`~pyrovae.train.state.TrainState` and of each ``metrics.jsonl`` record, so a resume keeps them.
"""

from __future__ import annotations

import contextlib
import math

import torch

from pyrovae.errors import ConfigError
from pyrovae.handlers import kl_scale_unless_one
from pyrovae.traces import preserved_rng
from pyrovae.train.recovery import NonFiniteStep

STRATEGIES = ("plain", "aggressive")


def _group(optimizer: torch.optim.Optimizer, name: str) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups if group.get("name") == name for p in group["params"]]


def drop_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Leave these parameters out of the coming optimizer step: torch's optimizers skip a
    parameter whose ``grad`` is None (its moments and step count stay as they were)."""
    for parameter in parameters:
        parameter.grad = None


@contextlib.contextmanager
def frozen(parameters: list[torch.nn.Parameter]):
    """Parameters that a step leaves alone, with ``requires_grad`` off while it runs, so the
    backward pass skips their weight gradients (and, for the guide during a model-only step, the
    whole encoder backward); gradients still flow through their outputs to the other part."""
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def tokens_per_row(batch) -> torch.Tensor | float:
    """rows / tokens of a batch of sequences (from ``lengths``, else ``mask``); 1.0 without either."""
    lengths = batch.get("lengths")
    if not torch.is_tensor(lengths):
        mask = batch.get("mask")
        if not torch.is_tensor(mask):
            return 1.0
        lengths = mask.sum(-1)
    return lengths.shape[0] / lengths.sum().clamp(min=1)


class AggressiveGuideUpdates:
    """Guide-only steps before each model step while aggressive mode is on (see the module text)."""

    def __init__(self, check_every: int, max_steps: int, mi_examples: int):
        self.check_every, self.max_steps, self.mi_examples = check_every, max_steps, mi_examples

    @classmethod
    def for_training(cls, training) -> "AggressiveGuideUpdates":
        """The strategy of ``training.config`` (``train.strategy = "aggressive"``), in one process only."""
        if training.context.active:
            raise ConfigError("train.strategy = 'aggressive' runs in one process; its guide-only steps are not shared out across ranks")
        config = training.config
        return cls(config.aggressive_check_every, config.aggressive_max_steps, config.aggressive_mi_examples)

    def before_model_step(self, training, batch, beta: float, by_site, forward=None) -> int:
        """The guide-only steps before a model step: the first on the step's own ``batch``, the
        rest on fresh random training batches, all at the step's ``beta`` (and ``by_site``) and
        scheduled inputs. ``forward(batch, beta, by_site) -> (loss, metrics)``: the loop's forward
        (its compiled step where one holds; the model's parameters are frozen while it runs, so
        the captured graph computes no decoder weight gradients); default the eager objective.
        Returns how many were taken; a non-finite one raises
        :class:`~pyrovae.train.recovery.NonFiniteStep`."""
        model, guide, objective, config, state = training.model, training.guide, training.objective, training.config, training.state
        inputs = training.schedules.input_values(state.step) if training.schedules.inputs else {}
        autocast = training.autocast

        per_word = bool(getattr(training.data.spec, "variable_length", False))

        def step_on(inner_batch) -> torch.Tensor:
            if forward is not None:
                loss, _ = forward(inner_batch, beta, by_site)
            else:
                with kl_scale_unless_one(beta, by_site), (autocast() if autocast is not None else contextlib.nullcontext()):
                    loss, _ = objective(model, guide, inner_batch)
            loss.backward()
            # He et al.'s stopping rule compares the loss per word: a batch of long sentences has a
            # larger loss per sentence, which would otherwise read as the guide getting worse.
            return loss.detach() * (tokens_per_row(inner_batch) if per_word else 1.0)

        def draw_batch():
            return {**training.data.random_batch("train", config.batch_size), **inputs}

        clip = config.clip_norm if config.clip_norm > 0 else math.inf
        try:
            return self.guide_steps(step_on, batch, draw_batch, training.optimizer, clip)
        except FloatingPointError:
            raise NonFiniteStep(state.step, ["guide-only loss"]) from None

    def epoch_end(self, training) -> dict:
        """After an epoch: estimate validation I(x; z) while the mode is on, and end the mode for
        good at the first epoch whose I(x; z) is not above the previous one's. Returns the
        epoch record's entries."""
        state = training.state
        record = {"aggressive": state.aggressive}
        if not state.aggressive:
            return record
        with preserved_rng():
            information = self.validation_mutual_information(
                training.model, training.guide, training.data, training.schedules.input_values(state.step), training.config.batch_size, seed=state.epoch
            )
        record["valid/mutual_information"] = information
        if not information > state.aggressive_mutual_information:
            state.aggressive, state.aggressive_ended_epoch = False, state.epoch
            record["aggressive_ended"] = True
            training.say(
                f"aggressive guide updates end after epoch {state.epoch}: validation I(x; z) = {information:.4g} did not "
                f"rise above {state.aggressive_mutual_information:.4g}; model and guide now train together"
            )
        state.aggressive_mutual_information = information
        return record

    def guide_steps(self, step_on, batch, draw_batch, optimizer, clip: float) -> int:
        """Guide-only steps, the first on ``batch``, then on ``draw_batch()`` batches, until the
        mean loss of the last ``check_every`` steps stops falling. ``step_on(batch)`` returns the
        per-datapoint loss after ``backward()``. Returns the number of inner steps taken; a
        non-finite inner loss raises ``FloatingPointError`` naming the inner step."""
        guide_parameters, model_parameters = _group(optimizer, "guide"), _group(optimizer, "model")
        previous, window = math.inf, []
        for inner in range(1, self.max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            with frozen(model_parameters):
                loss = step_on(batch if inner == 1 else draw_batch())
            drop_gradients(model_parameters)
            if clip < math.inf:
                torch.nn.utils.clip_grad_norm_(guide_parameters, clip)
            optimizer.step()
            window.append(loss)
            if len(window) == self.check_every:
                # One host read per check_every inner steps.
                current = float(torch.stack(window).mean())
                if not math.isfinite(current):
                    raise FloatingPointError(f"guide-only loss is {current} at inner step {inner}")
                if current >= previous:
                    return inner
                previous, window = current, []
        return self.max_steps

    def model_step(self, optimizer):
        """The context of the model step's forward and backward: the guide frozen (see :func:`frozen`)."""
        return frozen(_group(optimizer, "guide"))

    def model_only(self, optimizer) -> None:
        """After the model step's backward: keep the guide out of that update."""
        drop_gradients(_group(optimizer, "guide"))

    def validation_mutual_information(self, model, guide, data, inputs, batch_size: int, seed: int) -> float:
        from pyrovae.analysis.latents import mutual_information  # imports ArviZ: only for this strategy

        rows = min(self.mi_examples, data.size("valid"))
        return mutual_information(model, guide, data.rows("valid", 0, rows), inputs=inputs, batch_size=batch_size, seed=seed)
