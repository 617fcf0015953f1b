"""The classifier check of a label-conditioned generator run (``label_cvae``, e.g. of
``experiments/conditional_fashion.toml``; also M2's p(x | y, z) of ``experiments/m2_mnist.toml``):

1. a logistic regression (scikit-learn) is trained on the run's real training images (grey levels,
   the training split without the validation rows);
2. it labels ``--per-class`` samples generated for each class, the means of p(x | z, y = c) with z
   from the prior; the accuracy is the fraction labelled with the class requested;
3. its accuracy on the real test images is printed beside it, and so is its accuracy on binary
   draws x ~ p(x | z, y = c) instead of the means;

and a grid with one row per class is written (``--grid``, default RUN_DIR/classes.png).

    python experiments/conditional_fashion_check.py RUN_DIR [--per-class N] [--grid PNG]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from pyrovae.analysis.conditional import class_grid, classifier_accuracy, generated_label_accuracy, label_classifier, label_samples
from pyrovae.data.images import CLASS_NAMES
from pyrovae.data.splits import DataSplits, check_loader_result
from pyrovae.experiment import Experiment
from pyrovae.registry import DATASETS

def grey_level_splits(experiment: Experiment) -> DataSplits:
    """The run's data loaded again with ``binarize = "none"``: the same rows in the same splits (the
    split is seeded), as grey levels, and with every training label (a semi-supervised run, such as
    M2's, hid all but ``labels_per_class`` of them; the judging classifier needs them all)."""
    table = dict(experiment.config["data"])
    name = table.pop("name")
    loader = DATASETS.resolve(name, "[data] name")
    table["binarize"] = "none"
    for hiding in ("labels_per_class", "labelled_per_batch"):
        if hiding in inspect.signature(loader).parameters:
            table[hiding] = 0
    return check_loader_result(loader(**table), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--per-class", type=int, default=100, help="samples generated per class (default 100)")
    parser.add_argument("--grid", help="PNG with one row per class (default RUN_DIR/classes.png)")
    parser.add_argument("--grid-columns", type=int, default=10, help="samples per row of the grid (default 10)")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    experiment = Experiment.from_run(args.run_dir, command="conditional_fashion_check")
    experiment.load_parameters(args.run_dir, args.checkpoint)
    model, spec = experiment.model, experiment.data.spec
    if spec.image_shape is None or spec.label_format != "integer" or not spec.num_classes:
        print(f"error: {args.run_dir} is not a run on images with integer labels (data set {spec.name!r})", file=sys.stderr)
        return 2
    grey = grey_level_splits(experiment)
    classifier = label_classifier(grey.train["x"], grey.train["y"], seed=args.seed)
    report = generated_label_accuracy(
        model, grey.train["x"], grey.train["y"], grey.test["x"], grey.test["y"], spec.num_classes,
        per_class=args.per_class, seed=args.seed, classifier=classifier, inputs=experiment.inputs(),
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        labels = torch.arange(spec.num_classes).repeat_interleave(args.per_class)
        draws = torch.bernoulli(label_samples(model, labels, spec.x_features, experiment.inputs()).clamp(0, 1))
    report["binary_draws_accuracy"] = classifier_accuracy(classifier, draws, labels)
    report["binarized_test_accuracy"] = classifier_accuracy(classifier, experiment.data.test["x"], experiment.data.test["y"])
    grid = Path(args.grid) if args.grid else Path(args.run_dir) / "classes.png"
    torch.manual_seed(args.seed)
    class_grid(model, grid, spec.num_classes, spec.image_shape, args.grid_columns, CLASS_NAMES.get(spec.name), experiment.inputs())
    report.update(run=str(args.run_dir), checkpoint=args.checkpoint, grid=str(grid))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
