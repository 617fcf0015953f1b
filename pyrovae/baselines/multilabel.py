"""Multi-label baselines tuned the way the models are compared: one-vs-rest logistic regression
(scikit-learn) with its inverse regularization C chosen on the validation rows by a named criterion
of :func:`pyrovae.analysis.multilabel.multilabel_metrics` (Hamming loss by default, lower is better),
and the label frequencies (the ranking a model without features reaches).

One L2-regularized logistic regression per label, P(y_l = 1 | x) = sigmoid(w_l . x + b_l), fitted on
the training rows only, as the VAEs are."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pyrovae.analysis.multilabel import multilabel_metrics
from pyrovae.errors import ConfigError

# criterion -> whether larger is better
CRITERIA = {"hamming_loss": False, "micro_f1": True, "precision@1": True, "precision@3": True, "precision@5": True, "psp@3": True}


def one_vs_rest(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0):
    """One logistic regression per label, fitted on ``x``, ``y``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed)).fit(x, y)


def tune_one_vs_rest(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    cs: Sequence[float],
    criterion: str = "hamming_loss",
    seed: int = 0,
):
    """Fit the one-vs-rest logistic regression for every C in ``cs`` and keep the best by
    ``criterion`` on the validation rows (the first C among equals). Returns (that classifier, its C,
    one record per C with every validation metric)."""
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    if not cs:
        raise ConfigError("no C to try")
    train_labels = torch.as_tensor(y_train, dtype=torch.float64)
    records, best = [], None
    for c in cs:
        classifier = one_vs_rest(x_train, y_train, c, seed)
        scores = torch.as_tensor(classifier.predict_proba(x_valid))
        metrics = multilabel_metrics(scores, torch.as_tensor(y_valid, dtype=torch.float64), train_labels)
        records.append({"C": c, **metrics})
        score = metrics[criterion] if CRITERIA[criterion] else -metrics[criterion]
        if best is None or score > best[2]:
            best = (classifier, c, score)
    return best[0], best[1], records


def label_frequencies(train_labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Every row scored with the training frequency of each label."""
    return train_labels.double().mean(0, keepdim=True).expand(rows, -1)
