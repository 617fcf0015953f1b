"""What a run shows and records: its messages, the progress bar and ``metrics.jsonl``.

Messages go to stderr (stdout carries results) without breaking the progress bar; ranks other than
0 keep quiet (rank 0 says what every rank would). On a terminal the bar counts steps, shows the loss
of the last ``log_every`` steps and the schedules' values when the loop reads the device anyway, and
the validation score after each epoch. Without a bar (``--no-progress``, or stderr is not a terminal:
a log file, a sweep's ``train.log``) each epoch prints one line instead of carriage-return redraws:
the epoch, the validation score, the seconds it took and the time left. ``metrics.jsonl`` holds one record per epoch; a resumed run
rewrites it from the checkpoint's history, so records written after the last checkpoint by a
killed run are dropped, never duplicated.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from pyrovae.train.checkpoint import append_jsonl, write_jsonl


def say(message: str) -> None:
    """A message from the loop: on stderr (stdout carries results), without breaking the progress bar."""
    tqdm.write(message, file=sys.stderr)


def quiet(message: str) -> None:
    """Ranks other than 0 keep quiet: rank 0 says what every rank would."""


def messenger(context) -> Callable[[str], None]:
    return say if context.is_main else quiet


def stderr_is_terminal() -> bool:
    """Whether a progress bar can redraw in place on stderr (else: one line per epoch)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """The progress bar over every step of the run with ``enabled``, else one line per epoch (rank 0 only)."""

    def __init__(self, training, enabled: bool = True):
        self.training = training
        config = training.config
        self.lines = not enabled and training.context.is_main
        self.started, self.first_epoch = time.perf_counter(), training.state.epoch
        self.steps_per_epoch = training.data.num_batches("train", config.batch_size)
        self.bar = tqdm(
            total=self.steps_per_epoch * config.epochs,
            initial=self.steps_per_epoch * training.state.epoch,
            disable=not enabled or not training.context.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exception) -> None:
        self.bar.close()

    def update(self) -> None:
        self.bar.update(1)

    def show_loss(self, history: list[dict[str, torch.Tensor]], step: int) -> None:
        """The mean loss of the last ``log_every`` steps (one device read) and the schedules at ``step``."""
        if self.bar.disable:
            return
        recent = torch.stack([m["loss"] for m in history[-self.training.config.log_every :]]).mean()
        schedules = {key.removeprefix("schedule/"): f"{value:.3g}" for key, value in self.training.schedules.record(step).items()}
        self.bar.set_postfix({"loss": f"{float(recent):.3f}", **schedules})

    def rewind(self, epoch: int) -> None:
        """Back to the start of ``epoch`` (a non-finite recovery redoes it)."""
        self.bar.n = self.steps_per_epoch * epoch

    def epoch_end(self, valid_metrics: dict[str, float], seconds: float | None = None) -> None:
        """The validation score on the bar, or the epoch's line (``seconds``: the epoch took)."""
        run = self.training
        score = valid_metrics[run.selection_metric] if run.config.validate else None
        if score is not None:
            self.bar.set_postfix({"epoch": run.state.epoch, f"valid_{run.selection_metric}": f"{score:.2f}"})
        if not self.lines:
            return
        epoch, epochs = run.state.epoch, run.config.epochs
        parts = [f"epoch {epoch}/{epochs}"]
        if score is not None:
            parts.append(f"valid {run.selection_metric} {score:.4g}")
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        done = epoch - self.first_epoch
        if done > 0 and epoch < epochs:
            parts.append(f"about {duration((time.perf_counter() - self.started) / done * (epochs - epoch))} left")
        say("  ".join(parts))


class Records:
    """``metrics.jsonl`` in ``run_dir`` (written by rank 0; nothing without ``run_dir``), and the
    per-epoch record kept in the state's history."""

    def __init__(self, training, run_dir: str | Path | None):
        self.training = training
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.writes = self.path is not None and training.context.is_main

    def start(self, resumed: bool) -> None:
        """A fresh run starts an empty file; a resumed one rewrites it from the restored history."""
        if not self.writes:
            return
        if resumed:
            write_jsonl(self.training.state.history, self.path)  # drop records written after this checkpoint
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def epoch(self, started: float, train_metrics: dict[str, float], valid_metrics: dict[str, float]) -> dict:
        """The record of the epoch just completed (``started``: its ``time.perf_counter()`` at the start)."""
        run = self.training
        return {
            "epoch": run.state.epoch,
            "step": run.state.step,
            **run.schedules.record(run.state.step),
            "lr": run.optimizer.param_groups[0]["lr"],
            **({"guide_lr": _group_lr(run.optimizer, "guide")} if run.config.guide_lr is not None else {}),
            "seconds": round(time.perf_counter() - started, 3),
            **{f"train/{k}": v for k, v in train_metrics.items()},
            **{f"valid/{k}": v for k, v in valid_metrics.items()},
        }

    def append(self, record: dict) -> None:
        if self.writes:
            append_jsonl(record, self.path)


def _group_lr(optimizer, name: str) -> float:
    """The learning rate of the optimizer's parameter group ``name`` ("model" or "guide")."""
    return next(group["lr"] for group in optimizer.param_groups if group.get("name") == name)
