"""What ``fit`` is told: :class:`TrainConfig` (the ``[train]`` table, checked) and :class:`FitOptions`
(its keyword options)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

from pyrovae.train.compiled import COMPILE_MODES
from pyrovae.train.optim import OPTIMIZERS
from pyrovae.train.strategies import STRATEGIES

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    # Multiply the learning rates by this factor after every epoch (1: constant).
    lr_decay: float = 1.0
    # He et al. 2019's plateau decay: after lr_plateau_patience epochs without a better validation
    # score, multiply the learning rates by lr_plateau_factor, and again after each as many more;
    # with lr_plateau_max_decays, the run stops at that many decays (as He et al.'s does at 5).
    # 0: no plateau decay; no limit.
    lr_plateau_patience: int = 0
    lr_plateau_factor: float = 0.5
    lr_plateau_max_decays: int = 0
    # At each plateau decay, go back to the best epoch's parameters with a fresh optimizer state,
    # as He et al.'s code does (it reloads its best model and builds new optimizers).
    lr_plateau_reload_best: bool = False
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
            "lr_plateau_patience": (self.lr_plateau_patience >= 0, ">= 0 (0: no plateau decay)"),
            "lr_plateau_factor": (0 < self.lr_plateau_factor < 1, "in (0, 1)"),
            "lr_plateau_max_decays": (self.lr_plateau_max_decays >= 0, ">= 0 (0: no limit)"),
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
        if not self.validate and self.lr_plateau_patience:
            raise ValueError(
                f"train.lr_plateau_patience = {self.lr_plateau_patience} needs validation: the plateau decay reads the "
                "validation score; set train.validate = true"
            )
        if self.patience and self.lr_plateau_patience and self.patience <= self.lr_plateau_patience:
            raise ValueError(
                f"train.patience = {self.patience} stops the run before train.lr_plateau_patience = "
                f"{self.lr_plateau_patience} epochs without a better score can decay the learning rates; "
                "use a larger patience, or 0 (stop by lr_plateau_max_decays instead, as He et al. do)"
            )
        if self.lr_plateau_reload_best and not self.lr_plateau_patience:
            raise ValueError("train.lr_plateau_reload_best = true needs train.lr_plateau_patience >= 1: it reloads at each plateau decay")
        if self.lr_plateau_max_decays and not self.lr_plateau_patience:
            raise ValueError(
                f"train.lr_plateau_max_decays = {self.lr_plateau_max_decays} needs train.lr_plateau_patience >= 1: "
                "without it the learning rate never decays"
            )
        if not self.validate and self.patience:
            raise ValueError(f"train.patience = {self.patience} needs validation: early stopping reads the validation score; set train.validate = true")


@dataclass(frozen=True)
class FitOptions:
    """``fit``'s keyword options (see :func:`pyrovae.train.loop.fit`)."""

    # The KL weight's schedule (step -> beta), per-site schedules overriding it for the latent sites
    # they name, and schedules for the named inputs the model or guide declares in scheduled_inputs.
    anneal: Callable[[int], float] | None = None
    anneal_sites: Mapping[str, Callable[[int], float]] | None = None
    inputs: Mapping[str, Callable[[int], float]] | None = None
    # Where checkpoints/ and metrics.jsonl go (None: nothing is written).
    run_dir: str | Path | None = None
    # Continue from run_dir's checkpoints/latest.pt.
    resume: bool = False
    progress: bool = True
    # Stored in checkpoints (e.g. the resolved config).
    fingerprint: dict | None = None
    # File name -> text of the run folder's own small files (config.toml, vocabulary.json), kept in
    # every checkpoint so that a damaged or deleted one can be restored and checked on resume.
    run_files: Mapping[str, str] | None = None
    # Trackers (pyrovae.train.tracking.Tracker): told of the start, every log_every steps and each
    # epoch's record, on rank 0; whoever made them closes them.
    trackers: Sequence = ()

    @classmethod
    def of(cls, options: Mapping) -> "FitOptions":
        """The options from ``fit``'s keyword arguments; an unknown one is refused as Python would."""
        known = {field.name for field in fields(cls)}
        for key in options:
            if key not in known:
                raise TypeError(f"fit() got an unexpected keyword argument {key!r}")
        return cls(**options)
