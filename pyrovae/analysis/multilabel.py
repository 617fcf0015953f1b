"""Multi-label prediction metrics, and the evaluation of a trained pair that scores labels.

Notation: N rows, L labels, y_nl in {0, 1} the true labels, s_nl a score (higher: more likely),
rank_k(s_n) the k labels of row n with the highest scores, yhat_nl = [s_nl >= threshold] the
predicted labels, and N_l the number of training rows holding label l (of N_train).

    P@k          = (1/N) sum_n (1/k) sum_{l in rank_k(s_n)} y_nl

    PSP@k        = (1/N) sum_n (1/k) sum_{l in rank_k(s_n)} y_nl / p_l          (Jain et al. 2016)
    p_l          = 1 / (1 + C (N_l + B)^(-A)),   C = (log N_train - 1) (B + 1)^A

    PSP@k, normalized = sum_n sum_{l in rank_k(s_n)} y_nl / p_l  /  sum_n max_{|S| = k} sum_{l in S} y_nl / p_l

    Hamming loss = (1/(N L)) sum_{n,l} [yhat_nl != y_nl]

    tail recall  = sum_n sum_{l in T} yhat_nl y_nl / sum_n sum_{l in T} y_nl     (micro over the tail T)

p_l is the propensity: the chance that a relevant label l is observed at all. Jain et al. fit
A = 0.55, B = 1.5 as a general default (0.5, 0.4 on Wikipedia-LSHTC, 0.6, 2.6 on Amazon); rare
labels get small p_l, so PSP@k rewards getting them right. The normalized PSP@k divides by the
best any ranking could score (each row's true labels ordered by 1/p_l), so it lies in [0, 1]; it is
a ratio of totals, so rows without labels add to neither side. The tail T is the rarest labels of the
training split (:func:`tail_labels`).

A pair exposes its label scores through one optional method, found on the guide first, then on the
model (as ``classify`` is for integer labels in :mod:`pyrovae.analysis.classification`):

- ``label_scores(**batch) -> (B, L)``: the probability that each label is present, in [0, 1].

:func:`pair_multilabel_metrics` reads it on every row of a split; ``pyrovae multilabel RUN_DIR``
evaluates a run folder's test split with it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from pyrovae.analysis.classification import part_method

DEFAULT_KS = (1, 3, 5)
PROPENSITY_A = 0.55
PROPENSITY_B = 1.5
TAIL_FRACTION = 0.3


def _as_tensor(values, name: str, dtype=torch.float64) -> torch.Tensor:
    if hasattr(values, "toarray"):  # scipy sparse
        values = values.toarray()
    elif torch.is_tensor(values) and values.layout != torch.strided:
        values = values.to_dense()
    tensor = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a (rows, labels) matrix, got shape {tuple(tensor.shape)}")
    return tensor.detach().to("cpu", dtype)


def _pair(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    scores, labels = _as_tensor(scores, "scores"), _as_tensor(labels, "labels")
    if scores.shape != labels.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)} but labels {tuple(labels.shape)}")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row, label = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels row {row}, label {label} holds {float(labels[row, label]):g}; multi-hot labels must be 0 or 1")
    return scores, labels


def _check_k(k: int, labels: torch.Tensor) -> None:
    if not 1 <= k <= labels.shape[1]:
        raise ValueError(f"k = {k} is not allowed: it must lie in [1, {labels.shape[1]}] (the number of labels)")


def label_counts(train_labels) -> tuple[torch.Tensor, int]:
    """(N_l for every label, N): how many training rows hold each label, and how many rows there are.
    ``train_labels`` is a dense matrix, a SciPy or torch sparse matrix, or rows sliced a batch at a time
    (:class:`pyrovae.data.sparse.SparseRows`); sparse ones are never made dense whole."""
    if hasattr(train_labels, "tocsr"):
        counts = np.asarray(train_labels.sum(0)).reshape(-1)
        return torch.as_tensor(counts, dtype=torch.float64), int(train_labels.shape[0])
    if torch.is_tensor(train_labels) and train_labels.layout != torch.strided:
        from pyrovae.data.sparse import csr_tensor, csr_view

        return label_counts(csr_view(csr_tensor(train_labels)))
    if not torch.is_tensor(train_labels) and hasattr(train_labels, "shape") and hasattr(train_labels, "__getitem__"):
        rows = int(train_labels.shape[0])
        step = max(1, (1 << 22) // max(1, int(train_labels.shape[1])))  # about 4M entries at once
        counts = sum(_as_tensor(train_labels[lo : lo + step], "train_labels").sum(0) for lo in range(0, rows, step))
        return counts, rows
    labels = _as_tensor(train_labels, "train_labels")
    return labels.sum(0), int(labels.shape[0])


def propensities_from_counts(counts, rows: int, a: float = PROPENSITY_A, b: float = PROPENSITY_B) -> torch.Tensor:
    """p_l = 1 / (1 + C (N_l + B)^(-A)), C = (log N - 1)(B + 1)^A (Jain et al. 2016), float64 (L,)."""
    if rows < 3:
        raise ValueError(f"propensities need a training split of at least 3 rows (log N > 1), got {rows}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    c = (math.log(rows) - 1.0) * (b + 1.0) ** a
    return 1.0 / (1.0 + c * (counts + b).pow(-a))


def label_propensities(train_labels, a: float = PROPENSITY_A, b: float = PROPENSITY_B) -> torch.Tensor:
    """The propensities of :func:`propensities_from_counts`, from the training labels."""
    return propensities_from_counts(*label_counts(train_labels), a=a, b=b)


def tail_from_counts(counts, fraction: float = TAIL_FRACTION, max_count: int | None = None) -> torch.Tensor:
    """Indices of the tail labels: those held by at most ``max_count`` training rows, or else the
    ``round(fraction * L)`` (at least one) rarest labels, ties broken by label index."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if max_count is not None:
        return (counts <= max_count).nonzero().reshape(-1)
    if not 0 < fraction <= 1:
        raise ValueError(f"tail fraction = {fraction!r} is not allowed: it must lie in (0, 1]")
    size = max(1, int(round(fraction * counts.shape[0])))
    # A stable sort by count keeps equal counts in label order.
    return torch.sort(torch.sort(counts, stable=True).indices[:size]).values


def tail_labels(train_labels, fraction: float = TAIL_FRACTION, max_count: int | None = None) -> torch.Tensor:
    """The tail labels of :func:`tail_from_counts`, from the training labels."""
    return tail_from_counts(label_counts(train_labels)[0], fraction, max_count)


class MultilabelTally:
    """Running sums behind every metric of the module docstring, fed a batch of rows at a time
    (:meth:`add`), so that no (N, L) matrix is ever held whole; :meth:`metrics` reads them out."""

    def __init__(self, propensities, tail, ks: Sequence[int] = DEFAULT_KS, threshold: float = 0.5):
        self.inverse_propensities = 1.0 / torch.as_tensor(propensities, dtype=torch.float64).reshape(-1)
        self.tail = torch.as_tensor(tail, dtype=torch.long).reshape(-1)
        self.ks = [k for k in ks if k <= self.inverse_propensities.shape[0]]
        self.threshold = threshold
        self.sums = {name: 0.0 for name in ("rows", "entries", "wrong", "true", "predicted", "hits", "tail_true", "tail_hits", "score")}
        self.precision = {k: 0.0 for k in self.ks}
        self.psp_gained = {k: 0.0 for k in self.ks}
        self.psp_best = {k: 0.0 for k in self.ks}

    def add(self, scores, labels) -> None:
        scores, labels = _pair(scores, labels)
        if labels.shape[1] != self.inverse_propensities.shape[0]:
            raise ValueError(f"{labels.shape[1]} labels, but {self.inverse_propensities.shape[0]} propensities")
        predictions = (scores >= self.threshold).double()
        weighted = labels * self.inverse_propensities
        order = scores.topk(max(self.ks), dim=1).indices if self.ks else None
        best = weighted.topk(max(self.ks), dim=1).values if self.ks else None
        for k in self.ks:
            top = order[:, :k]
            self.precision[k] += float(labels.gather(1, top).sum()) / k
            self.psp_gained[k] += float(weighted.gather(1, top).sum())
            self.psp_best[k] += float(best[:, :k].sum())
        hits = predictions * labels
        sums = self.sums
        sums["rows"] += labels.shape[0]
        sums["entries"] += labels.numel()
        sums["wrong"] += float((predictions != labels).sum())
        sums["true"] += float(labels.sum())
        sums["predicted"] += float(predictions.sum())
        sums["hits"] += float(hits.sum())
        sums["tail_true"] += float(labels[:, self.tail].sum())
        sums["tail_hits"] += float(hits[:, self.tail].sum())
        sums["score"] += float(scores.sum())

    def metrics(self) -> dict[str, float]:
        sums = self.sums
        if sums["rows"] == 0:
            raise ValueError("no rows were scored")
        rows = sums["rows"]
        ratio = lambda top, bottom: top / bottom if bottom > 0 else float("nan")  # noqa: E731
        metrics = {f"precision@{k}": self.precision[k] / rows for k in self.ks}
        metrics.update({f"psp@{k}": ratio(self.psp_gained[k], self.psp_best[k]) for k in self.ks})
        metrics.update({f"psp@{k}_unnormalized": self.psp_gained[k] / (k * rows) for k in self.ks})
        f1_denominator = 2 * sums["hits"] + sums["wrong"]  # 2 TP + FP + FN
        metrics.update(
            hamming_loss=sums["wrong"] / sums["entries"],
            micro_f1=2 * sums["hits"] / f1_denominator if f1_denominator > 0 else 1.0,
            recall=ratio(sums["hits"], sums["true"]),
            tail_recall=ratio(sums["tail_hits"], sums["tail_true"]),
            tail_labels=float(self.tail.numel()),
            predicted_labels_per_row=sums["predicted"] / rows,
            true_labels_per_row=sums["true"] / rows,
            mean_score=sums["score"] / sums["entries"],
        )
        return metrics


def precision_at_k(scores, labels, k: int) -> float:
    """P@k: the mean over rows of the fraction of the k best-scored labels that are true."""
    scores, labels = _pair(scores, labels)
    _check_k(k, labels)
    return float(labels.gather(1, scores.topk(k, dim=1).indices).sum(1).div(k).mean())


def psp_at_k(scores, labels, propensities, k: int, normalized: bool = True) -> float:
    """Propensity-scored precision@k: the module docstring's PSP@k, or (``normalized``) its ratio to
    the best score any ranking could reach on these labels (0 when no row has a label)."""
    scores, labels = _pair(scores, labels)
    inverse = 1.0 / torch.as_tensor(propensities, dtype=torch.float64).reshape(-1)
    if inverse.shape[0] != labels.shape[1]:
        raise ValueError(f"{inverse.shape[0]} propensities for {labels.shape[1]} labels")
    _check_k(k, labels)
    weighted = labels * inverse
    gained = weighted.gather(1, scores.topk(k, dim=1).indices).sum(1)
    if not normalized:
        return float(gained.div(k).mean())
    best = float(weighted.topk(k, dim=1).values.sum())
    return float(gained.sum()) / best if best > 0 else 0.0


def hamming_loss(predictions, labels) -> float:
    """The fraction of (row, label) entries where the 0/1 prediction differs from the truth."""
    predictions, labels = _pair(predictions, labels)
    return float((predictions != labels).double().mean())


def label_recall(predictions, labels, subset=None) -> float:
    """Micro-averaged recall sum yhat y / sum y, over the labels in ``subset`` (all when None);
    NaN when those labels are never true."""
    predictions, labels = _pair(predictions, labels)
    if subset is not None:
        index = torch.as_tensor(subset, dtype=torch.long)
        predictions, labels = predictions[:, index], labels[:, index]
    true = float(labels.sum())
    return float((predictions * labels).sum()) / true if true > 0 else float("nan")


def tail_recall(predictions, labels, tail) -> float:
    """Recall on the tail labels ``tail`` (indices), micro-averaged over their true entries."""
    return label_recall(predictions, labels, tail)


def micro_f1(predictions, labels) -> float:
    """2 TP / (2 TP + FP + FN) over every (row, label) entry."""
    predictions, labels = _pair(predictions, labels)
    true_positives = float((predictions * labels).sum())
    denominator = 2 * true_positives + float((predictions != labels).sum())
    return 2 * true_positives / denominator if denominator > 0 else 1.0


def multilabel_metrics(
    scores,
    labels,
    train_labels,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = 0.5,
    tail_fraction: float = TAIL_FRACTION,
    propensity_a: float = PROPENSITY_A,
    propensity_b: float = PROPENSITY_B,
) -> dict[str, float]:
    """Every metric of the module docstring for ``scores`` (label probabilities) against ``labels``,
    with propensities and the tail from ``train_labels``, as :class:`MultilabelTally` reads them:
    ``precision@k``, ``psp@k`` (normalized) and ``psp@k_unnormalized``, ``hamming_loss``,
    ``micro_f1``, ``recall``, ``tail_recall``; and what shows a predictor that says "no" to
    everything: the mean number of predicted and of true labels per row, and the mean score.
    ``ks`` larger than the number of labels are left out."""
    tally = _tally(train_labels, ks, threshold, tail_fraction, propensity_a, propensity_b)
    tally.add(scores, labels)
    return tally.metrics()


def _tally(train_labels, ks, threshold, tail_fraction, propensity_a, propensity_b) -> MultilabelTally:
    counts, rows = label_counts(train_labels)
    propensities = propensities_from_counts(counts, rows, propensity_a, propensity_b)
    return MultilabelTally(propensities, tail_from_counts(counts, tail_fraction), ks, threshold)


def _score_batches(model, guide, data: Mapping, batch_size: int, inputs: Mapping | None):
    """(batch, label_scores of the batch) for every batch of ``data``, in evaluation mode and
    without gradients; nothing when neither part has ``label_scores``."""
    method = part_method("label_scores", guide, model)
    if method is None:
        return
    modules = [part for part in (model, guide) if isinstance(part, torch.nn.Module)]
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    rows = int(data["x"].shape[0])
    try:
        with torch.no_grad():
            for start in range(0, rows, batch_size):
                # Slicing also makes rows held sparse (SparseRows) dense, one batch at a time.
                batch = {key: value[start : start + batch_size] for key, value in data.items()}
                yield batch, method(**batch, **dict(inputs or {}))
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def pair_label_scores(model, guide, data: Mapping[str, torch.Tensor], batch_size: int = 100, inputs: Mapping | None = None):
    """``label_scores`` of the guide (else the model) on every row of ``data``, in evaluation mode
    and without gradients, as one (N, L) tensor on the host; None when neither part has the method."""
    scores = [batch_scores.cpu() for _, batch_scores in _score_batches(model, guide, data, batch_size, inputs)]
    return torch.cat(scores) if scores else None


def pair_multilabel_metrics(
    model,
    guide,
    data: Mapping[str, torch.Tensor],
    train_labels,
    batch_size: int = 100,
    inputs: Mapping | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = 0.5,
    tail_fraction: float = TAIL_FRACTION,
    propensity_a: float = PROPENSITY_A,
    propensity_b: float = PROPENSITY_B,
) -> dict[str, float]:
    """:func:`multilabel_metrics` of a pair's ``label_scores`` on every row of ``data`` (a batch dict
    with multi-hot ``y``), a batch at a time; empty when the labels are not multi-hot or no part
    scores labels. Shaped like :func:`pyrovae.analysis.classification.label_metrics`, so a
    test-metrics hook can call both."""
    y = data.get("y")
    if y is None or len(getattr(y, "shape", ())) != 2:
        return {}
    tally = None
    for batch, scores in _score_batches(model, guide, data, batch_size, inputs):
        if tally is None:
            tally = _tally(train_labels, ks, threshold, tail_fraction, propensity_a, propensity_b)
        tally.add(scores, batch["y"])
    return {} if tally is None else tally.metrics()
