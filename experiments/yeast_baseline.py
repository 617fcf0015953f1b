"""Baselines for multi-label prediction on Yeast, on the split of the ``yeast`` loader (the same rows
and standardization as the experiments/yeast_*.toml runs):

- one-vs-rest logistic regression (scikit-learn): one L2-regularized logistic regression per label,
  P(y_l = 1 | x) = sigmoid(w_l . x + b_l); the inverse regularization C is chosen among ``--cs`` by
  the validation micro-F1, and the model is fitted on the training rows only (as the VAEs are);
- label frequencies: every gene gets the training frequency of each label as its score (the ranking a
  model without features can reach; it predicts the labels held by more than half the genes).

It prints one JSON line per baseline with the metrics of :mod:`pyrovae.analysis.multilabel` on the
test rows (P@1/3/5, PSP@1/3/5, Hamming loss, micro-F1, recall, tail recall ...).

    OMP_NUM_THREADS=1 python experiments/yeast_baseline.py [--dir ../shared/data/yeast] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from pyrovae.analysis.multilabel import micro_f1, multilabel_metrics
from pyrovae.data.multilabel import yeast

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "yeast"


def one_vs_rest(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0) -> OneVsRestClassifier:
    """One logistic regression per label, fitted on ``x``, ``y``."""
    return OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed)).fit(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the folder holding yeast.csv.gz")
    parser.add_argument("--seed", type=int, default=0, help="the loader's split seed (the TOMLs use 0)")
    parser.add_argument("--cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="inverse regularizations to try")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    data = yeast(dir=str(args.dir), seed=args.seed)
    x = {name: data.split(name)["x"].numpy() for name in ("train", "valid", "test")}
    y = {name: data.split(name)["y"].numpy().astype(int) for name in ("train", "valid", "test")}
    train_labels = data.train["y"]

    started = time.perf_counter()
    validation = {}
    for c in args.cs:
        classifier = one_vs_rest(x["train"], y["train"], c, args.seed)
        validation[c] = micro_f1(classifier.predict(x["valid"]), y["valid"])
    best = max(validation, key=validation.get)
    classifier = one_vs_rest(x["train"], y["train"], best, args.seed)
    scores = torch.as_tensor(classifier.predict_proba(x["test"]))
    seconds = time.perf_counter() - started
    records = [
        {
            "baseline": "one-vs-rest logistic regression",
            "C": best,
            "valid_micro_f1_by_C": validation,
            "seconds": round(seconds, 1),
            **multilabel_metrics(scores, data.test["y"], train_labels),
        }
    ]
    frequencies = train_labels.mean(0, keepdim=True).expand_as(data.test["y"])
    records.append({"baseline": "label frequencies", **multilabel_metrics(frequencies, data.test["y"], train_labels)})
    for record in records:
        print(json.dumps(record))
    if args.out is not None:
        args.out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
