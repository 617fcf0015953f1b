"""An experiment: a resolved config turned into data, model, guide, objective and schedule,
trained into a run folder and evaluated.

Run folder::

    config.toml        the resolved config (every default written out)
    metrics.jsonl      one record per epoch (train and validation metrics)
    checkpoints/       latest.pt and best.pt, written atomically
    vocabulary.json    text data only: the vocabulary the run was trained with
    final.json         test metrics: the objective's own (test_elbo, test_iwae, test_kl/<site> ...),
                       test_log_likelihood (+ particles), ...
    samples.png        prior samples, test images and their reconstructions (image data)
    samples.json       the same rows as numbers, for data that are not images
    samples.txt        text data: sentences from the prior, reconstructions, a homotopy
    curves.png         ELBO and KL per site by epoch

Evaluation runs the pair on whole test batches (``x`` and every other key the loader
gives) plus the scheduled inputs at the loaded checkpoint's step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from pyrovae.analysis import importance_log_likelihood, sample_grid, sample_rows, training_curves
from pyrovae.config import (
    PART_REGISTRIES,
    PORTABLE_SETTINGS,
    RESUMABLE_SETTINGS,
    EvaluateConfig,
    apply_overrides,
    dump_toml,
    is_allowed_setting,
    load_toml,
    resolve_config,
    resolve_paths,
)
from pyrovae.data.splits import DataSplits, check_loader_result
from pyrovae.errors import ConfigError, RunFolderError
from pyrovae.pair import DataSpec, Model, share_data_plate
from pyrovae.traces import preserved_rng
from pyrovae.registry import MODELS, SCHEDULES, split_folder
from pyrovae.schedules import StepSchedules
from pyrovae.train import distributed
from pyrovae.train.denormals import denormals_flushed
from pyrovae.train.progress import stderr_is_terminal
from pyrovae.train.tracking import Trackers, log_analysis, trackers_for
from pyrovae.train import (
    BEST,
    LATEST,
    TrainConfig,
    evaluate_objective,
    fit,
    load_checkpoint_or_previous,
    previous_path,
)

CONFIG_FILE = "config.toml"
FINAL_FILE = "final.json"
# Text data: the token list, so evaluate and sample map ids to the same words.
VOCABULARY_FILE = "vocabulary.json"
# Held (an OS file lock, released even when the process is killed) while a run trains.
LOCK_FILE = ".pyrovae.lock"
# Written when pyrovae makes a folder a run folder: a folder without it (or a checkpoint) that
# holds files is the user's, and is not written into.
RUN_MARKER = ".pyrovae-run"


@contextmanager
def locked_run_folder(run_dir: Path):
    """Hold ``run_dir``'s lock, or fail at once if another process holds it."""
    clash = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:
        raise RunFolderError(f"--out {run_dir}: {clash} is a file, not a folder; choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(
            f"{run_dir} is in use by another pyrovae process (it holds {run_dir / LOCK_FILE}); "
            "wait for it to finish, or train into another --out folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _holds_a_run(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return any((checkpoints / name).exists() for name in (LATEST, previous_path(LATEST)))


def _check_overrides(overrides: dict, allowed: tuple[str, ...], command: str) -> None:
    refused = sorted(key for key in _flatten(overrides) if not is_allowed_setting(key, allowed))
    if refused:
        shown = ", ".join(item + ("*" if item.endswith(".") else "") for item in allowed)
        raise ConfigError(f"--set {refused[0]} would change the trained run; {command} may change only {shown}")


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


def sequence_metrics(test: dict, mean_log_likelihood: float, mean_elbo: float | None) -> dict:
    """For variable-length data (``lengths`` or ``mask`` in the batch): the number of test tokens and
    the perplexity per token, exp(-sum_n log p(x_n) / sum_n T_n), from the importance-sampled
    log-likelihood, and its upper bound from the ELBO. T_n counts every real position (the words and
    the end-of-sentence token), as He et al. 2019 count them."""
    if "lengths" in test:
        tokens = int(test["lengths"].sum())
    elif "mask" in test:
        tokens = int(test["mask"].sum())
    else:
        return {}
    examples = int(test["x"].shape[0])
    result = {"test_tokens": tokens, "test_perplexity": math.exp(-mean_log_likelihood * examples / tokens)}
    if mean_elbo is not None:
        result["test_elbo_perplexity"] = math.exp(-mean_elbo * examples / tokens)
    return result


EXAMPLE_ROWS = 16


def describe_on_first_rows(model, data: DataSplits) -> None:
    """Trace the model once on the first validation rows (with its scheduled inputs' defaults), so
    that its latent sites, observed sites and data plate are known before a guide is built for
    it (:meth:`pyrovae.pair.Model.describe`)."""
    if not isinstance(model, Model):
        return
    # Validation rows are what the model is scored on as they are (training rows may be grey levels
    # that each batch binarizes afresh).
    split = "valid" if data.size("valid") > 0 else "train"
    example = data.rows(split, 0, min(EXAMPLE_ROWS, data.size(split)))
    defaults = getattr(model, "scheduled_inputs", {})
    model.describe({**example, **(defaults if isinstance(defaults, dict) else {})})


def _construct(section: str, table: dict, *context, registry=None, parts: dict | None = None) -> Any:
    target = (registry or PART_REGISTRIES[section]).resolve(table["name"], f"[{section}] name")
    options = _options(table)
    config_class = getattr(target, "Config", None)
    try:
        if config_class is not None:
            return target(config_class(**options), *context, **(parts or {}))
        return target(*context, **options, **(parts or {}))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"[{section}] {split_folder(table['name'])[0]!r}: {error}") from error


def build_model(table: dict, data: DataSpec) -> Any:
    """The model of a ``[model]`` table, on data ``data``. A model built on the trained model of
    another run declares ``trained_parts = {keyword: option}``: where the table sets ``option`` (a
    run folder), that run's trained model is loaded here (:func:`load_trained_model`) and given to
    the constructor as ``keyword``, so models never open run folders themselves."""
    target = MODELS.resolve(table["name"], "[model] name")
    parts = {}
    for keyword, option in getattr(target, "trained_parts", {}).items():
        if table.get(option) is not None:
            parts[keyword] = load_trained_model(table[option], data, where=f"[model] {option} = {str(table[option])!r}")
    return _construct("model", table, data, parts=parts)


def load_trained_model(run_dir: str | Path, data: DataSpec, checkpoint: str = "best", where: str | None = None) -> Any:
    """The trained model of a run folder, on the CPU: built from the ``[model]`` table its checkpoint
    records, on data ``data``, with the checkpoint's ``best`` or ``latest`` parameters (falling back,
    with a message, to the previous copy of a damaged file). ``where`` names the setting that asked
    for it in messages."""
    run_dir = Path(run_dir)
    where = where or str(run_dir)
    path = run_dir / "checkpoints" / (BEST if checkpoint == "best" else LATEST)
    if not path.exists():
        raise ConfigError(f"{where}: the folder holds no {path.name}; train that run there first")
    saved = load_checkpoint_or_previous(path, "cpu", warn=lambda message: print(message, file=sys.stderr))
    table = dict((saved.get("fingerprint") or {}).get("model") or {})
    if "name" not in table:
        raise ConfigError(f"{where}: {path} records no [model] table; it was not written by pyrovae train")
    model = build_model(table, data)
    model.load_state_dict(saved["model"])
    return model


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
        data = check_loader_result(_construct("data", config["data"]), split_folder(config["data"]["name"])[0])
        torch.manual_seed(config["seed"])
        model = build_model(config["model"], data.spec)
        describe_on_first_rows(model, data)
        guide = _construct("guide", config["guide"], data.spec, model)
        share_data_plate(model, guide)
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
    def from_run(cls, run_dir: str | Path, overrides: list[str] = (), command: str = "evaluate") -> "Experiment":
        """The experiment of a run folder, with ``--set`` overrides of settings that do not change
        the trained run (:data:`pyrovae.config.PORTABLE_SETTINGS`, e.g. ``data.dir`` for moved data)."""
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
        _check_overrides(apply_overrides({}, list(overrides)), PORTABLE_SETTINGS, command)
        raw = resolve_paths(apply_overrides(load_toml(run_dir / CONFIG_FILE), list(overrides)), Path.cwd())
        if (run_dir / VOCABULARY_FILE).exists() and raw.get("data", {}).get("vocabulary") is None:
            # The run's own vocabulary, so token ids mean what they meant in training.
            raw.setdefault("data", {})["vocabulary"] = str((run_dir / VOCABULARY_FILE).resolve())
        return cls.from_config(raw)

    def load_parameters(self, run_dir: str | Path, which: str = "best") -> dict:
        """Load the run's ``best`` or ``latest`` parameters (falling back, with a message, to the
        previous copy of a damaged checkpoint)."""
        path = Path(run_dir) / "checkpoints" / (BEST if which == "best" else LATEST)
        context = distributed.current()
        device = distributed.training_device(self.train_config.device, context)
        # Under torchrun, rank 0 reads the file and sends it to the other ranks.
        saved = distributed.on_main(
            context,
            lambda: load_checkpoint_or_previous(path, "cpu" if context.active else device, warn=lambda message: print(message, file=sys.stderr)),
            "loading parameters",
        )
        self.model.load_state_dict(saved["model"])
        self.guide.load_state_dict(saved["guide"])
        self.step = int(saved["state"]["step"])
        self.model.to(device)
        self.guide.to(device)
        self.data = self.data.to(device)
        return saved

    def train(self, run_dir: str | Path, resume: bool = False, progress: bool = True, trackers=()) -> dict:
        """Train into ``run_dir`` (locked against other processes while this one works in it) and
        write the test metrics, plots and samples. ``resume`` continues from the latest checkpoint;
        a finished or early-stopped run resumes to the same result without training further.
        ``[log]`` asks for TensorBoard and MLflow (:mod:`pyrovae.train.tracking`); ``trackers`` are
        more of them (e.g. :mod:`pyrovae.tuning`'s pruning reporter)."""
        run_dir = Path(run_dir)
        # Under torchrun every rank joins the job here; only rank 0 takes the folder and writes into it.
        context = distributed.setup(self.train_config.device)
        logged = trackers_for(self.config.get("log", {}), run_dir, self.config) if context.is_main else []
        with distributed.main_holds(context, lambda: locked_run_folder(run_dir)):
            with Trackers([*logged, *trackers], active=context.is_main) as tracking:
                return self._train_locked(run_dir, resume, progress and context.is_main, tracking)

    def _check_run_folder(self, run_dir: Path, resume: bool) -> None:
        if resume:
            self._check_same_experiment(run_dir / CONFIG_FILE)
            return
        if _holds_a_run(run_dir):
            raise RunFolderError(f"{run_dir} already holds a run; pass --resume to continue it or --out to start a new one")
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_FILE, RUN_MARKER))
        if foreign and not (run_dir / RUN_MARKER).exists():
            raise RunFolderError(
                f"--out {run_dir} holds files that are not a pyrovae run ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
            )

    def _train_locked(self, run_dir: Path, resume: bool, progress: bool, tracking: Trackers) -> dict:
        config_path = run_dir / CONFIG_FILE
        context = distributed.current()

        def prepare() -> None:
            self._check_run_folder(run_dir, resume)
            self._keep_vocabulary(run_dir, resume)
            (run_dir / RUN_MARKER).touch()
            config_path.write_text(dump_toml(self.config))

        distributed.on_main(context, prepare, "checking the run folder")
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
            trackers=tracking.trackers,
        )
        train_seconds = time.perf_counter() - started
        self.load_parameters(run_dir, self.evaluate_config.checkpoint)
        final = self.test_metrics(progress=progress and stderr_is_terminal())
        final.update(
            epochs=result.state.epoch,
            best_epoch=result.state.best_epoch,
            stopped_early=result.stopped_early,
            train_seconds_this_session=round(train_seconds, 1),
            device=str(result.device),
        )
        if context.active:
            final.update(world_size=context.world_size)
        if context.is_main:
            (run_dir / FINAL_FILE).write_text(json.dumps(final, indent=2) + "\n")
            self.plots(run_dir, result.state.history)
            tracking.finish(run_dir, final)
        return final

    def _keep_vocabulary(self, run_dir: Path, resume: bool) -> None:
        """Data with a vocabulary (text) keep it in the run folder, for ``evaluate`` and ``sample`` to
        rebuild the data with; a resume checks the data still give the same one."""
        vocabulary = getattr(self.data, "vocabulary", None)
        if vocabulary is None:
            return
        path = run_dir / VOCABULARY_FILE
        if resume and path.exists():
            if type(vocabulary).load(path) != vocabulary:
                raise ConfigError(
                    f"--resume: the vocabulary built from the data differs from the run's {path}; "
                    f"train on the same data, or pass --set data.vocabulary={path}"
                )
            return
        vocabulary.save(path)

    def _check_same_experiment(self, config_path: Path) -> None:
        if not config_path.exists():
            raise ConfigError(f"--resume: {config_path.parent} has no {CONFIG_FILE}; nothing to resume")
        saved, current = _flatten(resolve_config(load_toml(config_path))), _flatten(self.config)
        differences = sorted(
            key
            for key in set(saved) | set(current)
            if not is_allowed_setting(key, RESUMABLE_SETTINGS) and saved.get(key) != current.get(key)
        )
        if differences:
            raise ConfigError(
                f"--resume: the experiment differs from the saved run in {', '.join(differences)}; a resume may "
                f"change only {', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE_SETTINGS)}"
            )

    def test_metrics(self, particles: int | None = None, progress: bool = False) -> dict:
        """The configured objective's own metrics on the test set (unannealed), each as
        ``test_<metric>``, and the importance-sampled log-likelihood, all on whole batches with
        the scheduled inputs at the loaded step.

        The draws come from a generator seeded with the experiment's ``seed`` (the training RNG is
        left as it was), so ``final.json`` and ``pyrovae evaluate`` give the same numbers for the
        same checkpoint and settings. Subnormal floats are flushed to zero while it runs
        (``train.flush_denormal``)."""
        with denormals_flushed(self.train_config.flush_denormal):
            return self._test_metrics(particles, progress)

    def _test_metrics(self, particles: int | None, progress: bool) -> dict:
        evaluate = self.evaluate_config
        particles = evaluate.particles if particles is None else particles
        if particles < 1:
            raise ConfigError(f"particles = {particles}: importance sampling needs at least 1 particle")
        limit = evaluate.test_examples or None
        inputs = self.inputs()
        # Under torchrun each rank takes a contiguous share of the test rows (its own seed) and the
        # numbers are reduced across ranks.
        context = distributed.current()
        with preserved_rng():
            torch.manual_seed(self.config["seed"] + context.rank)
            metrics = evaluate_objective(
                self.model, self.guide, self.objective, self.data, "test", evaluate.batch_size, limit=limit, inputs=inputs, context=context
            )
            rows = self.data.size("test") if limit is None else min(limit, self.data.size("test"))
            lo, hi = distributed.shard_range(rows, context)
            test = self.data.rows("test", min(lo, rows - 1), max(hi, min(lo, rows - 1) + 1))
            log_likelihood = importance_log_likelihood(
                self.model,
                self.guide,
                test,
                particles=particles,
                inputs=inputs,
                batch_size=evaluate.batch_size,
                max_rows=evaluate.max_rows,
                progress=progress,
            )
        mean_log_likelihood, test_examples = distributed.mean_rows(context, log_likelihood, hi - lo)
        # Perplexity is per token: sequences of frames (real-valued x) have lengths but no tokens.
        tokens = self.data.spec.support == "categorical"
        sequence = sequence_metrics(self.data.rows("test", 0, rows), mean_log_likelihood, metrics.get("elbo")) if tokens else {}
        if evaluate.latent_metrics:
            sequence.update(self.latent_metrics(rows, inputs))
        from pyrovae.analysis.classification import label_metrics

        # A part with classify(**batch) -> logits or cluster(**batch) -> probabilities: accuracy against
        # y on every test row (test_accuracy, test_cluster_accuracy).
        labels = label_metrics(self.model, self.guide, self.data.test, evaluate.batch_size, inputs)
        # A part with label_scores(**batch) on multi-hot labels: P@k, PSP@k, Hamming loss, tail recall.
        labels.update(self.multilabel_metrics(inputs))
        return {
            **{f"test_{key}": value for key, value in metrics.items()},
            **{f"test_{key}": value for key, value in labels.items()},
            "test_log_likelihood": mean_log_likelihood,
            "test_nll": -mean_log_likelihood,
            **sequence,
            "particles": particles,
            "test_examples": test_examples,
            "checkpoint": evaluate.checkpoint,
            "step": self.step,
            **{f"schedule/{name}": value for name, value in inputs.items()},
        }

    def multilabel_metrics(self, inputs: dict | None = None, split: str = "test", **options) -> dict:
        """Multi-label ranking metrics (P@k, PSP@k, Hamming loss, tail recall ...) of a part's
        ``label_scores`` on every row of ``split``, with propensities and tail labels from the training
        labels; empty for other data or pairs. ``inputs``: the scheduled inputs (default: at the loaded
        step); ``options``: those of :func:`pyrovae.analysis.multilabel.pair_multilabel_metrics`
        (``ks``, ``threshold``, ``tail_fraction``, ``propensity_a``, ``propensity_b``)."""
        from pyrovae.analysis.classification import part_method

        if self.data.spec.label_format != "multi_hot" or part_method("label_scores", self.guide, self.model) is None:
            return {}
        from pyrovae.analysis.multilabel import pair_multilabel_metrics
        from pyrovae.data.sparse import is_sparse_rows

        labels = self.data.train["y"]
        train_labels = self.data.csr("train", "y") if is_sparse_rows(labels) else labels
        rows = self.data.rows(split, 0, self.data.size(split))  # rows held sparse stay so until sliced a batch at a time
        inputs = self.inputs() if inputs is None else inputs
        return pair_multilabel_metrics(self.model, self.guide, rows, train_labels, self.evaluate_config.batch_size, inputs, **options)

    def latent_metrics(self, rows: int, inputs: dict) -> dict:
        """I(x; z) and the active units of every latent site on the first ``rows`` test examples
        (``test_mutual_information``, ``test_active_units`` in total and per site)."""
        from pyrovae.analysis import active_units
        from pyrovae.analysis.latents import mutual_information

        test = self.data.rows("test", 0, rows)
        if not self.model.latent_sites:
            return {}
        batch_size = self.evaluate_config.batch_size
        information = mutual_information(self.model, self.guide, test, inputs=inputs, batch_size=batch_size, seed=self.config["seed"])
        units = active_units(self.model, self.guide, test, inputs=inputs, batch_size=batch_size)
        return {
            "test_mutual_information": information,
            "test_active_units": sum(unit.active for unit in units.values()),
            **{f"test_active_units/{name}": unit.active for name, unit in units.items()},
        }

    def write_samples(self, path: str | Path | None = None, run_dir: str | Path | None = None, count: int = 16) -> Path:
        """Prior samples and reconstructions of the first ``count`` test rows: a PNG grid for
        image data (``samples.png``), else JSON (``samples.json``; integer rows for discrete data)."""
        images = self.data.spec.image_shape is not None
        vocabulary = getattr(self.data, "vocabulary", None)
        if path is None:
            path = Path(run_dir or ".") / ("samples.png" if images else "samples.txt" if vocabulary is not None else "samples.json")
        path = Path(path)
        test = self.data.rows("test", 0, min(count, self.data.size("test")))  # on the device, also for data on disk
        if vocabulary is not None and path.suffix.lower() != ".json":
            from pyrovae.analysis.decoding import write_text_samples

            return write_text_samples(self.model, self.guide, test, vocabulary, path, count=count, inputs=self.inputs())
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

    def analyze(
        self, run_dir: str | Path, samples: int = 1000, points=None, checkpoint: str | None = None, progress: bool = True
    ):
        """Posterior analysis of the loaded parameters on the test split (its first
        ``evaluate.test_examples`` rows; 0: all) into ``RUN_DIR/analysis/``: ``posterior.nc``
        (ArviZ InferenceData), PSIS diagnostics of the guide, KL per dimension, active units,
        I(x; z), plots and ``report.md`` (see :func:`pyrovae.analysis.report.write_analysis`).
        Draws come from the experiment's seed. Returns the :class:`~pyrovae.analysis.report.Analysis`."""
        from pyrovae.analysis.report import write_analysis  # imports ArviZ: only when analysing

        run_dir = Path(run_dir)
        limit = self.evaluate_config.test_examples or None
        test = {key: value[:limit] for key, value in self.data.test.items()}
        metrics_path, final_path = run_dir / "metrics.jsonl", run_dir / FINAL_FILE
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.exists() else None
        final = json.loads(final_path.read_text()) if final_path.exists() else {}
        attrs = {
            "run_dir": str(run_dir.resolve()),
            "objective": self.config["objective"]["name"],
            "data": self.data.spec.name,
            "checkpoint": checkpoint or self.evaluate_config.checkpoint,
            "step": self.step,
        }
        analysis = write_analysis(
            self.model,
            self.guide,
            test,
            run_dir / "analysis",
            samples=samples,
            points=points,
            image_shape=self.data.spec.image_shape,
            inputs=self.inputs(),
            history=history,
            metrics=final,
            attrs=attrs,
            seed=self.config["seed"],
            batch_size=self.evaluate_config.batch_size,
            progress=progress,
        )
        log_analysis(run_dir, run_dir / "analysis")  # into the run's MLflow run, where it has one
        return analysis

    def evaluation_warnings(self, metrics: dict, rows: int = 100, samples: int = 500) -> list[str]:
        """One-line warnings about the numbers of ``pyrovae evaluate`` (:func:`pyrovae.analysis.
        diagnostics.weak_estimate_warnings`): the guide's Pareto k-hat on the first ``rows`` test
        rows with ``samples`` importance samples each (seeded; most points above 0.7: log p(x) is
        unreliable), and I(x; z) at its ceiling log N when ``metrics`` hold it."""
        from pyrovae.analysis.diagnostics import MIN_PSIS_SAMPLES, PARETO_K_BAD, importance_weights, weak_estimate_warnings
        from pyrovae.analysis.posterior import draw_posterior

        limit = min(rows, self.data.size("test"), self.evaluate_config.test_examples or rows)
        test = self.data.rows("test", 0, limit)
        count = max(MIN_PSIS_SAMPLES, min(samples, self.evaluate_config.particles))
        draws = draw_posterior(
            self.model, self.guide, test, count, inputs=self.inputs(), batch_size=self.evaluate_config.batch_size, seed=self.config["seed"]
        )
        share = float((importance_weights(draws.log_weight.double().numpy().T)["pareto_k"] > PARETO_K_BAD).mean())
        return weak_estimate_warnings(share, metrics.get("test_mutual_information"), int(metrics.get("test_examples", limit)))
