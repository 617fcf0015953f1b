"""The step: one optimizer update, as short as Pyro's ``SVI.step``.

``Step(batch)`` takes the step's KL weights and scheduled inputs from the schedules (python
floats: no device work), lets the strategy take its guide-only steps, zeroes the gradients
(*before* the objective: an objective may compute gradients during its call, e.g. one wrapping
Pyro's ``loss_and_grads``), runs the objective's forward (eagerly, under bfloat16 autocast, or
replayed from a captured graph: :class:`~pyrovae.train.compiled.CompiledStep`) and ``backward``,
averages the gradients across ranks, clips and steps the optimizer. It returns the step's metrics
as detached device tensors, with ``loss`` and (when clipping computes it) ``grad_norm``: no step
waits on the device.

Pyro's and torch's argument validation are on for the first step of a run (clear shape errors) and
off afterwards (speed): :func:`argument_validation`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import pyro
import torch
from pyro.infer.util import is_validation_enabled

from pyrovae.errors import ConfigError
from pyrovae.handlers import kl_scale_unless_one
from pyrovae.train.compiled import CompiledStep
from pyrovae.train.strategies import AggressiveGuideUpdates


def set_argument_validation(on: bool) -> None:
    pyro.enable_validation(on)
    torch.distributions.Distribution.set_default_validate_args(on)


@contextlib.contextmanager
def argument_validation(on: bool) -> Iterator[None]:
    """Pyro's and torch's argument validation ``on`` (or off) inside the block (the step turns it
    off after a run's first step); the setting found on entry is restored on the way out."""
    was_on = is_validation_enabled()
    set_argument_validation(on)
    try:
        yield
    finally:
        set_argument_validation(was_on)


def autocast_for(precision: str, device: torch.device, say) -> Callable[[], contextlib.AbstractContextManager] | None:
    """What the training step's forward runs under: nothing for float32; bfloat16 autocast on CUDA."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        say(f"train.precision = {precision!r} applies to CUDA only; this run trains on {device.type} in float32")
        return None
    if not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision = {precision!r}, but {torch.cuda.get_device_name(device)} has no bfloat16 support; use 'fp32'")
    return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def reinitialize_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Re-draw the model's parameters in place (each submodule's own ``reset_parameters``, as at
    construction) and forget their optimizer state (Adam's moments), so they train afresh; the
    guide's parameters and state are left as they are. Returns the number of modules reset."""
    reset = 0
    with torch.no_grad():
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                reset += 1
    for parameter in model.parameters():
        optimizer.state.pop(parameter, None)
    return reset


class Step:
    """``step(batch) -> metrics``: one optimizer update of ``training`` (see the module text).
    ``strategy`` (aggressive guide updates) acts while ``training.state.aggressive``; ``compiled``
    replaces the eager forward after a validated first step."""

    def __init__(self, training, strategy: AggressiveGuideUpdates | None = None, compiled: CompiledStep | None = None):
        self.training, self.strategy, self.compiled = training, strategy, compiled
        config = training.config
        self.clip = config.clip_norm if config.clip_norm > 0 else math.inf
        self.validate_first_step = config.validate_first_step
        self.has_inputs = bool(training.schedules.inputs)
        # Li et al. 2019: the beta schedule may ask for the model (decoder) to be re-drawn after pretraining.
        reinitialize_at = getattr(training.schedules.beta, "reinitialize_model_at", None)
        self.reinitialize_at = reinitialize_at() if callable(reinitialize_at) else None

    @classmethod
    def for_training(cls, training) -> "Step":
        """The step ``training.config`` asks for: the strategy, and the compiled step where it applies."""
        config = training.config
        strategy = AggressiveGuideUpdates.for_training(training) if config.strategy == "aggressive" else None
        compiled = None
        if config.compile != "none":
            compiled = CompiledStep(config.compile, training.model, training.guide, training.objective, training.say)
            if training.autocast is not None:
                compiled._disable("precision = 'bf16' (autocast)")
        return cls(training, strategy, compiled)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        run = self.training
        state, optimizer = run.state, run.optimizer
        if state.step == self.reinitialize_at:
            reinitialize_model(run.model, optimizer)
            run.say(f"step {state.step}: autoencoder pretraining is over; the model's parameters are re-drawn (reinitialize_decoder)")
        beta, by_site = run.schedules.betas(state.step)  # python floats: no device work
        if self.has_inputs:
            batch = {**batch, **run.schedules.input_values(state.step)}
        strategy = self.strategy if self.strategy is not None and state.aggressive else None
        if strategy is not None:
            # The guide-only steps replay the compiled forward too (with the model's weights frozen).
            inner_steps = strategy.before_model_step(run, batch, beta, by_site, forward=self.forward)
        # Before the objective: an objective may compute gradients during its call.
        optimizer.zero_grad(set_to_none=True)
        with strategy.model_step(optimizer) if strategy is not None else contextlib.nullcontext():
            loss, metrics = self.forward(batch, beta, by_site)
            loss.backward()
        loss = loss.detach()
        if strategy is not None:
            strategy.model_only(optimizer)
            metrics["guide_steps"] = torch.tensor(float(inner_steps), device=loss.device)
        if run.ranks.averager is not None:
            run.ranks.average_gradients()
        # The gradient norm is computed only when clipping asks for it (it is a pass over every gradient).
        grad_norm = torch.nn.utils.clip_grad_norm_(run.parameters, self.clip) if self.clip < math.inf else None
        optimizer.step()
        if state.step == 0:
            set_argument_validation(False)
        state.step += 1
        metrics["loss"] = loss
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.detach()
        return metrics

    def forward(self, batch: dict, beta: float, by_site) -> tuple[torch.Tensor, dict]:
        """The objective's loss and metrics on ``batch`` under the KL weights."""
        run = self.training
        if self.compiled is not None and (run.state.step > 0 or not self.validate_first_step):
            # A validated first step stays eager (its checks read values).
            return self.compiled(batch, beta, by_site)
        if run.autocast is None:
            with kl_scale_unless_one(beta, by_site):
                return run.objective(run.model, run.guide, batch)
        with kl_scale_unless_one(beta, by_site), run.autocast():
            return run.objective(run.model, run.guide, batch)

    def epoch_end(self) -> dict:
        """The strategy's entries of the epoch's record (empty without one)."""
        return self.strategy.epoch_end(self.training) if self.strategy is not None else {}
