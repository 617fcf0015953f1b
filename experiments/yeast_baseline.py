"""Baselines for multi-label prediction on Yeast, on the split of the ``yeast`` loader (the same rows
and standardization as the experiments/yeast_*.toml runs):

- one-vs-rest logistic regression (scikit-learn, :mod:`pyrovae.baselines.multilabel`): one
  L2-regularized logistic regression per label, P(y_l = 1 | x) = sigmoid(w_l . x + b_l); the inverse
  regularization C is chosen among ``--cs`` by ``--criterion`` on the validation rows (Hamming loss by
  default, the criterion the VAE rows are chosen by), and the model is fitted on the training rows
  only (as the VAEs are);
- label frequencies: every gene gets the training frequency of each label as its score (the ranking a
  model without features can reach; it predicts the labels held by more than half the genes).

It prints one JSON line per baseline with the metrics of :mod:`pyrovae.analysis.multilabel` on the
test rows (P@1/3/5, PSP@1/3/5, Hamming loss, micro-F1, recall, tail recall ...).

    OMP_NUM_THREADS=1 python experiments/yeast_baseline.py [--dir ../shared/data/yeast] [--criterion hamming_loss] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pyrovae.analysis.multilabel import multilabel_metrics
from pyrovae.baselines.multilabel import CRITERIA, label_frequencies, tune_one_vs_rest
from pyrovae.data.multilabel import yeast

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "yeast"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the folder holding yeast.csv.gz")
    parser.add_argument("--seed", type=int, default=0, help="the loader's split seed (the TOMLs use 0)")
    parser.add_argument(
        "--cs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], help="inverse regularizations to try"
    )
    parser.add_argument("--criterion", default="hamming_loss", choices=sorted(CRITERIA), help="the validation metric that picks C")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    data = yeast(dir=str(args.dir), seed=args.seed)
    x = {name: data.split(name)["x"].numpy() for name in ("train", "valid", "test")}
    y = {name: data.split(name)["y"].numpy().astype(int) for name in ("train", "valid", "test")}
    train_labels = data.train["y"]

    started = time.perf_counter()
    classifier, best, validation = tune_one_vs_rest(x["train"], y["train"], x["valid"], y["valid"], args.cs, args.criterion, args.seed)
    scores = torch.as_tensor(classifier.predict_proba(x["test"]))
    seconds = time.perf_counter() - started
    records = [
        {
            "baseline": "one-vs-rest logistic regression",
            "C": best,
            "criterion": f"validation {args.criterion}",
            f"valid_{args.criterion}_by_C": {record["C"]: record[args.criterion] for record in validation},
            "seconds": round(seconds, 1),
            **multilabel_metrics(scores, data.test["y"], train_labels),
        }
    ]
    frequencies = label_frequencies(train_labels, data.test["y"].shape[0])
    records.append({"baseline": "label frequencies", **multilabel_metrics(frequencies, data.test["y"], train_labels)})
    for record in records:
        print(json.dumps(record))
    if args.out is not None:
        args.out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
