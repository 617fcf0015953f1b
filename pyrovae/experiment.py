"""An experiment: a resolved config turned into data, model, guide, objective and schedule,
trained into a run folder and evaluated.

Run folder::

    config.toml        the resolved config (every default written out)
    metrics.jsonl      one record per epoch (train and validation metrics)
    checkpoints/       latest.pt and best.pt, written atomically
    final.json         test metrics: test_elbo, test_log_likelihood (+ particles), ...
    samples.png        prior samples, test images and their reconstructions
    curves.png         ELBO and KL per site by epoch
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyrovae.analysis import importance_log_likelihood, sample_grid, training_curves
from pyrovae.config import EvaluateConfig, PART_REGISTRIES, dump_toml, load_toml, resolve_config
from pyrovae.data.splits import DataSplits
from pyrovae.errors import ConfigError
from pyrovae.objectives import ELBO
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


def _construct(section: str, table: dict, *context) -> Any:
    target = PART_REGISTRIES[section].resolve(table["name"], f"[{section}] name")
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

    @classmethod
    def from_config(cls, raw: dict) -> "Experiment":
        config = resolve_config(raw)
        data = _construct("data", config["data"])
        torch.manual_seed(config["seed"])
        model = _construct("model", config["model"], data.spec)
        guide = _construct("guide", config["guide"], data.spec, model)
        return cls(
            config=config,
            data=data,
            model=model,
            guide=guide,
            objective=_construct("objective", config["objective"]),
            anneal=_construct("anneal", config["anneal"]),
            train_config=TrainConfig(**config["train"]),
            evaluate_config=EvaluateConfig(**config["evaluate"]),
        )

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
        evaluate = self.evaluate_config
        particles = particles or evaluate.particles
        limit = evaluate.test_examples or None
        elbo = evaluate_objective(self.model, self.guide, ELBO(), self.data, "test", evaluate.batch_size, limit=limit)
        test = {key: value[:limit] for key, value in self.data.test.items()}
        log_likelihood = importance_log_likelihood(
            self.model, self.guide, test, particles=particles, batch_size=evaluate.batch_size, progress=progress
        )
        return {
            "test_elbo": elbo["elbo"],
            "test_reconstruction": elbo["reconstruction"],
            **{f"test_{key}": value for key, value in elbo.items() if key.startswith("kl/")},
            "test_log_likelihood": float(log_likelihood.mean()),
            "test_nll": -float(log_likelihood.mean()),
            "particles": particles,
            "test_examples": int(log_likelihood.shape[0]),
            "checkpoint": evaluate.checkpoint,
        }

    def plots(self, run_dir: str | Path, history: list[dict] | None = None) -> list[Path]:
        run_dir = Path(run_dir)
        written = []
        if self.data.spec.image_shape is not None:
            written.append(sample_grid(self.model, self.guide, self.data.test["x"], run_dir / "samples.png", self.data.spec.image_shape))
        if history:
            written.append(training_curves(history, run_dir / "curves.png"))
        return written
