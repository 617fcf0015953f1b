"""Tracking in the tools researchers already use: TensorBoard and MLflow (``[log]``).

``metrics.jsonl`` stays the source of truth; a tracker copies what the loop records into another
tool, and only rank 0 tracks under ``torchrun``. Both are optional extras, imported only when asked
for; a missing one is a one-line :class:`~pyrovae.errors.ConfigError` before training starts.

- ``[log] tensorboard = true``: event files in ``RUN_DIR/tensorboard/`` (``torch.utils.tensorboard``):
  every epoch's record at its global step, the mean loss and the schedules (beta, temperatures ...)
  every ``train.log_every`` steps, and for image data a picture each epoch (prior samples, validation
  images, their reconstructions). A resumed run purges the events written after its checkpoint
  (``purge_step``), so curves never double back.
- ``[log] mlflow = "URI"`` (or ``true``: a local store ``mlruns/`` in the working directory, an SQLite
  file ``mlruns/mlflow.db`` with the artifacts beside it): the resolved config as parameters, the epoch
  records as metrics, then the test metrics and ``final.json``, ``config.toml``, the plots and samples
  as artifacts; ``pyrovae analyze`` adds ``analysis/``. ``RUN_DIR/mlflow.json`` links the run folder
  to its MLflow run, and a resumed run continues that run.

A tracker has four moments: ``start`` (before the first step), ``steps`` (every ``log_every`` steps),
``epoch`` (each epoch's record) and ``finish`` (after the test metrics); :class:`Trackers` calls them
in turn. Other listeners (the Optuna pruning reporter of :mod:`pyrovae.tuning`) take the same shape.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pyrovae.errors import ConfigError
from pyrovae.traces import preserved_rng
from pyrovae.files import write_text_atomically

TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_LINK = "mlflow.json"
MLFLOW_LOCAL = "mlruns"
ARTIFACTS = ("final.json", "config.toml", "curves.png", "samples.png", "samples.json", "samples.txt")
IMAGE_ROWS = 8


@dataclass
class LogConfig:
    """The ``[log]`` table."""

    # Write TensorBoard event files into the run folder's tensorboard/ (pip install -e ".[tensorboard]").
    tensorboard: bool = False
    # Log to MLflow: a tracking URI (any that MLflow takes), or true for a local store mlruns/ in the
    # working directory (pip install -e ".[mlflow]"). false: no MLflow.
    mlflow: bool | str = False
    # The MLflow experiment that runs are filed under.
    mlflow_experiment: str = "pyrovae"

    def __post_init__(self):
        if isinstance(self.mlflow, str) and not self.mlflow.strip():
            raise ValueError("log.mlflow = '' is not allowed: give a tracking URI, true (a local mlruns/ store) or false")
        if not self.mlflow_experiment.strip():
            raise ValueError("log.mlflow_experiment must name an MLflow experiment")


def _needs(module: str, extra: str, setting: str):
    """Import ``module``, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{setting} needs {extra}, which is not installed: pip install -e \".[{extra.lower()}]\" (or pip install {extra.lower()})") from None


def _numbers(record: Mapping) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker:
    """What a tracker may do at each moment of a run (every moment does nothing by default)."""

    def start(self, training, resumed: bool) -> None:
        """Before the first step (``training``: the :class:`~pyrovae.train.training.Training`)."""

    def steps(self, training, history: Sequence[Mapping[str, torch.Tensor]], step: int) -> None:
        """Every ``log_every`` steps: ``history`` holds the epoch's per-step metrics so far."""

    def epoch(self, training, record: Mapping) -> None:
        """After each epoch's record was written to ``metrics.jsonl``."""

    def finish(self, run_dir: Path, final: Mapping) -> None:
        """After ``final.json`` and the plots were written."""

    def close(self) -> None:
        """At the end, finished or not."""


class Trackers:
    """The trackers of one run, called in turn; none but rank 0's track under torchrun."""

    def __init__(self, trackers: Sequence[Tracker] = (), active: bool = True):
        self.trackers = list(trackers) if active else []

    def start(self, training, resumed: bool) -> None:
        for tracker in self.trackers:
            tracker.start(training, resumed)

    def steps(self, training, history, step: int) -> None:
        for tracker in self.trackers:
            tracker.steps(training, history, step)

    def epoch(self, training, record: Mapping) -> None:
        for tracker in self.trackers:
            tracker.epoch(training, record)

    def finish(self, run_dir: Path, final: Mapping) -> None:
        for tracker in self.trackers:
            tracker.finish(run_dir, final)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def trackers_for(log: LogConfig | Mapping, run_dir: str | Path, config: Mapping) -> list[Tracker]:
    """The trackers that ``[log]`` asks for, for a run in ``run_dir`` of the resolved ``config``;
    a missing library is refused here, before training."""
    log = log if isinstance(log, LogConfig) else LogConfig(**log)
    trackers: list[Tracker] = []
    if log.tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    if log.mlflow:
        trackers.append(MLflowTracker(run_dir, config, None if log.mlflow is True else str(log.mlflow), log.mlflow_experiment))
    return trackers


# --- TensorBoard ----------------------------------------------------------------------------------------


def image_mosaic(model, guide, batch: Mapping, image_shape: Sequence[int]) -> torch.Tensor:
    """A (H, W) picture in [0, 1]: three rows of ``len(batch["x"])`` tiles, the means of p(x | z) with z
    from the prior, the images, and the means of p(x | z) with z from q(z | x); one blank pixel between tiles."""
    from pyrovae.analysis.plots import evaluation_mode, observation_means

    with evaluation_mode(model, guide):
        prior = observation_means(model, guide, batch, from_prior=True)
        reconstructions = observation_means(model, guide, batch, from_prior=False)
    height, width = int(image_shape[-2]), int(image_shape[-1])
    rows = []
    for images in (prior, batch["x"], reconstructions):
        tiles = images.detach().float().cpu().reshape(images.shape[0], -1, height, width)[:, 0].clamp(0, 1)
        padded = torch.nn.functional.pad(tiles, (0, 1, 0, 1), value=1.0)  # (N, H+1, W+1)
        rows.append(padded.permute(1, 0, 2).reshape(height + 1, -1))
    return torch.cat(rows)[:-1, :-1]


class TensorBoardTracker(Tracker):
    """Event files in ``RUN_DIR/tensorboard/``: records at their global step, the loss and schedules
    every ``log_every`` steps, the picture of samples each epoch for image data."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / TENSORBOARD_FOLDER
        _needs("tensorboard", "TensorBoard", "[log] tensorboard = true")
        self.writer = None

    def start(self, training, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what a killed run wrote after its checkpoint (steps after the checkpoint's
        # step), as metrics.jsonl does.
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=training.state.step + 1 if resumed else None)

    def steps(self, training, history, step: int) -> None:
        recent = torch.stack([metrics["loss"] for metrics in history[-training.config.log_every :]]).mean()
        self.writer.add_scalar("step/loss", float(recent), step)
        for key, value in training.schedules.record(step).items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, training, record: Mapping) -> None:
        step = int(record["step"])
        for key, value in _numbers(record).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        shape = training.data.spec.image_shape
        split = "valid" if training.data.size("valid") > 0 else "test"
        if shape is not None and training.data.size(split) > 0:
            with preserved_rng():  # the picture draws z: the run's random numbers stay as they were
                torch.manual_seed(0)
                batch = {
                    **training.data.rows(split, 0, min(IMAGE_ROWS, training.data.size(split))),
                    **training.schedules.input_values(step),
                }
                mosaic = image_mosaic(training.model, training.guide, batch, shape)
            self.writer.add_image("samples", mosaic, step, dataformats="HW")
        self.writer.flush()

    def finish(self, run_dir: Path, final: Mapping) -> None:
        if self.writer is None:
            return
        step = int(final.get("step", 0))
        for key, value in _numbers(final).items():
            if key.startswith("test_"):
                self.writer.add_scalar(f"test/{key.removeprefix('test_')}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- MLflow ---------------------------------------------------------------------------------------------


def _flat(config: Mapping, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def local_store(folder: str | Path | None = None) -> tuple[str, Path]:
    """The default MLflow store: ``mlruns/`` in ``folder`` (the working directory), an SQLite file
    ``mlruns/mlflow.db`` (MLflow no longer takes a bare folder) and its artifacts in ``mlruns/artifacts``."""
    root = (Path(folder) if folder is not None else Path.cwd()).absolute() / MLFLOW_LOCAL
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def mlflow_link(run_dir: str | Path) -> dict | None:
    """The MLflow run a run folder is linked to (``tracking_uri``, ``run_id`` ...), or None."""
    path = Path(run_dir) / MLFLOW_LINK
    return json.loads(path.read_text()) if path.exists() else None


class MLflowTracker(Tracker):
    """One MLflow run per run folder (``RUN_DIR/mlflow.json`` links them; a resume continues it),
    logged with an explicit ``MlflowClient`` (no global active run, so runs in one process never mix)."""

    def __init__(self, run_dir: str | Path, config: Mapping, uri: str | None = None, experiment: str = "pyrovae"):
        _needs("mlflow", "MLflow", "[log] mlflow")
        self.run_dir, self.config, self.experiment = Path(run_dir), config, experiment
        self.uri, self.artifacts = (uri, None) if uri is not None else local_store()
        self.client = self.run_id = None
        self.finished = False

    def start(self, training, resumed: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        link = mlflow_link(self.run_dir) if resumed else None
        if link is not None:  # the same MLflow run goes on
            self.client, self.run_id = MlflowClient(tracking_uri=link["tracking_uri"]), link["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.client = MlflowClient(tracking_uri=self.uri)
        run = self.client.create_run(self._experiment_id(), run_name=self.run_dir.name, tags={"pyrovae.run_dir": str(self.run_dir.absolute())})
        self.run_id = run.info.run_id
        link = {"tracking_uri": self.uri, "experiment": self.experiment, "experiment_id": run.info.experiment_id, "run_id": self.run_id}
        write_text_atomically(self.run_dir / MLFLOW_LINK, json.dumps(link, indent=2) + "\n")
        params = [Param(key, value[:6000]) for key, value in _flat(self.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None if self.artifacts is None else (self.artifacts / self.experiment).as_uri()
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - made meanwhile by another process of a sweep
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def epoch(self, training, record: Mapping) -> None:
        values = _numbers(record)
        self._log_metrics({key: value for key, value in values.items() if key != "step"}, int(record["step"]))

    def finish(self, run_dir: Path, final: Mapping) -> None:
        if self.run_id is None:
            return
        self._log_metrics(_numbers(final), int(final.get("step", 0)))
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.finished = True

    def close(self) -> None:
        if self.run_id is not None and not self.finished:
            self.client.set_terminated(self.run_id, status="KILLED")  # stopped, pruned or failed: --resume goes on with it


def log_analysis(run_dir: str | Path, analysis_dir: str | Path) -> bool:
    """Add a run's ``analysis/`` folder to its linked MLflow run (``pyrovae analyze``); False when the
    run folder is not linked. Needs MLflow where it is linked."""
    link = mlflow_link(run_dir)
    if link is None:
        return False
    _needs("mlflow", "MLflow", f"{Path(run_dir) / MLFLOW_LINK} (a run logged to MLflow)")
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=link["tracking_uri"]).log_artifacts(link["run_id"], str(analysis_dir), artifact_path="analysis")
    return True

