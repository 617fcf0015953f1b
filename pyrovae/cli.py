"""Command line: ``pyrovae train | evaluate | sample``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyrovae.config import apply_overrides, load_toml
from pyrovae.errors import ConfigError, DataError, NonFiniteLossError, PairMismatchError, UnsupportedPairError
from pyrovae.experiment import Experiment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro model/guide pairs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train an experiment into a run folder (config, metrics, checkpoints, final.json, curves.png, and "
        "samples.png or, for data that are not images, samples.json) and print its test metrics",
    )
    train.add_argument("experiment", help="experiment TOML file")
    train.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (TOML syntax)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
        "evaluate", help="print a run's test metrics as JSON: the objective's own (test_elbo, test_iwae ...) and log p(x)"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--particles", type=int, help="importance samples per example (default: the run's evaluate.particles)")
    evaluate.add_argument("--checkpoint", choices=["best", "latest"], help="which parameters (default: the run's evaluate.checkpoint)")
    evaluate.add_argument("--test-examples", type=int, help="use the first N test examples (0: all; default: the run's evaluate.test_examples)")
    evaluate.add_argument("--no-progress", action="store_true")

    sample_help = (
        "write prior samples and reconstructions of the first test rows, on whole test batches (labels, masks, "
        "scheduled inputs at the checkpoint's step): a PNG grid for image data; otherwise JSON (samples.json) with "
        "prior_samples, test_rows and reconstructions, as integer rows drawn from p(x|z) for discrete data such as "
        "tokens (cut to the rows' lengths) and as means of p(x|z) otherwise"
    )
    sample = commands.add_parser("sample", help=sample_help, description=sample_help)
    sample.add_argument("run_dir")
    sample.add_argument("--out", help="output path (default: RUN_DIR/samples.png for images, RUN_DIR/samples.json otherwise)")
    sample.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    sample.add_argument("--count", type=int, default=16, help="how many prior samples and test rows (default 16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            raw = apply_overrides(load_toml(args.experiment), args.set)
            run_dir = Path(args.out or Path("runs") / Path(args.experiment).stem)
            final = Experiment.from_config(raw).train(run_dir, resume=args.resume, progress=not args.no_progress)
            print(json.dumps(final, indent=2))
            print(f"run folder: {run_dir}", file=sys.stderr)
        elif args.command == "evaluate":
            experiment = Experiment.from_run(args.run_dir)
            which = args.checkpoint or experiment.evaluate_config.checkpoint
            experiment.load_parameters(args.run_dir, which)
            if args.test_examples is not None:
                experiment.evaluate_config.test_examples = args.test_examples
            metrics = experiment.test_metrics(particles=args.particles, progress=not args.no_progress)
            metrics["checkpoint"] = which
            print(json.dumps(metrics, indent=2))
        elif args.command == "sample":
            experiment = Experiment.from_run(args.run_dir)
            experiment.load_parameters(args.run_dir, args.checkpoint)
            print(experiment.write_samples(args.out, run_dir=args.run_dir, count=args.count))
    except (ConfigError, UnsupportedPairError, DataError, PairMismatchError, NonFiniteLossError, FileNotFoundError) as error:
        # One line: an error raised inside a Pyro trace comes back with the trace's shape table appended.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"pyrovae {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
