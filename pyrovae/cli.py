"""Command line: ``pyrovae train | evaluate | sample``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyrovae.config import apply_overrides, load_toml
from pyrovae.errors import ConfigError, DataError, NonFiniteLossError, PairMismatchError
from pyrovae.experiment import Experiment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro model/guide pairs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an experiment into a run folder and print its test metrics")
    train.add_argument("experiment", help="experiment TOML file")
    train.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (TOML syntax)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="print a run's test metrics as JSON")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--particles", type=int, help="importance samples per example (default: the run's evaluate.particles)")
    evaluate.add_argument("--checkpoint", choices=["best", "latest"], help="which parameters (default: the run's evaluate.checkpoint)")
    evaluate.add_argument("--test-examples", type=int, help="use the first N test examples (0: all; default: the run's evaluate.test_examples)")
    evaluate.add_argument("--no-progress", action="store_true")

    sample = commands.add_parser("sample", help="write a PNG grid of prior samples and reconstructions")
    sample.add_argument("run_dir")
    sample.add_argument("--out", help="PNG path (default: RUN_DIR/samples.png)")
    sample.add_argument("--checkpoint", choices=["best", "latest"], default="best")
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
            if experiment.data.spec.image_shape is None:
                raise ConfigError(f"data set {experiment.data.spec.name!r} has no image shape to draw")
            from pyrovae.analysis import sample_grid

            path = Path(args.out or Path(args.run_dir) / "samples.png")
            sample_grid(experiment.model, experiment.guide, experiment.data.test["x"], path, experiment.data.spec.image_shape)
            print(path)
    except (ConfigError, DataError, PairMismatchError, NonFiniteLossError, FileNotFoundError) as error:
        print(f"pyrovae {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
