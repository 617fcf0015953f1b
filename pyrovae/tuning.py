"""Hyperparameter search with Optuna: ``pyrovae tune EXPERIMENT --space SPACE.toml --trials N --out DIR``.

Each trial is an ordinary run folder, ``DIR/trial_NNNN`` (``evaluate``, ``analyze`` and ``--resume``
work on it), trained with the settings Optuna's TPE sampler draws from ``SPACE.toml``. The objective is
the experiment's validation metric (``valid/<selection metric>``: the ELBO, or the IWAE bound; the
best epoch's value, the one ``best.pt`` holds), maximized; ``--metric`` and ``--direction`` choose
another record of ``metrics.jsonl``. Every epoch's value is reported to Optuna, and a median pruner
stops a trial whose curve falls below the median of the trials before it at the same epoch (its
folder keeps its checkpoints, and ``final.json`` is missing).

The study lives in an SQLite file, ``DIR/study.db``, unless ``--storage`` names any Optuna RDB URL
(``postgresql://...``, ``mysql://...``): processes on several machines that run the same command with
the same ``--storage`` work on one study, as Optuna documents; ``--trials`` is the study's total
(complete and pruned), so they stop together. ``DIR/best.toml`` is the experiment with the best
trial's settings; ``DIR/trials.csv`` lists every trial.

``SPACE.toml``: one table per setting, named by its key::

    [train.lr]
    type = "float"           # float: low, high, log = true for a log scale
    low = 1e-4
    high = 1e-2
    log = true

    [model.latent_dim]
    type = "int"             # int: low, high, optional step, log
    low = 4
    high = 32

    [model.hidden]
    type = "choice"          # choice: any TOML values, e.g. lists
    choices = [[64], [128], [128, 64]]
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pyrovae.config import dump_toml, load_experiment, load_toml, resolve_config
from pyrovae.errors import ConfigError, NonFiniteLossError
from pyrovae.experiment import Experiment
from pyrovae.train.tracking import Tracker
from pyrovae.files import write_text_atomically

STUDY_FILE = "study.db"
BEST_FILE = "best.toml"
TRIALS_FILE = "trials.csv"
KINDS = ("float", "int", "choice")
KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "choice": {"choices"}}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError('pyrovae tune needs Optuna, which is not installed: pip install -e ".[tune]" (or pip install optuna)') from None
    return optuna


@dataclass(frozen=True)
class Parameter:
    """One setting of the search space."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        # Optuna stores plain values; other choices (lists, tables) are stored as their TOML text.
        labels = [_label(choice) for choice in self.choices]
        return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]

    def override(self, value) -> str:
        """The ``--set`` that applies ``value``."""
        return f"{self.key}={_toml_value(value)}"


def _toml_value(value) -> str:
    """A setting's value as ``--set`` reads it (TOML; JSON's numbers, strings, booleans and lists are TOML)."""
    return json.dumps(value)


def _label(choice):
    return choice if isinstance(choice, (bool, int, float, str)) else _toml_value(choice)


def _tables(table: Mapping, prefix: str = ""):
    for key, value in table.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"--space: {prefix}{key} = {value!r}: expected a table [{prefix}{key}] with type = float, int or choice")
        if "type" in value:
            yield f"{prefix}{key}", value
        else:
            yield from _tables(value, f"{prefix}{key}.")


def load_space(path: str | Path) -> list[Parameter]:
    """The search space of a TOML file (see the module's docstring); every mistake in one line."""
    parameters = []
    for key, table in _tables(load_toml(path)):
        kind = table["type"]
        if kind not in KINDS:
            raise ConfigError(f"--space [{key}] type = {kind!r}: expected one of {', '.join(KINDS)}")
        unknown = sorted(set(table) - KEYS[kind] - {"type"})
        if unknown:
            raise ConfigError(f"--space [{key}]: unknown key {unknown[0]!r} for type {kind!r}; expected {', '.join(sorted(KEYS[kind]))}")
        if kind == "choice":
            choices = table.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"--space [{key}]: choices must be a non-empty list")
            if any(isinstance(choice, dict) for choice in choices):
                raise ConfigError(f"--space [{key}]: a choice is a table; give each setting of it a table of its own")
            labels = [_label(choice) for choice in choices]
            if len(set(map(repr, labels))) != len(labels):
                raise ConfigError(f"--space [{key}]: a choice is named twice")
            parameters.append(Parameter(key, kind, choices=tuple(choices)))
            continue
        low, high, log, step = table.get("low"), table.get("high"), table.get("log", False), table.get("step")
        numbers = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, numbers) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise ConfigError(f"--space [{key}]: low and high must be {'integers' if kind == 'int' else 'numbers'}, got {low!r} and {high!r}")
        if not low < high:
            raise ConfigError(f"--space [{key}]: low = {low} must be below high = {high}")
        if not isinstance(log, bool):
            raise ConfigError(f"--space [{key}]: log must be true or false")
        if log and low <= 0:
            raise ConfigError(f"--space [{key}]: a log scale needs low > 0, got {low}")
        if step is not None and (log or not isinstance(step, numbers) or isinstance(step, bool) or step <= 0):
            raise ConfigError(f"--space [{key}]: step must be a number > 0, and cannot go with log = true")
        parameters.append(Parameter(key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high, log, step))
    if not parameters:
        raise ConfigError(f"--space {path}: no setting to search (tables such as [train.lr] with type = \"float\")")
    return parameters


class PruningReporter(Tracker):
    """Reports each epoch's ``metric`` to the Optuna trial, and stops the trial (``TrialPruned``)
    where the study's pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def epoch(self, training, record: Mapping) -> None:
        if self.metric not in record:
            raise ConfigError(f"--metric {self.metric}: the epoch records have no such value (they have {', '.join(sorted(record))})")
        self.trial.report(float(record[self.metric]), int(record["epoch"]))
        if self.trial.should_prune():
            raise _optuna().TrialPruned(f"pruned after epoch {record['epoch']}: {self.metric} = {record[self.metric]:.4g}")


def best_value(records: Sequence[Mapping], metric: str, direction: str) -> float:
    """The best epoch's value of ``metric`` (non-finite values never win)."""
    values = [float(record[metric]) for record in records if metric in record and math.isfinite(float(record[metric]))]
    if not values:
        raise ConfigError(f"--metric {metric}: no finite value in the epoch records")
    return max(values) if direction == "maximize" else min(values)


@dataclass
class Search:
    """What ``pyrovae tune`` searches: ``experiment`` over ``space`` into ``out``."""

    experiment: Path
    space: list[Parameter]
    out: Path
    overrides: Sequence[str] = ()
    metric: str | None = None
    direction: str = "maximize"

    def __post_init__(self):
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"--direction {self.direction!r}: expected maximize or minimize")

    def overrides_of(self, values: Mapping[str, Any]) -> list[str]:
        by_key = {parameter.key: parameter for parameter in self.space}
        return [*self.overrides, *(by_key[key].override(value) for key, value in values.items())]

    def check(self) -> None:
        """The experiment resolves at the space's corners (each low and high, each choice): a
        mistake in one line before any trial."""
        for parameter in self.space:
            for value in parameter.choices or (parameter.low, parameter.high):
                value = int(value) if parameter.kind == "int" else value
                try:
                    resolve_config(load_experiment(self.experiment, self.overrides_of({parameter.key: value})))
                except ConfigError as error:
                    raise ConfigError(f"--space [{parameter.key}] = {_toml_value(value)}: {error}") from None

    def objective(self, progress: bool) -> Callable:
        def run_trial(trial) -> float:
            values = {parameter.key: parameter.suggest(trial) for parameter in self.space}
            experiment = Experiment.from_config(load_experiment(self.experiment, self.overrides_of(values)))
            metric = self.metric or f"valid/{getattr(experiment.objective, 'selection_metric', 'elbo')}"
            folder = self.out / f"trial_{trial.number:04d}"
            trial.set_user_attr("run_dir", str(folder))
            trial.set_user_attr("metric", metric)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("settings", json.dumps({key: _label(value) for key, value in values.items()}))
            final = experiment.train(folder, progress=progress, trackers=[PruningReporter(trial, metric)])
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
            for key, value in final.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    trial.set_user_attr(key, value)
            return best_value(records, metric, self.direction)

        return run_trial

    def best_toml(self, study) -> Path:
        """``best.toml``: the experiment (its paths made absolute) with the best trial's settings."""
        best = study.best_trial
        values = {parameter.key: _value_of(parameter, best.params[parameter.key]) for parameter in self.space}
        raw = load_experiment(self.experiment, self.overrides_of(values))
        header = (
            f"# {self.experiment} with the best of {len(study.trials)} trials of study {study.study_name!r}: trial "
            f"{best.number} ({best.user_attrs.get('run_dir', '')}), {self.direction} {best.user_attrs.get('metric', self.metric)} = {best.value:.6g}\n"
            + "".join(f"#   {parameter.override(values[parameter.key])}\n" for parameter in self.space)
        )
        path = self.out / BEST_FILE
        write_text_atomically(path, header + dump_toml(raw))
        return path


def _value_of(parameter: Parameter, stored) -> Any:
    """A stored Optuna value back as the setting's value (choices were stored as labels)."""
    if parameter.kind != "choice":
        return stored
    return parameter.choices[[_label(choice) for choice in parameter.choices].index(stored)]


def _storage(optuna, url: str, attempts: int = 8):
    """Optuna's RDB storage at ``url``, with heartbeats (a trial whose process was killed is marked
    failed by the next process to run). Processes that start together may race to create the
    tables; the loser tries again once the winner has made them."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy's many errors for a bad URL: one line
            if attempt + 1 < attempts and type(error).__name__ in ("IntegrityError", "OperationalError"):
                time.sleep(0.5 + random.random())
                continue
            raise ConfigError(f"--storage {url}: Optuna cannot open it ({type(error).__name__}: {str(error).splitlines()[0]})") from None


def tune(
    search: Search,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = None,
    progress: bool = True,
    warmup_epochs: int = 1,
    startup_trials: int = 3,
):
    """Run trials until the study holds ``trials`` complete or pruned ones; write ``best.toml`` and
    ``trials.csv``. Returns the Optuna study."""
    optuna = _optuna()
    if trials < 1:
        raise ConfigError(f"--trials {trials}: at least one trial")
    search.check()
    search.out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(search.out / STUDY_FILE).absolute()}"
    backend = _storage(optuna, url)
    study = optuna.create_study(
        storage=backend,
        study_name=study_name or search.out.name,
        direction=search.direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs),
        load_if_exists=True,
    )
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    left = trials - len(study.get_trials(deepcopy=False, states=done))
    if left > 0:
        study.optimize(
            search.objective(progress),
            n_trials=left,
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=done)],
            catch=(NonFiniteLossError,),  # a diverging setting fails its trial, not the search
            gc_after_trial=True,
        )
    if any(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials):
        search.best_toml(study)
    try:
        study.trials_dataframe().to_csv(search.out / TRIALS_FILE, index=False)
    except ImportError:  # pandas: only for the table
        pass
    return study
