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

import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyrovae.analysis import sample_grid, sample_rows, training_curves
from pyrovae.analysis.plots import rounded
from pyrovae.analysis.likelihood import importance_estimate
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
from pyrovae.files import check_same_folder, folder_identity, write_text_atomically
from pyrovae.memory import available_memory, gigabytes
from pyrovae.pair import DataSpec, Model, share_data_plate
from pyrovae.traces import preserved_rng
from pyrovae.registry import MODELS, SCHEDULES, split_folder
from pyrovae.run_folder import (
    CONFIG_FILE,
    FINAL_FILE,
    LOCK_FILE,
    RUN_MARKER,
    VOCABULARY_FILE,
    check_checkpoint_fingerprint,
    check_checkpoint_vocabulary,
    differences,
    flatten,
    holds_a_run,
    locked_run_folder,
    read_run_files,
    restore_run_files,
    training_now,
)
from pyrovae.schedules import StepSchedules
from pyrovae.train import distributed
from pyrovae.train.checkpoint import check_contents, load_into, read_metadata
from pyrovae.train.denormals import denormals_flushed
from pyrovae.train.devices import resolve_device
from pyrovae.train.progress import stderr_is_terminal
from pyrovae.train.tracking import Trackers, log_analysis, trackers_for
from pyrovae.train import (
    BEST,
    LATEST,
    TrainConfig,
    evaluate_objective,
    fit,
    load_checkpoint_or_previous,
)

def _check_overrides(overrides: dict, allowed: tuple[str, ...], command: str) -> None:
    refused = sorted(key for key in flatten(overrides) if not is_allowed_setting(key, allowed))
    if refused:
        shown = ", ".join(item + ("*" if item.endswith(".") else "") for item in allowed)
        raise ConfigError(f"--set {refused[0]} would change the trained run; {command} may change only {shown}")


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


# Bytes per parameter while training: float32 values, their gradients and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def check_parameter_memory(config: dict, data: DataSpec) -> None:
    """Refuse, before anything is allocated, a model and guide whose parameters cannot fit: they are
    built on the meta device (shapes only, no memory), counted, and compared with the training
    device's free memory. Parts that cannot be built that way are not checked here."""
    table = config["model"]
    if getattr(MODELS.resolve(table["name"], "[model] name"), "trained_parts", {}):
        return  # built on another run's trained model, which is loaded from disk
    try:
        with preserved_rng(), torch.device("meta"):
            model = _construct("model", table, data)
            modules = [model]
            try:
                modules.append(_construct("guide", config["guide"], data, model))
            except Exception:  # noqa: BLE001 - a guide that needs the traced model is counted as the model
                modules.append(model)
    except Exception:  # noqa: BLE001 - the real build reports its own errors
        return
    shapes = [(f"{part}.{name}", parameter.shape, parameter.numel()) for part, module in zip(("model", "guide"), modules) for name, parameter in module.named_parameters()]
    needed = sum(count for _, _, count in shapes) * TRAINING_BYTES_PER_PARAMETER
    device = resolve_device(config["train"]["device"])
    free = available_memory(device)
    if free is not None and needed > free:
        name, shape, _ = max(shapes, key=lambda item: item[2])
        raise ConfigError(
            f"the model and guide have {needed // TRAINING_BYTES_PER_PARAMETER:,} parameters: training needs about "
            f"{gigabytes(needed)} (values, gradients and Adam's two moments in float32), but {device} has "
            f"{gigabytes(free)} free; the largest is {name} {tuple(shape)}: lower model.hidden or model.latent_dim"
        )


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
    saved = check_contents(load_checkpoint_or_previous(path, "cpu", warn=lambda message: print(message, file=sys.stderr)), path)
    table = dict((saved.get("fingerprint") or {}).get("model") or {})
    if "name" not in table:
        raise ConfigError(f"{where}: {path} records no [model] table; it was not written by pyrovae train")
    model = build_model(table, data)
    load_into(model, saved["model"], path, "model")
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
    # Opened from a run folder that another process is training into (its checkpoints move on).
    opened_while_training: bool = False

    @classmethod
    def from_config(cls, raw: dict) -> "Experiment":
        config = resolve_config(raw)
        data = check_loader_result(_construct("data", config["data"]), split_folder(config["data"]["name"])[0])
        torch.manual_seed(config["seed"])
        check_parameter_memory(config, data.spec)
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
        restore_run_files(run_dir)
        if not (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
        _check_overrides(apply_overrides({}, list(overrides)), PORTABLE_SETTINGS, command)
        raw = resolve_paths(apply_overrides(load_toml(run_dir / CONFIG_FILE), list(overrides)), Path.cwd())
        if (run_dir / VOCABULARY_FILE).exists() and raw.get("data", {}).get("vocabulary") is None:
            # The run's own vocabulary, so token ids mean what they meant in training.
            raw.setdefault("data", {})["vocabulary"] = str((run_dir / VOCABULARY_FILE).resolve())
        experiment = cls.from_config(raw)
        experiment.opened_while_training = training_now(run_dir)
        return experiment

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
        check_contents(saved, path)
        what = f"{path.parent.parent}"
        check_checkpoint_fingerprint(saved, self.config, path, (*RESUMABLE_SETTINGS, *PORTABLE_SETTINGS), what)
        check_checkpoint_vocabulary(saved, getattr(self.data, "vocabulary", None), path, what)
        load_into(self.model, saved["model"], path, "model")
        load_into(self.guide, saved["guide"], path, "guide")
        self.step = int(saved["state"]["step"])
        if self.opened_while_training and context.is_main:
            print(
                f"pyrovae: note: {path.parent.parent} is training now (another process holds its lock); this reads "
                f"{path.name} as of epoch {saved['state'].get('epoch')}, which may be older than the run",
                file=sys.stderr,
            )
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
            restore_run_files(run_dir)
            self._check_same_experiment(run_dir / CONFIG_FILE)
            self._check_checkpoint_belongs(run_dir)
            return
        if holds_a_run(run_dir):
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

        def prepare() -> dict[str, str]:
            self._check_run_folder(run_dir, resume)
            self._keep_vocabulary(run_dir, resume)
            (run_dir / RUN_MARKER).touch()
            # Text loaders say which split they made (files, random or tail validation, limit).
            split_note = getattr(self.data, "split_note", "")
            write_text_atomically(config_path, (f"# data split: {split_note}\n" if split_note else "") + dump_toml(self.config))
            for note in self.setting_notes():
                print(f"pyrovae: note: {note}", file=sys.stderr)
            return read_run_files(run_dir)

        run_files = distributed.on_main(context, prepare, "checking the run folder")
        identity = folder_identity(run_dir) if context.is_main else None
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
            run_files=run_files,
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
            check_same_folder(run_dir, identity)
            write_text_atomically(run_dir / FINAL_FILE, json.dumps(final, indent=2) + "\n")
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
        if resume and not path.exists():
            print(
                f"pyrovae: note: {path} is missing and the checkpoint keeps no copy (written by an earlier pyrovae); "
                "the vocabulary built from the data is taken unchecked",
                file=sys.stderr,
            )
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
        changed = differences(resolve_config(load_toml(config_path)), self.config, RESUMABLE_SETTINGS)
        if changed:
            raise ConfigError(
                f"--resume: the experiment differs from the saved run in {', '.join(changed)}; a resume may "
                f"change only {', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE_SETTINGS)}"
            )

    def _check_checkpoint_belongs(self, run_dir: Path) -> None:
        """The checkpoint a resume continues from was written by this run (its fingerprint) on this
        vocabulary: a ``latest.pt`` copied from another run is refused by name."""
        found = read_metadata(run_dir / "checkpoints")
        if found is None:
            return  # no readable checkpoint: the resume itself says so
        path, metadata = found
        check_checkpoint_fingerprint(metadata, self.config, path, RESUMABLE_SETTINGS, "--resume")
        check_checkpoint_vocabulary(metadata, getattr(self.data, "vocabulary", None), path, "--resume")
        trained, planned = metadata.get("epoch"), self.train_config.epochs
        if isinstance(trained, int) and trained > planned:
            raise ConfigError(
                f"--resume: train.epochs = {planned}, but {path} has already trained {trained} epochs; a resume may raise "
                f"train.epochs, not lower it (give {trained} or more, or train a new run with --out)"
            )

    def setting_notes(self) -> list[str]:
        """What some accepted settings do, said before training: a batch larger than the training
        split, an empty ``hidden`` (no hidden layer)."""
        notes = []
        rows = self.data.size("train")
        if self.train_config.batch_size > rows:
            notes.append(
                f"train.batch_size = {self.train_config.batch_size} is more than the {rows} training rows: "
                f"each epoch is one batch of {rows}"
            )
        for section in ("model", "guide"):
            for key, value in self.config[section].items():
                if isinstance(value, list) and not value and "hidden" in key:
                    notes.append(f"{section}.{key} = []: no hidden layer, so that network is one linear map")
        return notes

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
        particles = evaluate.particles_for(self.data.spec) if particles is None else particles
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
            estimate = importance_estimate(
                self.model,
                self.guide,
                test,
                particles=particles,
                inputs=inputs,
                batch_size=evaluate.batch_size,
                max_rows=evaluate.max_rows,
                progress=progress,
                memory_gb=evaluate.memory_gb,
            )
        mean_log_likelihood, test_examples = distributed.mean_rows(context, estimate.log_likelihood, hi - lo)
        # Monte Carlo standard error of the mean NLL: sqrt(sum_n Var[log p^(x_n)]) / N.
        mean_variance, _ = distributed.mean_rows(context, estimate.variance, hi - lo)
        standard_error = math.sqrt(mean_variance / test_examples)
        # The test set's own sampling error of the mean (spread of log p(x_n) over the points / sqrt(N)):
        # what a comparison between runs or with a paper must allow for. Each point's estimate carries
        # its Monte Carlo variance too, which is taken out of the observed spread.
        mean_square, _ = distributed.mean_rows(context, estimate.log_likelihood.double() ** 2, hi - lo)
        spread = max(mean_square - mean_log_likelihood**2, 0.0) * test_examples / max(test_examples - 1, 1)
        test_set_error = math.sqrt(max(spread - mean_variance, 0.0) / test_examples) if test_examples > 1 else None  # no spread of one point
        # Kish's effective sample size per example, averaged: the standard error is trustworthy when it is large.
        mean_ess, _ = distributed.mean_rows(context, estimate.effective_sample_size, hi - lo)
        # Perplexity is per token: sequences of frames (real-valued x) have lengths but no tokens.
        tokens = self.data.spec.support == "categorical"
        sequence = sequence_metrics(self.data.rows("test", 0, rows), mean_log_likelihood, metrics.get("elbo")) if tokens else {}
        if getattr(self.data, "vocabulary", None) is not None and not context.active:
            from pyrovae.analysis.decoding import reconstruction_f1

            with preserved_rng():
                sequence.update(reconstruction_f1(self.model, self.guide, self.data.rows("test", 0, rows), inputs, evaluate.batch_size, self.config["seed"]))
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
            "test_nll_standard_error": standard_error,
            "test_nll_test_set_standard_error": test_set_error,
            "test_effective_sample_size": mean_ess,
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

    def sentence_batch(self, sentences: list[str], label: int | None = None) -> dict:
        """Sentences encoded as this run's data were (its vocabulary, ``data.tokenizer``,
        ``data.unk_token``, ``data.max_length``), on the model's device; ``label`` gives every
        row that label (``y``), which a label-conditioned model needs."""
        from pyrovae.data.text import encode_sentences

        vocabulary = getattr(self.data, "vocabulary", None)
        if vocabulary is None:
            raise ConfigError(f"data set {self.data.spec.name!r} has no vocabulary: only a text run reads sentences")
        options = self.config["data"]
        batch = encode_sentences(
            vocabulary, sentences, options.get("max_length", self.data.spec.x_shape[0]), options.get("tokenizer") or "regex", options.get("unk_token")
        )
        labels = self.decoding_labels(label, len(sentences))
        if labels is not None:
            batch["y"] = labels
        device = next(self.model.parameters()).device
        return {key: value.to(device) for key, value in batch.items()}

    def reads_label(self) -> bool:
        """Whether the model generates from a label y: its ``conditions_on_label`` where it says
        (sentence models, ``joint_multilabel``; ``output_vae`` models y), else whether its ``forward``
        names ``y`` (label_cvae, M2, a user's own)."""
        flag = getattr(self.model, "conditions_on_label", None)
        if flag is not None:
            return bool(flag)
        return "y" in inspect.signature(self.model.forward).parameters

    def requested_classes(self, label: int | str) -> list[int]:
        """The classes that ``--label`` asks for: ``[label]``, or every class for ``"all"``; a
        one-line error for a model that reads no label, data without labels, or a label out of range."""
        spec, name = self.data.spec, type(self.model).__name__
        if not self.reads_label():
            raise ConfigError(
                f"--label {label}: {name} does not generate from a label y (its forward takes no y, or it sets "
                "conditions_on_label = False); a model that reads batch['y'] through **batch sets conditions_on_label = True"
            )
        if not spec.num_classes:
            raise ConfigError(f"--label {label}: data set {spec.name!r} has no labels")
        if label == "all":
            return list(range(spec.num_classes))
        if not 0 <= int(label) < spec.num_classes:
            raise ConfigError(f"--label {label} is out of range: data set {spec.name!r} has labels 0..{spec.num_classes - 1}")
        return [int(label)]

    def decoding_labels(self, label: int | str | None, rows: int) -> torch.Tensor | None:
        """``rows`` copies of ``label`` on the model's device for a label-conditioned model (which
        needs one in 0..num_classes-1); None for a model that reads no label and was given none."""
        if label is None:
            if getattr(self.model, "conditions_on_label", False):
                raise ConfigError(f"{type(self.model).__name__} decodes with a label: give --label in 0..{self.data.spec.num_classes - 1}")
            return None
        classes = self.requested_classes(label)
        if len(classes) != 1:
            raise ConfigError("--label all draws images or feature rows of every class; sentences are decoded with one label")
        return torch.full((rows,), classes[0], dtype=torch.int64, device=next(self.model.parameters()).device)

    def write_label_samples(self, label: int | str, path: str | Path | None = None, run_dir: str | Path | None = None, count: int = 16) -> Path:
        """What the model generates for requested labels (``label``: a class, or ``"all"`` for each
        class): ``count`` draws of z from the prior, each shown as the mean of p(x | z, y). A PNG with
        one row per label for image data (``samples_label_<label>.png``), else JSON with the rows
        per label (``samples_label_<label>.json``); for multi-hot labels, the vector with only that label on."""
        from pyrovae.analysis.conditional import class_grid, label_samples
        from pyrovae.data.images import CLASS_NAMES

        spec, classes = self.data.spec, self.requested_classes(label)
        images = spec.image_shape is not None
        path = Path(path) if path is not None else Path(run_dir or ".") / f"samples_label_{label}{'.png' if images else '.json'}"
        if images and path.suffix.lower() != ".json":
            names = CLASS_NAMES.get(spec.name)
            options = {"class_names": names, "inputs": self.inputs(), "classes": classes, "label_format": spec.label_format}
            return class_grid(self.model, path, spec.num_classes, spec.image_shape, per_class=count, **options)
        if path.suffix.lower() == ".png":
            raise ConfigError(f"data set {spec.name!r} has no image shape to draw; write JSON instead (--out FILE.json)")
        labels = torch.tensor(classes).repeat_interleave(count)
        if spec.label_format == "multi_hot":
            labels = torch.nn.functional.one_hot(labels, spec.num_classes)
        means = label_samples(self.model, labels, spec.x_features, self.inputs()).reshape(len(classes), count, -1)
        content = {
            "about": {"data": spec.name, "step": self.step, "label_format": spec.label_format},
            "values": "means of p(x | z, y), z drawn from the prior",
            "samples": {str(c): rounded(rows.double().tolist()) for c, rows in zip(classes, means.cpu())},
        }
        write_text_atomically(path, json.dumps(content, indent=1) + "\n")
        return path

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
        size = self.data.size("test")
        test = self.data.rows("test", 0, min(self.evaluate_config.test_examples or size, size))
        # The analysis holds its points dense (posterior.nc keeps them); sparse rows (MovieLens) are made so.
        test = {key: value.to_dense() if callable(getattr(value, "to_dense", None)) and not torch.is_tensor(value) else value for key, value in test.items()}
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

    def evaluation_warnings(self, metrics: dict, rows: int = 100, samples: int = 200) -> list[str]:
        """One-line warnings about the numbers of ``pyrovae evaluate`` (:func:`pyrovae.analysis.
        diagnostics.weak_estimate_warnings`): the guide's Pareto k-hat on the first ``rows`` test
        rows with ``samples`` importance samples each (seeded; most points above 0.7: log p(x) is
        unreliable), and I(x; z) at its ceiling log N when ``metrics`` hold it."""
        from pyrovae.analysis.diagnostics import MIN_PSIS_SAMPLES, PARETO_K_BAD, importance_weights, weak_estimate_warnings
        from pyrovae.analysis.posterior import draw_posterior

        limit = min(rows, self.data.size("test"), self.evaluate_config.test_examples or rows)
        test = self.data.rows("test", 0, limit)
        count = max(MIN_PSIS_SAMPLES, min(samples, self.evaluate_config.particles_for(self.data.spec)))
        draws = draw_posterior(
            self.model, self.guide, test, count, inputs=self.inputs(), batch_size=self.evaluate_config.batch_size, seed=self.config["seed"]
        )
        share = float((importance_weights(draws.log_weight.double().numpy().T)["pareto_k"] > PARETO_K_BAD).mean())
        return weak_estimate_warnings(share, metrics.get("test_mutual_information"), int(metrics.get("test_examples", limit)))
