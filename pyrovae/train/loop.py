"""The fit loop: the same for every VAE. It only calls ``objective(model, guide, batch)``.

It owns the torch optimizer (one, with a ``"model"`` and a ``"guide"`` parameter
group: each parameter in the group of the part that owns it, see :func:`make_optimizer`),
the device, the schedules (beta, per site where configured, applied through
:class:`~pyrovae.handlers.kl_scale`; and the named inputs a model or guide declares in
``scheduled_inputs``, passed in the batch), gradient clipping, recovery from non-finite
losses, validation every epoch, atomic checkpoints (latest and best), resume, early
stopping and the progress bar.

The pair is always called with the whole batch (every key the loader gives) plus the
scheduled inputs' current values as python floats: ``objective(model, guide, {**batch, **inputs})``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from pyrovae.data.splits import DataSplits, check_splits
from pyrovae.errors import ConfigError, NonFiniteLossError
from pyrovae.pair import check_pair
from pyrovae.schedules import StepSchedules
from pyrovae.traces import preserved_rng
from pyrovae.train import distributed
from pyrovae.analysis.classification import label_metrics
from pyrovae.train.denormals import denormals_flushed
from pyrovae.handlers import kl_scale_unless_one
from pyrovae.train.compiled import COMPILE_MODES, CompiledStep
from pyrovae.train.strategies import STRATEGIES, AggressiveGuideUpdates
from pyrovae.train.checkpoint import (
    BEST,
    LATEST,
    append_jsonl,
    load_checkpoint_or_previous,
    previous_path,
    remove_stale_temporaries,
    save_checkpoint,
    write_jsonl,
)

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    # Multiply the learning rates by this factor after every epoch (1: constant).
    lr_decay: float = 1.0
    # Learning rate of the guide's parameter group; None means the same as lr.
    guide_lr: float | None = None
    optimizer: str = "adam"
    # Adam and AdamW update every parameter in one fused kernel (torch's fused=True; the same
    # algorithm, with float rounding of its own). False: torch's default per-parameter loop.
    fused_optimizer: bool = True
    # Flush subnormal floats to zero on the CPU while training and evaluating (torch's
    # set_flush_denormal; see pyrovae.train.denormals): computing on them can slow a CPU run several times.
    flush_denormal: bool = True
    weight_decay: float = 0.0
    # Clip the global gradient norm (of the per-datapoint loss); 0 turns clipping off.
    clip_norm: float = 100.0
    device: str = "auto"
    # "fp32", or "bf16": the training step's forward runs under torch.autocast(bfloat16) on CUDA
    # (parameters, gradients and the optimizer stay float32; validation and test run in float32).
    # On the CPU "bf16" is ignored with a message.
    precision: str = "fp32"
    # Early stopping: stop after this many epochs without a better validation score (0: never).
    # The score is the objective's own bound: the ELBO, or the K-sample bound under IWAE.
    patience: int = 0
    # Non-finite loss or gradient: restore the epoch-start state and halve the learning rate,
    # at most this many times in a run.
    max_nonfinite_retries: int = 3
    # Run the first step with Pyro's and torch's argument validation on (clear shape errors),
    # then switch it off for speed.
    validate_first_step: bool = True
    # Every this many steps the loop reads the device once: it checks that no loss or gradient
    # went non-finite and refreshes the progress bar's loss.
    log_every: int = 50
    # Evaluate on at most this many validation examples per epoch (0: all).
    valid_examples: int = 0
    # Evaluate on the validation split after every epoch. Off: no validation pass, best.pt is the
    # latest epoch's parameters, and early stopping (patience) is unavailable.
    validate: bool = True
    # "plain", or "aggressive": guide-only steps before each model step until the guide's loss stops
    # falling, until validation I(x; z) stops rising (He et al. 2019; see pyrovae.train.strategies).
    strategy: str = "plain"
    # Aggressive mode: compare the mean guide loss every this many inner steps, take at most
    # aggressive_max_steps inner steps per model step, and estimate I(x; z) on this many validation rows.
    aggressive_check_every: int = 15
    aggressive_max_steps: int = 100
    aggressive_mi_examples: int = 1000
    # "none": the eager step. "trace": capture the objective's tensor operations once per batch
    # signature and replay them (one call per tensor operation), so Pyro's bookkeeping runs at capture time only;
    # "torch": the same graph through torch.compile (Inductor; seconds to minutes per signature).
    # Checked against the eager step on its first replay; falls back with a message where a pair
    # cannot be captured (see pyrovae.train.compiled).
    compile: str = "none"

    def __post_init__(self):
        # key -> (allowed?, what is allowed)
        checks = {
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            "lr_decay": (0 < self.lr_decay <= 1, "in (0, 1]"),
            "guide_lr": (self.guide_lr is None or (math.isfinite(self.guide_lr) and self.guide_lr > 0), "a finite number > 0, or left out"),
            "optimizer": (self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            "weight_decay": (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            "clip_norm": (self.clip_norm >= 0 and not math.isnan(self.clip_norm), ">= 0 (0 turns clipping off)"),
            "device": (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
            "precision": (self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            "patience": (self.patience >= 0, ">= 0 (0: no early stopping)"),
            "max_nonfinite_retries": (self.max_nonfinite_retries >= 0, ">= 0"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "valid_examples": (self.valid_examples >= 0, ">= 0 (0: all)"),
            "strategy": (self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            "aggressive_check_every": (self.aggressive_check_every >= 1, ">= 1"),
            "aggressive_max_steps": (self.aggressive_max_steps >= 1, ">= 1"),
            "aggressive_mi_examples": (self.aggressive_mi_examples >= 2, ">= 2"),
            "compile": (self.compile in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"train.{key} = {getattr(self, key)!r} is not allowed: it must be {allowed}")
        if not self.validate and self.patience:
            raise ValueError(f"train.patience = {self.patience} needs validation: early stopping reads the validation score; set train.validate = true")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_valid_score: float = -math.inf  # the objective's selection_metric on validation
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    nonfinite_retries: int = 0
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}, but CUDA is not available on this machine; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# Divergence without NaN: warn when the validation score falls this far below its first epoch's value
# (the larger of an absolute and a relative margin, in the score's units, nats for the ELBO).
DIVERGENCE_NATS, DIVERGENCE_FRACTION = 10.0, 0.5


def diverged(history: list[dict], key: str) -> bool:
    """Whether the latest ``key`` in ``history`` lies far below the first epoch's (see DIVERGENCE_*)."""
    if len(history) < 2 or key not in history[0] or key not in history[-1]:
        return False
    first, last = history[0][key], history[-1][key]
    return math.isfinite(first) and math.isfinite(last) and last < first - max(DIVERGENCE_NATS, DIVERGENCE_FRACTION * abs(first))


def parameter_groups(model, guide) -> dict[str, list[torch.nn.Parameter]]:
    """Each parameter once, in the group of the part that owns it: everything reachable from
    the model is ``"model"`` (also a network the guide reuses, e.g. ``self.classifier =
    model.classifier``); the guide's other parameters are ``"guide"``."""
    model_parameters = list(model.parameters())
    owned = {id(p) for p in model_parameters}
    return {"model": model_parameters, "guide": [p for p in guide.parameters() if id(p) not in owned]}


# Optimizers with one fused kernel for all parameters (CPU and CUDA), used when train.fused_optimizer.
FUSED_OPTIMIZERS = ("adam", "adamw")


def make_optimizer(model, guide, config: TrainConfig) -> torch.optim.Optimizer:
    lrs = {"model": config.lr, "guide": config.guide_lr or config.lr}
    groups = [{"params": params, "name": name, "lr": lrs[name]} for name, params in parameter_groups(model, guide).items()]
    options = {}
    parameters = [p for group in groups for p in group["params"]]
    if (
        config.fused_optimizer
        and config.optimizer in FUSED_OPTIMIZERS
        and parameters
        and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
        and len({p.device for p in parameters}) == 1
    ):
        # The same update as the default implementation, in one kernel over every parameter instead
        # of a Python loop of small ones: about 0.3 ms against 1.2-3.4 ms per step for the MNIST VAE
        # on the CPU (the default is per-parameter there).
        options["fused"] = True
    return OPTIMIZERS[config.optimizer](groups, lr=config.lr, weight_decay=config.weight_decay, **options)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def evaluate_objective(
    model, guide, objective, data: DataSplits, split: str, batch_size: int, limit=None, inputs=None, context=None
) -> dict[str, float]:
    """Average per-datapoint metrics of ``objective`` over a split, without annealing or gradients,
    on whole batches plus ``inputs`` (the scheduled inputs' values, e.g. at the current step).

    With a distributed ``context`` each rank evaluates a contiguous share of the split's rows and
    the sums are reduced across ranks, so every rank returns the metrics of the whole split."""
    if context is not None and context.active:
        return _evaluate_sharded(model, guide, objective, data, split, batch_size, limit, inputs, context)
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    totals: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in data.batches(split, batch_size, limit=limit):
            n = batch["x"].shape[0]
            _, metrics = objective(model, guide, {**batch, **inputs} if inputs else batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * n
            count += n
    model.train(was_training[0])
    guide.train(was_training[1])
    return {key: float(value) / count for key, value in totals.items()}


def _evaluate_sharded(model, guide, objective, data, split, batch_size, limit, inputs, context) -> dict[str, float]:
    size = data.size(split) if limit is None else min(limit, data.size(split))
    lo, hi = distributed.shard_range(size, context)
    weight = 1
    if lo == hi:  # more ranks than rows: evaluate a stand-in row, counted zero times
        lo, hi, weight = 0, 1, 0
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    totals: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in data.batches(split, batch_size, limit=hi, start=lo):
            n = batch["x"].shape[0] * weight
            _, metrics = objective(model, guide, {**batch, **inputs} if inputs else batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value.double() * n
            count += n
    model.train(was_training[0])
    guide.train(was_training[1])
    keys = sorted(totals)
    table = torch.stack([torch.as_tensor(totals[key], dtype=torch.float64, device=context.device) for key in keys] + [
        torch.tensor(float(count), dtype=torch.float64, device=context.device)
    ])
    table = distributed.sum_tensor(context, table, f"reducing {split} metrics").cpu()
    return {key: float(table[index]) / float(table[-1]) for index, key in enumerate(keys)}


class _NonFinite(Exception):
    def __init__(self, step: int, terms: list[str]):
        self.step, self.terms = step, terms


def _flushing_denormals(function: Callable) -> Callable:
    """``function(model, guide, objective, data, config, ...)`` run with subnormal floats flushed to
    zero as ``config.flush_denormal`` says (:func:`pyrovae.train.denormals.denormals_flushed`)."""

    @functools.wraps(function)
    def run(model, guide, objective, data, config, **options):
        with denormals_flushed(config.flush_denormal):
            return function(model, guide, objective, data, config, **options)

    return run


@_flushing_denormals
def fit(
    model,
    guide,
    objective: Callable,
    data: DataSplits,
    config: TrainConfig,
    *,
    anneal: Callable[[int], float] | None = None,
    anneal_sites: Mapping[str, Callable[[int], float]] | None = None,
    inputs: Mapping[str, Callable[[int], float]] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    fingerprint: dict | None = None,
) -> FitResult:
    """Train ``model`` and ``guide`` in place for ``config.epochs`` epochs (in total, counting
    epochs done before a resume).

    With ``run_dir``, writes ``checkpoints/latest.pt`` (every epoch), ``checkpoints/best.pt``
    (best validation score: the objective's ``selection_metric``, the ELBO unless it says otherwise) and ``metrics.jsonl`` (one record per epoch). With ``resume=True``
    it restores parameters, optimizer state, schedule step, RNG state and epoch from
    ``latest.pt`` and continues as if never stopped. ``fingerprint`` (e.g. the resolved config)
    is stored in checkpoints.

    ``anneal`` is the KL weight's schedule (step -> beta), ``anneal_sites`` per-site schedules
    overriding it for the latent sites they name, and ``inputs`` schedules for the named inputs
    the model or guide declares in ``scheduled_inputs`` (undriven ones keep their declared
    default). Their values are pure functions of the step, so a resumed run sees exactly the
    values an unbroken one would. Each epoch's record logs ``beta``, ``beta/<site>`` and
    ``schedule/<input>`` at the step validation ran at.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls ``fit`` with the same arguments: see
    :mod:`pyrovae.train.distributed`. ``config.batch_size`` is the global batch, shared out across
    the ranks; gradients are averaged, metrics reduced, and only rank 0 writes ``run_dir``.

    While it runs, subnormal floats are flushed to zero (``config.flush_denormal``; see
    :mod:`pyrovae.train.denormals`); the setting is restored on return.
    """
    context = distributed.setup(config.device)
    say = _say if context.is_main else _quiet
    schedules = StepSchedules.for_pair(model, guide, anneal, anneal_sites, inputs)
    selection_metric = getattr(objective, "selection_metric", "elbo")
    device = distributed.training_device(config.device, context)
    autocast = _autocast(config.precision, device, say)
    model.to(device)
    guide.to(device)
    data = data.to(device)
    optimizer = make_optimizer(model, guide, config)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    averager = distributed.GradientAverager(context, parameters) if context.active else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    state = TrainState()
    checkpoint_dir = Path(run_dir) / "checkpoints" if run_dir is not None else None
    metrics_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None

    if resume:

        def load() -> dict:
            if checkpoint_dir is None or not any((checkpoint_dir / name).exists() for name in (LATEST, previous_path(LATEST))):
                raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_dir / LATEST if checkpoint_dir else '(no run dir)'}")
            remove_stale_temporaries(checkpoint_dir)
            remove_stale_temporaries(metrics_path.parent)
            # Rank 0 reads the file and sends it to the others (no shared file system needed).
            return load_checkpoint_or_previous(checkpoint_dir / LATEST, "cpu" if context.active else device, warn=_say)

        saved = distributed.on_main(context, load, "loading the checkpoint")
        model.load_state_dict(saved["model"])
        guide.load_state_dict(saved["guide"])
        optimizer.load_state_dict(saved["optimizer"])
        saved_state = dict(saved["state"])
        if "best_valid_elbo" in saved_state:  # checkpoints written before selection by the objective's bound
            saved_state["best_valid_score"] = saved_state.pop("best_valid_elbo")
        state = TrainState(**saved_state)
        # Checkpoints written before the early stop was part of the state.
        state.stopped_early = state.stopped_early or bool(config.patience and state.epochs_without_improvement >= config.patience)
        _restore_rng(saved, context, say)
        if context.is_main:
            write_jsonl(state.history, metrics_path)  # drop records written after this checkpoint
    else:
        if metrics_path is not None and context.is_main:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
        _seed_other_ranks(context)
        state.aggressive = config.strategy == "aggressive"
    strategy = None
    if config.strategy == "aggressive":
        if context.active:
            raise ConfigError("train.strategy = 'aggressive' runs in one process; its guide-only steps are not shared out across ranks")
        strategy = AggressiveGuideUpdates(config.aggressive_check_every, config.aggressive_max_steps, config.aggressive_mi_examples)
    compiled = CompiledStep(config.compile, model, guide, objective, say) if config.compile != "none" else None
    if compiled is not None and (strategy is not None or autocast is not None):
        compiled._disable("aggressive guide updates" if strategy is not None else "precision = 'bf16' (autocast)")
    # Every rank starts from rank 0's parameters, as DDP does.
    distributed.broadcast_module_state(context, model, guide)

    def check_before_training() -> None:
        # Every split in full, before the first step: a bad row anywhere stops the run now, not after it.
        check_splits(data, model.check_batch, cache_key=_check_key(model))
        with preserved_rng():  # a dynamically binarized batch draws random numbers
            first = next(data.batches("train", min(config.batch_size, 64)))
            clashes = sorted(set(schedules.inputs) & set(first))
            if clashes:
                raise ConfigError(f"scheduled input {clashes[0]!r} has the name of a batch key (the batch has {sorted(first)})")
            check_pair(model, guide, {**first, **schedules.input_values(state.step)})

    # A check that fails on one rank stops every rank with its message.
    distributed.agree(context, check_before_training, "checking the data and the pair")

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(),
            "guide": guide.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": asdict(state),
            "rng": _rng_state(),
            "fingerprint": fingerprint,
            "world_size": context.world_size,
        }

    def saved_state() -> dict:
        saved = checkpoint_state()
        if context.active:  # every rank's random stream, so a resume at this world size is exact
            saved["rng_ranks"] = distributed.gather_objects(context, saved["rng"], "gathering random states")
        return saved

    steps_per_epoch = data.num_batches("train", config.batch_size)
    bar = tqdm(
        total=steps_per_epoch * config.epochs,
        initial=steps_per_epoch * state.epoch,
        disable=not progress or not context.is_main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    if state.stopped_early:
        say(f"the run stopped early at epoch {state.epoch} (patience {config.patience}); nothing left to train")
    validation_was_on = is_validation_enabled()
    first_step = state.step == 0 and config.validate_first_step
    _set_validation(first_step)
    try:
        while state.epoch < config.epochs and not state.stopped_early:
            # The learning rate is a function of the epoch and the recoveries so far, so a resumed
            # run sets the same one.
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * config.lr_decay**state.epoch * 0.5**state.nonfinite_retries
            snapshot = _recovery_snapshot(model, guide, optimizer, state)
            started = time.perf_counter()
            try:
                train_metrics = _run_epoch(
                    model,
                    guide,
                    objective,
                    data,
                    config,
                    optimizer,
                    parameters,
                    schedules,
                    state,
                    bar,
                    context,
                    averager,
                    autocast,
                    strategy if state.aggressive else None,
                    compiled,
                )
            except _NonFinite as failure:
                state.nonfinite_retries += 1
                if state.nonfinite_retries > config.max_nonfinite_retries:
                    raise NonFiniteLossError(
                        f"training stopped: non-finite {', '.join(failure.terms)} at step {failure.step} "
                        f"(epoch {state.epoch + 1}) after {config.max_nonfinite_retries} recoveries, each restoring "
                        f"the epoch-start state and halving the learning rate "
                        f"(last {optimizer.param_groups[0]['lr']:.3g}); checkpoints/latest.pt holds epoch "
                        f"{state.epoch}: resume from it with a lower learning rate or clipping, e.g. "
                        f"--resume --set train.lr={optimizer.param_groups[0]['lr'] / 2:.3g} --set train.clip_norm=10, "
                        f"or check the data and the model's scales"
                    ) from None
                retries = state.nonfinite_retries
                model.load_state_dict(snapshot["model"])
                guide.load_state_dict(snapshot["guide"])
                optimizer.load_state_dict(snapshot["optimizer"])
                state = TrainState(**snapshot["state"], history=state.history)
                state.nonfinite_retries = retries
                bar.n = steps_per_epoch * state.epoch
                say(
                    f"non-finite {', '.join(failure.terms)} at step {failure.step}: restored epoch {state.epoch + 1} "
                    f"start, learning rate halved to {optimizer.param_groups[0]['lr'] / 2:.3g} "
                    f"(recovery {retries}/{config.max_nonfinite_retries})"
                )
                continue
            _set_validation(False)
            distributed.average_buffers(context, model, guide)
            valid_metrics = {}
            if config.validate:
                valid_metrics = evaluate_objective(
                    model,
                    guide,
                    objective,
                    data,
                    "valid",
                    config.batch_size,
                    limit=config.valid_examples or None,
                    inputs=schedules.input_values(state.step),
                    context=context,
                )
                # A part that classifies (M2's q(y | x)) or clusters: its accuracy on the
                # validation labels, every epoch (empty for other pairs or unlabelled data).
                valid_metrics.update(label_metrics(model, guide, data.valid, config.batch_size, schedules.input_values(state.step)))
            state.epoch += 1
            record = {
                "epoch": state.epoch,
                "step": state.step,
                **schedules.record(state.step),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 3),
                **{f"train/{k}": v for k, v in train_metrics.items()},
                **{f"valid/{k}": v for k, v in valid_metrics.items()},
            }
            if strategy is not None:
                record.update(_aggressive_epoch_end(strategy, model, guide, data, config, schedules, state, say))
            state.history.append(record)
            # Without validation every epoch counts as the best so far: best.pt is the latest.
            score = valid_metrics[selection_metric] if config.validate else None
            # The first epoch always writes best.pt, so evaluation finds one even if validation went non-finite.
            improved = score is None or score > state.best_valid_score or state.best_epoch < 0
            if score is not None and not math.isfinite(score):
                say(
                    f"warning: validation {selection_metric} is {score} at epoch {state.epoch} although training stayed "
                    "finite; check the validation data and the model's scales"
                )
            if improved:
                state.best_valid_score, state.best_epoch = (state.best_valid_score if score is None else score), state.epoch
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            state.stopped_early = bool(config.patience and state.epochs_without_improvement >= config.patience)
            if diverged(state.history, f"valid/{selection_metric}") and not diverged(state.history[:-1], f"valid/{selection_metric}"):
                say(
                    f"warning: validation {selection_metric} {score:.4g} at epoch {state.epoch} is far below its first "
                    f"epoch's {state.history[0][f'valid/{selection_metric}']:.4g}: training is diverging without a NaN; "
                    f"consider a lower train.lr or train.clip_norm"
                )
            # Every rank takes part in gathering the random states, whether or not it was given run_dir.
            saved = saved_state() if checkpoint_dir is not None or context.active else None
            if checkpoint_dir is not None and context.is_main:
                if improved:
                    save_checkpoint(saved, checkpoint_dir / BEST)
                save_checkpoint(saved, checkpoint_dir / LATEST)
                append_jsonl(record, metrics_path)
            if config.validate:
                bar.set_postfix({"epoch": state.epoch, f"valid_{selection_metric}": f"{score:.2f}"})
            if state.stopped_early:
                say(f"early stopping at epoch {state.epoch}: no better validation {selection_metric} for {config.patience} epochs")
                break
    finally:
        bar.close()
        _set_validation(validation_was_on)
    return FitResult(state=state, stopped_early=state.stopped_early, device=device)


def _aggressive_epoch_end(strategy, model, guide, data, config, schedules, state, say) -> dict:
    """Aggressive guide updates, after an epoch: estimate validation I(x; z) while the mode is on,
    and end the mode for good at the first epoch whose I(x; z) is not above the previous one's."""
    record = {"aggressive": state.aggressive}
    if not state.aggressive:
        return record
    with preserved_rng():
        information = strategy.validation_mutual_information(
            model, guide, data, schedules.input_values(state.step), config.batch_size, seed=state.epoch
        )
    record["valid/mutual_information"] = information
    if not information > state.aggressive_mutual_information:
        state.aggressive, state.aggressive_ended_epoch = False, state.epoch
        record["aggressive_ended"] = True
        say(
            f"aggressive guide updates end after epoch {state.epoch}: validation I(x; z) = {information:.4g} did not "
            f"rise above {state.aggressive_mutual_information:.4g}; model and guide now train together"
        )
    state.aggressive_mutual_information = information
    return record


def _recovery_snapshot(model, guide, optimizer, state: TrainState) -> dict:
    """What a non-finite-loss recovery restores at the epoch's start: parameters and buffers,
    the optimizer's state and the counters. Not the history (a failed epoch appends nothing to it),
    the random state or the fingerprint, which only checkpoints need."""
    counters = {key: value for key, value in asdict(state).items() if key != "history"}

    def copied(state_dict: dict) -> dict:
        # Tensors are cloned; extra state (any value a module saves) is copied as it is.
        return {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value) for key, value in state_dict.items()}

    return {
        "model": copied(model.state_dict()),
        "guide": copied(guide.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "state": counters,
    }


def _check_key(model) -> tuple | None:
    """What ``model.check_batch`` depends on, for :func:`check_splits`'s cache (None: not cached)."""
    try:
        key = (type(model), model.data, repr(getattr(model, "config", None)), repr(getattr(model, "likelihood", None)))
        hash(key)
    except TypeError:
        return None
    return key


def _say(message: str) -> None:
    """A message from the loop: on stderr (stdout carries results), without breaking the progress bar."""
    tqdm.write(message, file=sys.stderr)


def _quiet(message: str) -> None:
    """Ranks other than 0 keep quiet: rank 0 says what every rank would."""


def _autocast(precision: str, device: torch.device, say) -> Callable[[], contextlib.AbstractContextManager] | None:
    """What the training step's forward runs under: nothing for float32; bfloat16 autocast on CUDA."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        say(f"train.precision = {precision!r} applies to CUDA only; this run trains on {device.type} in float32")
        return None
    if not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision = {precision!r}, but {torch.cuda.get_device_name(device)} has no bfloat16 support; use 'fp32'")
    return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def _seed_other_ranks(context) -> None:
    """A fresh distributed run: rank 0 keeps its random stream (the one a single process would
    use); every other rank gets its own, seeded from rank 0's seed and the rank."""
    if not context.active:
        return
    base = distributed.broadcast_object(context, torch.initial_seed(), "sharing the seed")
    if not context.is_main:
        torch.manual_seed(distributed.mixed_seed(base, context.rank))


def _restore_rng(saved: dict, context, say) -> None:
    """Each rank's random stream from a checkpoint. At the world size it was written with, every
    rank gets its own saved stream back (an exact resume); at another, rank 0 (or the single
    process) takes rank 0's stream and the other ranks are seeded from it."""
    saved_world = int(saved.get("world_size", 1))
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if saved_world != context.world_size:
        say(
            f"resuming a run written by {saved_world} process(es) with {context.world_size}: parameters, optimizer "
            f"state, step, schedules and early stopping continue exactly, and the global batch (train.batch_size) "
            f"is unchanged, but the data order and random draws from here on differ from an unbroken run"
        )
    if context.active and len(ranks) == context.world_size and saved_world == context.world_size:
        _set_rng_state(ranks[context.rank])
        return
    _set_rng_state(ranks[0])
    if context.active:
        with preserved_rng():
            base = int(torch.randint(0, 2**62, (1,)))
        if not context.is_main:
            torch.manual_seed(distributed.mixed_seed(base, context.rank))


def _epoch_order(data: DataSplits, context) -> torch.Tensor:
    """The epoch's permutation of the training rows: drawn by rank 0 exactly as a single process
    draws it (``torch.randperm`` on the device, from its random stream), and sent to every rank."""
    size = data.size("train")
    if context.is_main:
        order = torch.randperm(size, device=data.device)
    else:
        order = torch.empty(size, dtype=torch.int64, device=data.device)
    with distributed.collective(context, "sharing the epoch's order"):
        torch.distributed.broadcast(order, src=0)
    return order


def _set_validation(on: bool) -> None:
    pyro.enable_validation(on)
    torch.distributions.Distribution.set_default_validate_args(on)


def _postfix(schedules: StepSchedules, step: int) -> dict[str, str]:
    return {key.removeprefix("schedule/"): f"{value:.3g}" for key, value in schedules.record(step).items()}


def _run_epoch(
    model, guide, objective, data, config, optimizer, parameters, schedules, state, bar, context, averager=None, autocast=None, strategy=None, compiled=None
) -> dict[str, float]:
    model.train()
    guide.train()
    # Metrics stay on the device, kept per step and averaged once at the end of the epoch.
    history: list[dict[str, torch.Tensor]] = []
    first_step = state.step
    clip = config.clip_norm if config.clip_norm > 0 else math.inf
    has_inputs = bool(schedules.inputs)
    # Finiteness is read from the kept per-step losses and gradient norms every log_every steps
    # and at the epoch's end, not per step: a per-step read would stall a GPU's queue at every
    # step. Steps after a non-finite one are harmless, since recovery restores the epoch-start state.
    checked = 0  # history[:checked] is known finite
    check = _raise_if_nonfinite if averager is None else _raise_if_nonfinite_anywhere
    if averager is None:
        batches = data.batches("train", config.batch_size, shuffle=True)
    else:
        # This rank's piece of every global batch, and its share of the rows (python numbers).
        batches = data.shard_batches("train", config.batch_size, _epoch_order(data, context), context.rank, context.world_size)
        shares: list[float] = []
    for batch in batches:
        if averager is not None:
            batch, rows, total = batch
            shares.append(rows / total)
        beta, by_site = schedules.betas(state.step)  # python floats: no device work
        if has_inputs:
            batch = {**batch, **schedules.input_values(state.step)}
        if strategy is not None:
            inner_steps = _guide_steps(strategy, model, guide, objective, data, config, optimizer, schedules, state, batch, beta, by_site, autocast, clip)
        # Before the objective: an objective may compute gradients during its call
        # (e.g. one wrapping Pyro's loss_and_grads).
        optimizer.zero_grad(set_to_none=True)
        with strategy.model_step(optimizer) if strategy is not None else contextlib.nullcontext():
            if compiled is not None and (state.step > 0 or not config.validate_first_step):
                # A validated first step stays eager (its checks read values).
                loss, metrics = compiled(batch, beta, by_site)
            elif autocast is None:
                with kl_scale_unless_one(beta, by_site):
                    loss, metrics = objective(model, guide, batch)
            else:
                with kl_scale_unless_one(beta, by_site), autocast():
                    loss, metrics = objective(model, guide, batch)
            loss.backward()
        loss = loss.detach()
        if strategy is not None:
            strategy.model_only(optimizer)
            metrics["guide_steps"] = torch.tensor(float(inner_steps), device=loss.device)
        if averager is not None:
            # The gradient of the per-datapoint loss over the global batch, on every rank.
            averager(shares[-1] * context.world_size)
        # The gradient norm is computed only when clipping asks for it (it is a pass over every gradient).
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip) if clip < math.inf else None
        optimizer.step()
        if state.step == 0:
            _set_validation(False)
        state.step += 1
        metrics["loss"] = loss
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.detach()
        history.append(metrics)
        bar.update(1)
        if state.step % config.log_every == 0:
            checked = check(history, checked, first_step, context)
            if not bar.disable:
                recent = torch.stack([m["loss"] for m in history[-config.log_every :]]).mean()
                bar.set_postfix({"loss": f"{float(recent):.3f}", **_postfix(schedules, state.step)})
    check(history, checked, first_step, context)
    if averager is None:
        return {key: float(torch.stack([m[key] for m in history]).mean()) for key in history[0]}
    # Each step's global metric is the row-weighted sum of the ranks' metrics; one reduction per epoch.
    keys = sorted(history[0])
    table = torch.stack([torch.stack([m[key].double() for key in keys]) for m in history])
    table = table * torch.tensor(shares, dtype=torch.float64, device=table.device).unsqueeze(1)
    table = distributed.sum_tensor(context, table.to(context.device), "reducing training metrics").mean(0).cpu()
    return {key: float(value) for key, value in zip(keys, table)}


def _guide_steps(strategy, model, guide, objective, data, config, optimizer, schedules, state, batch, beta, by_site, autocast, clip) -> int:
    """Aggressive mode's guide-only steps before a model step: the first on the step's own batch,
    the rest on fresh random training batches, all at the step's beta and scheduled inputs."""
    inputs = schedules.input_values(state.step) if schedules.inputs else {}

    def step_on(inner_batch) -> torch.Tensor:
        with kl_scale_unless_one(beta, by_site), (autocast() if autocast is not None else contextlib.nullcontext()):
            loss, _ = objective(model, guide, inner_batch)
        loss.backward()
        return loss.detach()

    def draw_batch():
        return {**data.random_batch("train", config.batch_size), **inputs}

    try:
        return strategy.guide_steps(step_on, batch, draw_batch, optimizer, clip)
    except FloatingPointError:
        raise _NonFinite(state.step, ["guide-only loss"]) from None


def _raise_if_nonfinite(history: list[dict[str, torch.Tensor]], checked: int, first_step: int, context=None) -> int:
    """One host read for the steps not yet checked; if one went non-finite, name the first such
    step and its terms. Returns how many steps are now known finite."""
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
            raise _NonFinite(first_step + index, terms)


def _raise_if_nonfinite_anywhere(history: list[dict[str, torch.Tensor]], checked: int, first_step: int, context) -> int:
    """:func:`_raise_if_nonfinite` for every rank at once: the ranks agree on the first non-finite
    step of any rank (one small reduction), so one rank's NaN rolls back all of them. The terms
    named are those of the rank that went non-finite first (its own loss before a gradient that
    the averaging made non-finite everywhere)."""
    pending = len(history) - checked
    try:
        _raise_if_nonfinite(history, checked, first_step)
        local, terms = pending, []
    except _NonFinite as failure:
        local, terms = failure.step - first_step - checked, failure.terms
    # Order: earliest step, then a rank whose own loss or metrics went non-finite, then rank.
    own = 0 if any(term != "gradient" for term in terms) else 1
    code = distributed.min_int(context, (local * 2 + own) * context.world_size + context.rank, "checking for non-finite losses")
    index, source = code // (2 * context.world_size), code % context.world_size
    if index >= pending:
        return len(history)
    terms = distributed.broadcast_object_from(context, terms, source, "naming the non-finite terms")
    raise _NonFinite(first_step + checked + index, terms)
