"""Tail-label augmentation on Yeast with the label-conditioned generator (``label_cvae``, e.g. a run of
``experiments/yeast_label_cvae.toml``): does adding generated feature vectors for rare labels raise a
downstream classifier's recall on them?

1. The tail: the rarest ``--tail-fraction`` of the 14 labels by training frequency
   (:func:`pyrovae.analysis.multilabel.tail_labels`; 4 labels, Class9, 10, 11 and 14).
2. Every training gene holding a tail label is a seed row: ``--per-row`` feature vectors are generated
   for its whole label set y (so tail labels keep the labels they co-occur with), with z ~ N(0, I) and
   x ~ p(x | z, y) (a draw of the Gaussian decoder; ``means`` takes its mean instead).
3. The downstream classifier is one-vs-rest logistic regression (scikit-learn, C = ``--c``, the value
   ``experiments/yeast_baseline.py`` chooses on validation), trained on:
   - ``real``: the training rows only;
   - ``oversampled``: plus ``--per-row`` copies of each seed row (the control: as many added rows,
     no generator);
   - ``generated``: plus the generated draws (one run per ``--seeds`` seed);
   - ``generated means``: plus the decoder's means.
4. On the test rows: tail recall, tail precision and F1 (over the tail labels' entries), the recall
   of each tail label, and the metrics of :mod:`pyrovae.analysis.multilabel`.

It also reports whether the generated rows carry their tail labels: the recall, on them, of the
classifier trained on real rows, beside its recall on the real seed rows.

    OMP_NUM_THREADS=1 python experiments/yeast_tail_augmentation.py RUN_DIR [--per-row 5] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pyro import poutine

from pyrovae.analysis.multilabel import multilabel_metrics, tail_labels
from pyrovae.baselines.multilabel import one_vs_rest
from pyrovae.experiment import Experiment
from pyrovae.models.cvae import LabelConditionedVAE



def generate(model: LabelConditionedVAE, labels: torch.Tensor, means: bool) -> torch.Tensor:
    """One feature vector per multi-hot row of ``labels``: z from the prior, then the mean or a draw of
    p(x | z, y), read off the model's own trace (``x`` is a placeholder the prior path never reads)."""
    batch = {"x": torch.zeros(labels.shape[0], model.data.x_features), "y": labels}
    model.eval()
    with torch.no_grad():
        fn = poutine.trace(model).get_trace(**batch).nodes["x"]["fn"]
        return fn.mean if means else fn.sample()


def tail_scores(predictions: np.ndarray, labels: np.ndarray, tail: np.ndarray) -> dict:
    """Precision, recall and F1 over the tail labels' entries, and each tail label's recall."""
    hits = float((predictions[:, tail] * labels[:, tail]).sum())
    predicted, true = float(predictions[:, tail].sum()), float(labels[:, tail].sum())
    precision = hits / predicted if predicted else 0.0
    recall = hits / true if true else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    per_label = {
        f"recall/Class{int(label) + 1}": float((predictions[:, label] * labels[:, label]).sum() / max(labels[:, label].sum(), 1))
        for label in tail
    }
    return {"tail_precision": precision, "tail_recall": recall, "tail_f1": f1, **per_label}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a trained label_cvae run on Yeast")
    parser.add_argument("--per-row", type=int, default=5, help="generated rows per training gene holding a tail label")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generation seeds")
    parser.add_argument("--c", type=float, default=0.1, help="inverse regularization of the logistic regressions")
    parser.add_argument("--tail-fraction", type=float, default=0.3)
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)

    experiment = Experiment.from_run(args.run_dir, command="yeast_tail_augmentation")
    experiment.load_parameters(args.run_dir, args.checkpoint)
    model, data = experiment.model, experiment.data.to("cpu")
    model.to("cpu")
    if not isinstance(model, LabelConditionedVAE) or data.spec.label_format != "multi_hot":
        print(f"error: {args.run_dir} is not a label_cvae run on multi-hot labels", file=sys.stderr)
        return 2
    train_x, train_y = data.train["x"].numpy(), data.train["y"].numpy().astype(int)
    test_x, test_y = data.test["x"].numpy(), data.test["y"].numpy().astype(int)
    tail = tail_labels(data.train["y"], args.tail_fraction).numpy()
    seeds = np.flatnonzero(train_y[:, tail].any(1))
    seed_labels = torch.as_tensor(train_y[seeds], dtype=torch.float32).repeat_interleave(args.per_row, 0)
    print(
        f"tail labels {[f'Class{t + 1}' for t in tail]} (training counts {train_y[:, tail].sum(0).tolist()}); "
        f"{len(seeds)} seed rows, {len(seed_labels)} rows added per augmented training set",
        file=sys.stderr,
    )

    def evaluate(name: str, extra_x: np.ndarray | None = None, extra_y: np.ndarray | None = None, **about) -> tuple[dict, object]:
        x = train_x if extra_x is None else np.vstack([train_x, extra_x])
        y = train_y if extra_y is None else np.vstack([train_y, extra_y])
        classifier = one_vs_rest(x, y, args.c)
        scores = classifier.predict_proba(test_x)
        predictions = (scores >= 0.5).astype(int)
        metrics = multilabel_metrics(torch.as_tensor(scores), torch.as_tensor(test_y), data.train["y"], tail_fraction=args.tail_fraction)
        metrics.update(tail_scores(predictions, test_y, tail))
        return {"training set": name, "rows": len(x), **about, **metrics}, classifier

    records = []
    record, real_classifier = evaluate("real")
    records.append(record)
    copies = np.repeat(seeds, args.per_row)
    records.append(evaluate("oversampled", train_x[copies], train_y[copies])[0])
    real_seed_recall = tail_scores(real_classifier.predict(train_x[seeds]), train_y[seeds], tail)["tail_recall"]
    for seed in args.seeds:
        torch.manual_seed(seed)
        generated = generate(model, seed_labels, means=False).numpy()
        # Do the generated rows carry their tail labels? The real-data classifier's tail recall on them.
        carried = tail_scores(real_classifier.predict(generated), seed_labels.numpy().astype(int), tail)["tail_recall"]
        records.append(
            evaluate(
                "generated", generated, seed_labels.numpy().astype(int), seed=seed,
                real_classifier_tail_recall_on_added=carried, real_classifier_tail_recall_on_seed_rows=real_seed_recall,
            )[0]
        )
    torch.manual_seed(args.seeds[0])
    means = generate(model, seed_labels, means=True).numpy()
    carried = tail_scores(real_classifier.predict(means), seed_labels.numpy().astype(int), tail)["tail_recall"]
    records.append(evaluate("generated means", means, seed_labels.numpy().astype(int), real_classifier_tail_recall_on_added=carried)[0])

    for record in records:
        print(json.dumps(record))
    if args.out is not None:
        args.out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
