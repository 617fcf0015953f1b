"""Item popularity and EASE, fitted on the training users' interaction matrix X (users x items).

Both score the items of a user row x (its folded-in items); the ranking metrics exclude the items
already in x.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse
import torch

from pyrovae.analysis.ranking import evaluate_ranking
from pyrovae.errors import ConfigError


class Popularity:
    """score_i(x) = c_i = sum_u X_ui, the number of training users with item i: the same ranking
    for every user (less the items each has seen)."""

    def __init__(self, train: scipy.sparse.spmatrix):
        self.counts = torch.from_numpy(np.asarray(train.sum(axis=0), dtype=np.float64).ravel())

    def scores(self, batch) -> torch.Tensor:
        x = batch["x"]
        return self.counts.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1)


class EASE:
    """Embarrassingly shallow autoencoder (Steck 2019): the item-item weights

        B = argmin_B ||X - X B||_F^2 + lambda ||B||_F^2   subject to diag(B) = 0

    in closed form: with G = X^T X and P = (G + lambda I)^-1,

        B = I - P diag(1 / diag(P)),   i.e. B_ij = -P_ij / P_jj (i != j), B_jj = 0;

    score(x) = x B. Solved in float64 on the host (items x items: for thousands of items)."""

    def __init__(self, train: scipy.sparse.spmatrix, l2: float):
        if not l2 > 0:
            raise ConfigError(f"EASE needs an L2 weight lambda > 0, got {l2}")
        matrix = scipy.sparse.csr_matrix(train, dtype=np.float64)
        gram = np.asarray((matrix.T @ matrix).todense())
        gram[np.diag_indices_from(gram)] += l2
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)[None, :]
        np.fill_diagonal(weights, 0.0)
        self.l2 = l2
        self.weights = torch.from_numpy(weights)

    def scores(self, batch) -> torch.Tensor:
        x = batch["x"]
        return x.double() @ self.weights.to(x.device)


def tune_ease(data, l2_grid: Sequence[float], batch_size: int = 500, split: str = "valid") -> tuple[EASE, list[dict]]:
    """Fit EASE on the training users for every lambda in ``l2_grid`` and keep the one with the best
    NDCG@100 on ``split``; returns (that model, one record per lambda with its metrics)."""
    train = data.csr("train", "x")
    records, best = [], None
    for l2 in l2_grid:
        model = EASE(train, l2)
        metrics = evaluate_ranking(model.scores, data, split, batch_size)
        records.append({"l2": l2, **metrics})
        if best is None or metrics["ndcg@100"] > best[1]:
            best = (model, metrics["ndcg@100"])
    return best[0], records
