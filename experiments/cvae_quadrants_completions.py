"""Completions of test images by a trained quadrant-completion run (``cvae`` or ``cvae_baseline``):
one row per test image with the input (hidden pixels grey), the true image and S completions, each
the mean of p(y | x, z) for a z drawn from the prior network p(z | x).

    python experiments/cvae_quadrants_completions.py RUN_DIR [--out PNG] [--samples S] [--count N]

The default --out is RUN_DIR/completions.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pyrovae.analysis import completion_grid
from pyrovae.experiment import Experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/completions.png)")
    parser.add_argument("--samples", type=int, default=6, help="completions per image (default 6)")
    parser.add_argument("--count", type=int, default=10, help="test images, the first ones (default 10)")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    experiment = Experiment.from_run(args.run_dir, command="completions")
    experiment.load_parameters(args.run_dir, args.checkpoint)
    torch.manual_seed(args.seed)
    out = Path(args.out) if args.out else Path(args.run_dir) / "completions.png"
    path = completion_grid(
        experiment.model,
        experiment.data.test,
        out,
        experiment.data.spec.image_shape,
        samples=args.samples,
        count=args.count,
        inputs=experiment.inputs(),
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
