"""An experiment: a resolved config turned into data, model, guide, objective and schedule,
trained into a run folder and evaluated.

Run folder::

    config.toml        the resolved config (every default written out)
    metrics.jsonl      one record per epoch (train and validation metrics)
    checkpoints/       latest.pt and best.pt, written atomically
    final.json         test metrics: the objective's own (test_elbo, test_iwae, test_kl/<site> ...),
                       test_log_likelihood (+ particles), ...
    samples.png        prior samples, test images and their reconstructions (image data)
    samples.json       the same rows as numbers, for data that are not images
    curves.png         ELBO and KL per site by epoch

Evaluation runs the pair on whole test batches (``x`` and every other key the loader
gives) plus the scheduled inputs at the loaded checkpoint's step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyrovae.analysis import importance_log_likelihood, sample_grid, sample_rows, training_curves
from pyrovae.config import EvaluateConfig, PART_REGISTRIES, dump_toml, load_toml, resolve_config
from pyrovae.data.splits import DataSplits
from pyrovae.errors import ConfigError
from pyrovae.registry import SCHEDULES
from pyrovae.schedules import StepSchedules
from pyrovae.train import BEST, LATEST, TrainConfig, evaluate_objective, fit, load_checkpoint, resolve_device

CONFIG_FILE = "config.toml"
FINAL_FILE = "final.json"


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _options(table: dict) -> dict:
    return {key: value for key, value in table.items() if key != "name"}


def _construct(section: str, table: dict, *context, registry=None) -> Any:
    target = (registry or PART_REGISTRIES[section]).resolve(table["name"], f"[{section}] name")
    options = _options(table)
    config_class = getattr(target, "Config", None)
    try:
        if config_class is not None:
            return target(config_class(**options), *context)
        return target(*context, **options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"[{section}] {table['name']!r}: {error}") from error


@dataclass
class Experiment:
    config: dict
    data: DataSplits
    model: Any
    guide: Any
    objective: Any
    anneal: Any
    train_config: TrainConfig
    evaluate_config: EvaluateConfig
    # Per-site beta schedules ([anneal.sites.<site>]) and named-input schedules ([schedules.<input>]).
    anneal_sites: dict = field(default_factory=dict)
    input_schedules: dict = field(default_factory=dict)
    # The optimizer step of the loaded parameters: scheduled inputs take their values at it.
    step: int = 0

    @classmethod
    def from_config(cls, raw: dict) -> "Experiment":
        config = resolve_config(raw)
        data = _construct("data", config["data"])
        torch.manual_seed(config["seed"])
        model = _construct("model", config["model"], data.spec)
        guide = _construct("guide", config["guide"], data.spec, model)
        anneal = {key: value for key, value in config["anneal"].items() if key != "sites"}
        sites = config["anneal"].get("sites", {})
        experiment = cls(
            config=config,
            data=data,
            model=model,
            guide=guide,
            objective=_construct("objective", config["objective"]),
            anneal=_construct("anneal", anneal),
            train_config=TrainConfig(**config["train"]),
            evaluate_config=EvaluateConfig(**config["evaluate"]),
            anneal_sites={site: _construct(f"anneal.sites.{site}", table, registry=SCHEDULES) for site, table in sites.items()},
            input_schedules={
                name: _construct(f"schedules.{name}", table, registry=SCHEDULES)
                for name, table in config.get("schedules", {}).items()
            },
        )
        experiment.schedules()  # unknown sites or inputs, wrong roles: refused before any training
        return experiment

    def schedules(self) -> StepSchedules:
        """The checked schedules of this experiment, with the pair's declared inputs filled in."""
        return StepSchedules.for_pair(self.model, self.guide, self.anneal, self.anneal_sites, self.input_schedules)

    def inputs(self) -> dict[str, float]:
        """The scheduled inputs' values at the loaded parameters' step (empty if the pair declares none)."""
        return self.schedules().input_values(self.step)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Experiment":
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
        raw = load_toml(run_dir / CONFIG_FILE)
        return cls.from_config(raw)

    def load_parameters(self, run_dir: str | Path, which: str = "best") -> dict:
        path = Path(run_dir) / "checkpoints" / (BEST if which == "best" else LATEST)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint {path}; train first")
        device = resolve_device(self.train_config.device)
        saved = load_checkpoint(path, device)
        self.model.load_state_dict(saved["model"])
        self.guide.load_state_dict(saved["guide"])
        self.step = int(saved["state"]["step"])
        self.model.to(device)
        self.guide.to(device)
        self.data = self.data.to(device)
        return saved

    def train(self, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
        run_dir = Path(run_dir)
        config_path = run_dir / CONFIG_FILE
        if resume:
            self._check_same_experiment(config_path)
        elif (run_dir / "checkpoints" / LATEST).exists():
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or --out to start a new one")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dump_toml(self.config))
        started = time.perf_counter()
        result = fit(
            self.model,
            self.guide,
            self.objective,
            self.data,
            self.train_config,
            anneal=self.anneal,
            anneal_sites=self.anneal_sites,
            inputs=self.input_schedules,
            run_dir=run_dir,
            resume=resume,
            progress=progress,
            fingerprint=self.config,
        )
        train_seconds = time.perf_counter() - started
        self.load_parameters(run_dir, self.evaluate_config.checkpoint)
        final = self.test_metrics(progress=progress)
        final.update(
            epochs=result.state.epoch,
            best_epoch=result.state.best_epoch,
            stopped_early=result.stopped_early,
            train_seconds_this_session=round(train_seconds, 1),
            device=str(result.device),
        )
        (run_dir / FINAL_FILE).write_text(json.dumps(final, indent=2) + "\n")
        self.plots(run_dir, result.state.history)
        return final

    def _check_same_experiment(self, config_path: Path) -> None:
        if not config_path.exists():
            raise ConfigError(f"--resume: {config_path.parent} has no {CONFIG_FILE}; nothing to resume")
        saved, current = _flatten(resolve_config(load_toml(config_path))), _flatten(self.config)
        differences = sorted(
            key for key in set(saved) | set(current) if key != "train.epochs" and saved.get(key) != current.get(key)
        )
        if differences:
            raise ConfigError(f"--resume: the experiment differs from the saved run in {', '.join(differences)}")

    def test_metrics(self, particles: int | None = None, progress: bool = False) -> dict:
        """The configured objective's own metrics on the test set (unannealed), each as
        ``test_<metric>``, and the importance-sampled log-likelihood, all on whole batches with
        the scheduled inputs at the loaded step."""
        evaluate = self.evaluate_config
        particles = particles or evaluate.particles
        limit = evaluate.test_examples or None
        inputs = self.inputs()
        metrics = evaluate_objective(
            self.model, self.guide, self.objective, self.data, "test", evaluate.batch_size, limit=limit, inputs=inputs
        )
        test = {key: value[:limit] for key, value in self.data.test.items()}
        log_likelihood = importance_log_likelihood(
            self.model, self.guide, test, particles=particles, inputs=inputs, batch_size=evaluate.batch_size, progress=progress
        )
        return {
            **{f"test_{key}": value for key, value in metrics.items()},
            "test_log_likelihood": float(log_likelihood.mean()),
            "test_nll": -float(log_likelihood.mean()),
            "particles": particles,
            "test_examples": int(log_likelihood.shape[0]),
            "checkpoint": evaluate.checkpoint,
            "step": self.step,
            **{f"schedule/{name}": value for name, value in inputs.items()},
        }

    def write_samples(self, path: str | Path | None = None, run_dir: str | Path | None = None, count: int = 16) -> Path:
        """Prior samples and reconstructions of the first ``count`` test rows: a PNG grid for
        image data (``samples.png``), else JSON (``samples.json``; integer rows for discrete data)."""
        images = self.data.spec.image_shape is not None
        if path is None:
            path = Path(run_dir or ".") / ("samples.png" if images else "samples.json")
        path = Path(path)
        test = self.data.test
        if images and path.suffix.lower() != ".json":
            return sample_grid(self.model, self.guide, test, path, self.data.spec.image_shape, count=count, inputs=self.inputs())
        if path.suffix.lower() == ".png":
            raise ConfigError(f"data set {self.data.spec.name!r} has no image shape to draw; write JSON instead (--out FILE.json)")
        return sample_rows(
            self.model, self.guide, test, path, count=count, inputs=self.inputs(), about={"data": self.data.spec.name, "step": self.step}
        )

    def plots(self, run_dir: str | Path, history: list[dict] | None = None) -> list[Path]:
        run_dir = Path(run_dir)
        written = [self.write_samples(run_dir=run_dir)]
        if history:
            written.append(training_curves(history, run_dir / "curves.png"))
        return written
