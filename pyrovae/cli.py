"""Command line: ``pyrovae train | evaluate | sample | reconstruct | interpolate | analyze | compare | active-units | multilabel | sweep | tune``.

Every command of the project is here; library modules have no ``main()`` of their own. A command
opens a run folder through :class:`~pyrovae.experiment.Experiment` and calls analysis functions,
which take a pair and data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import pyrovae
from pyrovae.analysis.active_units import active_units
from pyrovae.analysis.multilabel import PROPENSITY_A, PROPENSITY_B, TAIL_FRACTION
from pyrovae.config import PORTABLE_SETTINGS, load_experiment
from pyrovae.run_folder import CONFIG_FILE
from pyrovae.errors import CheckpointError, ConfigError, DataError, FileWriteError, NonFiniteLossError, PairMismatchError
from pyrovae.experiment import Experiment
from pyrovae.traces import preserved_rng
from pyrovae.train import distributed
from pyrovae.train.distributed import DistributedJobError
from pyrovae.train.progress import stderr_is_terminal
from pyrovae.files import write_text_atomically

# Failures that are the user's to fix: one line on stderr, exit 2, no traceback.
USER_ERRORS = (ConfigError, DataError, PairMismatchError, NonFiniteLossError, CheckpointError, FileWriteError, FileNotFoundError, DistributedJobError)


def _count(low: int, meaning: str = ""):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{meaning}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value

    return parse


def _label(text: str) -> int | str:
    """``--label``: a class index, or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index (an integer) or 'all', got {text!r}") from None


def _sample(args, overrides) -> None:
    """``pyrovae sample``: sentences for text runs given ``--method`` or ``--label``; samples of the
    requested labels for ``--label``; else the samples file (prior samples and reconstructions)."""
    experiment = Experiment.from_run(args.run_dir, overrides, command="sample")
    experiment.load_parameters(args.run_dir, args.checkpoint)
    text = getattr(experiment.data, "vocabulary", None) is not None
    torch.manual_seed(args.seed)
    if args.method is not None or (text and args.label is not None):
        for line in _decoded_sentences(args, experiment):
            print(line)
    elif args.label is not None:
        print(experiment.write_label_samples(args.label, args.out, run_dir=args.run_dir, count=args.count))
    else:
        print(experiment.write_samples(args.out, run_dir=args.run_dir, count=args.count))


def _decoded_sentences(args, experiment: Experiment) -> list[str]:
    """``pyrovae sample --method``, ``reconstruct`` and ``interpolate``: sentences of a text run."""
    from pyrovae.analysis import decoding

    vocabulary, model, guide = getattr(experiment.data, "vocabulary", None), experiment.model, experiment.guide
    if vocabulary is None:
        raise ConfigError(f"{args.run_dir} is not a text run (no vocabulary): {args.command} decodes sentences")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature} is not allowed: it must be > 0")
    method = args.method or "greedy"
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    options = decoding.decoding_options(method, args.beam, args.temperature, generator)
    inputs = experiment.inputs()
    torch.manual_seed(args.seed)
    if args.command == "sample":
        y = experiment.decoding_labels(args.label, args.count)
        rows = decoding.prior_sentences(model, args.count, method, y=y, **{"generator": generator, **options})
    elif args.command == "reconstruct":
        text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
        batch = experiment.sentence_batch([line for line in text.splitlines() if line.strip()], args.label)
        rows = decoding.reconstruct(model, guide, batch, method, use_mean=not args.draw, inputs=inputs, **options)
    else:
        first, second = (experiment.sentence_batch([sentence], args.label) for sentence in args.sentences)
        rows = decoding.homotopy(model, guide, first, second, steps=args.steps, method=method, inputs=inputs, **options)
    return [decoding.sentence_text(vocabulary, ids) for ids in rows]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro model/guide pairs.")
    parser.add_argument("--version", action="version", version=f"pyrovae {pyrovae.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    device_help = "auto, cpu, cuda or cuda:N (the same as --set train.device=...)"
    portable = ", ".join(key + "*" if key.endswith(".") else key for key in PORTABLE_SETTINGS)
    portable_help = (
        f"change a setting that does not change the trained run (TOML syntax): {portable}; "
        "e.g. --set data.dir=/new/place/of/the/data"
    )

    train = commands.add_parser(
        "train",
        help="train an experiment into a run folder (config, metrics, checkpoints, final.json, curves.png, and "
        "samples.png or, for data that are not images, samples.json) and print its test metrics",
    )
    train.add_argument("experiment", help="experiment TOML file, or a run folder to continue with --resume")
    train.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (TOML syntax)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (it may raise train.epochs and change train.lr, "
        f"train.guide_lr, train.clip_norm, and {portable})",
    )
    train.add_argument("--device", help=device_help)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--nproc",
        type=_count(1),
        help="train data-parallel in N processes on this machine: starts torchrun --standalone --nproc-per-node N "
        "-m pyrovae train ... (train.batch_size stays the global batch); for several machines run torchrun yourself",
    )

    evaluate = commands.add_parser(
        "evaluate", help="print a run's test metrics as JSON: the objective's own (test_elbo, test_iwae ...) and log p(x)"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--particles", type=_count(1), help="importance samples per example, >= 1 (default: the run's evaluate.particles)"
    )
    evaluate.add_argument("--checkpoint", choices=["best", "latest"], help="which parameters (default: the run's evaluate.checkpoint)")
    evaluate.add_argument(
        "--test-examples",
        type=_count(0, " (0: all)"),
        help="use the first N test examples (0: all; default: the run's evaluate.test_examples)",
    )
    evaluate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
    evaluate.add_argument("--device", help=device_help)
    evaluate.add_argument("--no-progress", action="store_true")

    sample_help = (
        "write prior samples and reconstructions of the first test rows, on whole test batches (labels, masks, "
        "scheduled inputs at the checkpoint's step): a PNG grid for image data; for text data (a run with a "
        "vocabulary) a text file (samples.txt) of sentences from the prior, greedy and sampled, reconstructions and "
        "a homotopy between two test sentences; otherwise JSON (samples.json) with "
        "prior_samples, test_rows and reconstructions, as integer rows drawn from p(x|z) for discrete data such as "
        "tokens (cut to the rows' lengths) and as means of p(x|z) otherwise"
    )
    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument("--method", choices=["greedy", "beam", "sample"], help="how to decode sentences (text runs; default greedy)")
    decoding.add_argument("--beam", type=_count(1), default=5, help="beam size of --method beam (default 5)")
    decoding.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of --method sample (default 1)")
    decoding.add_argument("--seed", type=int, default=0, help="seed of the prior draws and sampled words (default 0)")
    decoding.add_argument("--label", type=_label, help="the label y a label-conditioned model decodes with")

    sample_help += (
        "; with --method (text runs), print --count sentences decoded from prior draws instead; with --label Y "
        "(a label-conditioned model), --count samples generated for label Y (all: one row per class): "
        "RUN_DIR/samples_label_Y.png for images, .json otherwise"
    )
    sample = commands.add_parser("sample", help=sample_help, description=sample_help, parents=[decoding])
    sample.add_argument("run_dir")
    sample.add_argument(
        "--out", help="output path (default: RUN_DIR/samples.png for images, RUN_DIR/samples.txt for text, RUN_DIR/samples.json otherwise)"
    )
    sample.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    sample.add_argument("--count", type=_count(1), default=16, help="how many prior samples and test rows (default 16)")
    sample.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
    sample.add_argument("--device", help=device_help)
    def text_command(name: str, help_text: str):
        command = commands.add_parser(name, help=help_text, description=help_text, parents=[decoding])
        command.add_argument("run_dir")
        command.add_argument("--checkpoint", choices=["best", "latest"], default="best")
        command.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
        command.add_argument("--device", help=device_help)
        return command

    reconstruct = text_command(
        "reconstruct", "text runs: print the reconstruction of each input sentence (one a line), decoded from the mean of q(z | x) or a draw"
    )
    reconstruct.add_argument("--input", required=True, help="a file of sentences, one a line, or - for standard input")
    reconstruct.add_argument("--draw", action="store_true", help="decode a draw from q(z | x) instead of its mean")
    interpolate = text_command(
        "interpolate", "text runs: print the sentences decoded along the line between the posterior means of two sentences (a homotopy)"
    )
    interpolate.add_argument("sentences", nargs=2, metavar="SENTENCE")
    interpolate.add_argument("--steps", type=_count(2), default=5, help="points on the line, both ends included (default 5)")

    analyze_help = (
        "posterior analysis of a run on its test split, written to RUN_DIR/analysis/: posterior.nc (ArviZ "
        "InferenceData), PSIS diagnostics of the guide (Pareto k-hat per point, IS and PSIS log p(x)), KL per "
        "dimension, active units, I(x; z), plots, and report.md (its path is printed)"
    )
    analyze = commands.add_parser("analyze", help=analyze_help, description=analyze_help)
    analyze.add_argument("run_dir")
    analyze.add_argument("--samples", type=_count(1), default=1000, help="importance samples per test point (default 1000; PSIS needs >= 25)")
    analyze.add_argument(
        "--points", type=_count(0), nargs="+", metavar="IDX", help="test points to summarize and plot (default: the first three)"
    )
    analyze.add_argument(
        "--test-examples",
        type=_count(0, " (0: all)"),
        help="analyse the first N test examples (0: all; default: the run's evaluate.test_examples)",
    )
    analyze.add_argument("--checkpoint", choices=["best", "latest"], help="which parameters (default: the run's evaluate.checkpoint)")
    analyze.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
    analyze.add_argument("--device", help=device_help)
    analyze.add_argument("--no-progress", action="store_true")

    compare_help = (
        "compare analysed runs on the same test points: per run the summed and mean importance-sampled log p(x) with "
        "standard errors, paired differences to the best run with their standard errors, the share of points with "
        "k-hat > 0.7; written to OUT/compare.md, compare.csv and compare.png (ArviZ's compare and plot_compare). "
        "Each run needs `pyrovae analyze RUN` first"
    )
    compare = commands.add_parser("compare", help=compare_help, description=compare_help)
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default="compare", help="folder for compare.md, compare.csv, compare.png (default: ./compare)")
    compare.set_defaults(set=[], device=None)  # reads files only: no settings, no device

    units_help = (
        "print the active units of every latent site (Burda et al. 2016: dims whose posterior mean E_q[z_d | x] "
        "varies over the test rows by more than --threshold) as JSON; exit code 1 if a variance is not finite"
    )
    units = commands.add_parser("active-units", help=units_help, description=units_help)
    units.add_argument("run_dir")
    units.add_argument("--test-examples", type=_count(0, " (0: all)"), default=2000, help="the first N test examples (0: all; default 2000)")
    units.add_argument("--samples", type=_count(1), default=20, help="guide draws per example for E_q[z | x] (default 20)")
    units.add_argument("--threshold", type=float, default=0.01, help="a dim is active when its variance exceeds this (default 0.01)")
    units.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    units.add_argument("--seed", type=int, default=0)
    units.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
    units.add_argument("--device", help=device_help)

    multilabel_help = (
        "print multi-label metrics (P@k, PSP@k, Hamming loss, tail recall) of the label_scores of trained runs "
        "on multi-hot labels, one JSON line per run"
    )
    multilabel = commands.add_parser("multilabel", help=multilabel_help, description=multilabel_help)
    multilabel.add_argument("runs", nargs="+", type=Path, help="run folders written by pyrovae train")
    multilabel.add_argument("--split", default="test", choices=("train", "valid", "test"))
    multilabel.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    multilabel.add_argument("--threshold", type=float, default=0.5, help="a label is predicted when its probability is at least this")
    multilabel.add_argument(
        "--tail-fraction", type=float, default=TAIL_FRACTION, help="the rarest fraction of labels counted as the tail"
    )
    multilabel.add_argument("--propensity-a", type=float, default=PROPENSITY_A)
    multilabel.add_argument("--propensity-b", type=float, default=PROPENSITY_B)
    multilabel.add_argument("--out", type=Path, help="also write the metrics of each run as JSON lines to this file")
    multilabel.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=portable_help)
    multilabel.add_argument("--device", help=device_help)
    _sweep_parsers(commands)
    return parser


def _sweep_parsers(commands) -> None:
    """``pyrovae sweep`` and ``pyrovae tune`` (pyrovae.sweeps, pyrovae.tuning)."""
    sweep_help = (
        "run experiments x grid x seeds, one ordinary run folder per point (OUT/<grid point>/seed<S>), --jobs at a "
        "time; run it again to skip finished points and resume interrupted ones; writes OUT/summary.md and "
        "OUT/summary.csv (mean ± std over seeds of every final.json metric)"
    )
    sweep = commands.add_parser("sweep", help=sweep_help, description=sweep_help)
    sweep.add_argument("experiments", nargs="+", metavar="EXPERIMENT", help="experiment TOML files (several: compared as a grid axis)")
    sweep.add_argument("--out", required=True, help="the sweep's folder")
    sweep.add_argument("--seeds", help="seeds such as 0-4 or 0,3,7 (default: each experiment's own seed)")
    sweep.add_argument(
        "--seed-keys", default="seed", help="the settings a seed is written to, comma-separated (default: seed; e.g. seed,data.seed)"
    )
    sweep.add_argument("--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2", help="a grid axis (TOML values)")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value of every point")
    sweep.add_argument("--device", help="auto, cpu, cuda or cuda:N for every point (the same as --set train.device=...)")
    sweep.add_argument("--jobs", type=_count(1), default=1, help="runs at a time, each in its own process (default 1)")
    sweep.add_argument("--threads", type=_count(1), default=1, help="torch threads per run on the CPU (default 1)")
    sweep.add_argument("--summary-only", action="store_true", help="only rewrite summary.md and summary.csv from the run folders")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished point still)")

    tune_help = (
        "search settings with Optuna (TPE, median pruning on each epoch's validation value): every trial an ordinary "
        "run folder OUT/trial_NNNN; the study in OUT/study.db or --storage; writes OUT/best.toml and OUT/trials.csv"
    )
    tune = commands.add_parser("tune", help=tune_help, description=tune_help)
    tune.add_argument("experiment", help="experiment TOML file")
    tune.add_argument("--space", required=True, help="search space TOML: [section.key] tables with type = float | int | choice")
    tune.add_argument("--trials", type=_count(1), required=True, help="trials in the study in all (complete or pruned), across processes")
    tune.add_argument("--out", required=True, help="the search's folder")
    tune.add_argument("--storage", help="an Optuna RDB URL shared by several processes or machines (default: sqlite:///OUT/study.db)")
    tune.add_argument("--study", help="the study's name (default: the name of --out)")
    tune.add_argument("--metric", help="the epoch record to optimize (default: valid/<the objective's selection metric>)")
    tune.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    tune.add_argument("--seed", type=int, help="the TPE sampler's seed")
    tune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value of every trial")
    tune.add_argument("--device", help="auto, cpu, cuda or cuda:N (the same as --set train.device=...)")
    tune.add_argument("--no-progress", action="store_true", help="one line per epoch instead of progress bars")


def _experiment_and_run_folder(args) -> tuple[Path, Path]:
    """``train``'s experiment file and run folder. A run folder named as the experiment
    (``pyrovae train RUN --resume``) continues from its own ``config.toml``, in itself unless
    ``--out`` says otherwise; without ``--resume`` it is refused, since a new run needs a new folder."""
    experiment = Path(args.experiment)
    if experiment.is_dir():
        if not (experiment / CONFIG_FILE).exists():
            raise ConfigError(f"{experiment} is a folder, not an experiment TOML file (nor a run folder: it has no {CONFIG_FILE})")
        if not args.resume:
            raise ConfigError(
                f"{experiment} is a run folder: continue it with `pyrovae train {experiment} --resume` (raise "
                f"train.epochs with --set), or start a new run from an experiment TOML file"
            )
        return experiment / CONFIG_FILE, Path(args.out or experiment)
    return experiment, Path(args.out or Path("runs") / experiment.stem)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    overrides = list(args.set) + ([f"train.device={args.device}"] if args.device else [])
    run_dir = None
    # Under torchrun (WORLD_SIZE > 1) rank 0 speaks for the job; the others report only their own failures.
    rank = int(os.environ.get("RANK", "0")) if distributed.launched_world_size() > 1 else 0
    try:
        if args.command == "train" and args.nproc and args.nproc > 1:
            experiment_file, run_dir = _experiment_and_run_folder(args)
            return _launch_torchrun(args, argv, overrides, experiment_file, run_dir)
        if args.command == "train":
            experiment_file, run_dir = _experiment_and_run_folder(args)
            experiment = Experiment.from_config(load_experiment(experiment_file, overrides))
            if distributed.launched_world_size() > 1:
                signal.signal(signal.SIGTERM, _stopped_by_signal)
            final = experiment.train(run_dir, resume=args.resume, progress=not args.no_progress)
            distributed.finish()
            if rank == 0:
                print(json.dumps(final, indent=2))
                print(f"run folder: {run_dir}", file=sys.stderr)
        elif args.command == "evaluate":
            experiment = Experiment.from_run(args.run_dir, overrides, command="evaluate")
            which = args.checkpoint or experiment.evaluate_config.checkpoint
            experiment.load_parameters(args.run_dir, which)
            if args.test_examples is not None:
                experiment.evaluate_config.test_examples = args.test_examples
            metrics = experiment.test_metrics(particles=args.particles, progress=not args.no_progress and stderr_is_terminal())
            metrics["checkpoint"] = which
            print(json.dumps(metrics, indent=2))
            for line in experiment.evaluation_warnings(metrics):
                print(f"pyrovae evaluate: {line}", file=sys.stderr)
        elif args.command == "sample":
            _sample(args, overrides)
        elif args.command in ("reconstruct", "interpolate"):
            experiment = Experiment.from_run(args.run_dir, overrides, command=args.command)
            experiment.load_parameters(args.run_dir, args.checkpoint)
            for line in _decoded_sentences(args, experiment):
                print(line)
        elif args.command == "analyze":
            experiment = Experiment.from_run(args.run_dir, overrides, command="analyze")
            which = args.checkpoint or experiment.evaluate_config.checkpoint
            experiment.load_parameters(args.run_dir, which)
            if args.test_examples is not None:
                experiment.evaluate_config.test_examples = args.test_examples
            analysis = experiment.analyze(
                args.run_dir, samples=args.samples, points=args.points, checkpoint=which, progress=not args.no_progress and stderr_is_terminal()
            )
            print(analysis.report)
            for line in analysis.numbers["warnings"]:
                print(f"pyrovae analyze: {line}", file=sys.stderr)
        elif args.command == "compare":
            return _compare(args)
        elif args.command == "active-units":
            return _active_units(args, overrides)
        elif args.command == "multilabel":
            return _multilabel(args, overrides)
        elif args.command == "sweep":
            return _sweep(args, overrides)
        elif args.command == "tune":
            return _tune(args, overrides)
    except USER_ERRORS as error:
        # One line: an error raised inside a Pyro trace comes back with the trace's shape table appended.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, DistributedJobError):
            print(f"pyrovae {args.command}: error: {message}{_resume_hint(args, run_dir)}", file=sys.stderr)
        elif rank == 0:  # every rank meets the same error; rank 0 says it once
            print(f"pyrovae {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\npyrovae {args.command}: interrupted{_resume_hint(args, run_dir)}", file=sys.stderr)
        return 130
    finally:
        if distributed.launched_world_size() > 1 and args.command == "train":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # leaving: a late SIGTERM just ends the process
        distributed.shutdown()
    return 0


def _compare(args) -> int:
    """``pyrovae compare RUN_A RUN_B ...``: :func:`pyrovae.analysis.compare.compare_runs`."""
    from pyrovae.analysis.compare import compare_runs  # imports ArviZ: only when comparing

    comparison = compare_runs(args.runs, args.out)
    print(comparison.markdown)
    for line in comparison.warnings:
        print(f"pyrovae compare: {line}", file=sys.stderr)
    return 0


def _active_units(args, overrides: list[str]) -> int:
    """``pyrovae active-units RUN_DIR``: the active units of every latent site on the first test rows."""
    experiment = Experiment.from_run(args.run_dir, overrides, command="active-units")
    experiment.load_parameters(args.run_dir, args.checkpoint)
    limit = args.test_examples or None
    test = experiment.data.rows("test", 0, min(limit or experiment.data.size("test"), experiment.data.size("test")))
    with preserved_rng():
        torch.manual_seed(args.seed)
        units = active_units(experiment.model, experiment.guide, test, args.threshold, args.samples, experiment.inputs())
    sites = {name: value.as_dict() for name, value in units.items()}
    report = {
        "run": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "test_examples": int(test["x"].shape[0]),
        "samples": args.samples,
        "threshold": args.threshold,
        "sites": sites,
    }
    print(json.dumps(report, indent=2))
    return 0 if all(math.isfinite(site["max_variance"]) for site in sites.values()) else 1


def _multilabel(args, overrides: list[str]) -> int:
    """``pyrovae multilabel RUN_DIR ...``: multi-label metrics of each run's ``label_scores`` on one split."""
    options = dict(
        threshold=args.threshold, tail_fraction=args.tail_fraction, propensity_a=args.propensity_a, propensity_b=args.propensity_b
    )
    records = []
    for run in args.runs:
        experiment = Experiment.from_run(run, overrides, command="multilabel")
        experiment.load_parameters(run, args.checkpoint)
        metrics = experiment.multilabel_metrics(split=args.split, **options)
        if not metrics:
            raise ConfigError(f"{run}: the data have no multi-hot labels, or neither the model nor the guide has label_scores")
        records.append({"run": str(run), "split": args.split, "checkpoint": args.checkpoint, **metrics})
        print(json.dumps(records[-1]))
    if args.out is not None:
        write_text_atomically(args.out, "".join(json.dumps(record) + "\n" for record in records))
    return 0


def _sweep(args, overrides: list[str]) -> int:
    """``pyrovae sweep``: the points not finished yet, then the summary; exit code 1 if a point failed."""
    from pyrovae.sweeps import Sweep, parse_grid, parse_seeds, run_sweep, write_summary

    sweep = Sweep(
        experiments=[Path(path) for path in args.experiments],
        out=Path(args.out),
        seeds=parse_seeds(args.seeds) if args.seeds else None,
        grid=parse_grid(args.grid),
        overrides=overrides,
        seed_keys=tuple(key.strip() for key in args.seed_keys.split(",") if key.strip()),
    )
    if args.summary_only:
        for path in write_summary(sweep):
            print(path)
        return 0
    signal.signal(signal.SIGTERM, _interrupted_by_signal)  # a kill stops the runs, which the next sweep resumes
    try:
        result = run_sweep(sweep, jobs=args.jobs, threads=args.threads, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            "\npyrovae sweep: interrupted; run the same command again: finished points are skipped and interrupted ones "
            "resume from their checkpoints",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(Path(args.out) / "summary.md")
    if result.failed:
        print(f"pyrovae sweep: {len(result.failed)} of {len(result.points)} points failed; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _tune(args, overrides: list[str]) -> int:
    """``pyrovae tune``: trials until the study holds --trials of them, then best.toml."""
    from pyrovae.tuning import BEST_FILE, Search, load_space, tune

    search = Search(Path(args.experiment), load_space(args.space), Path(args.out), overrides, args.metric, args.direction)
    study = tune(search, args.trials, storage=args.storage, study_name=args.study, seed=args.seed, progress=not args.no_progress)
    best = Path(args.out) / BEST_FILE
    if best.exists():
        print(json.dumps({"best_trial": study.best_trial.number, "value": study.best_value, "params": study.best_params, "best_toml": str(best)}, indent=2))
        return 0
    print(f"pyrovae tune: error: no trial of study {study.study_name!r} finished (all pruned or failed)", file=sys.stderr)
    return 1


def _interrupted_by_signal(signum, frame):
    raise KeyboardInterrupt


def _stopped_by_signal(signum, frame):
    raise DistributedJobError(
        f"rank {os.environ.get('RANK', '?')} was stopped by signal {signal.Signals(signum).name} "
        "(torchrun stops every process of a job when one of them fails)"
    )


def _launch_torchrun(args, argv: list[str], overrides: list[str], experiment_file: Path, run_dir: Path) -> int:
    """``pyrovae train ... --nproc N``: run the same command in N processes under torchrun on this machine."""
    from pyrovae.config import resolve_config

    if distributed.launched_world_size() > 1:
        raise ConfigError("--nproc starts torchrun, but this process already runs under torchrun (WORLD_SIZE is set); leave --nproc out")
    resolve_config(load_experiment(experiment_file, overrides))  # a mistake in the experiment: one line, here
    forwarded, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            forwarded.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "pyrovae", *forwarded]
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # the processes got the same Ctrl-C; let torchrun stop them
        code = process.wait()
        raise
    if code != 0:
        print(
            f"pyrovae train: error: the {args.nproc}-process job stopped (torchrun exit code {code}; the processes' "
            f"messages are above){_resume_hint(args, run_dir)}",
            file=sys.stderr,
        )
    return code


def _resume_hint(args, run_dir: Path | None) -> str:
    if args.command != "train" or run_dir is None or not (run_dir / "checkpoints").is_dir():
        return ""
    world = distributed.launched_world_size()
    nproc = getattr(args, "nproc", None) or (world if world > 1 else None)
    return (
        f"; {run_dir}/checkpoints/latest.pt holds the last finished epoch. Continue with: "
        f"pyrovae train {args.experiment} --out {run_dir} --resume" + (f" --nproc {nproc} (or the same torchrun command with --resume)" if nproc else "")
    )


if __name__ == "__main__":
    sys.exit(main())
