"""Labels read off a trained pair: classification accuracy, and clustering accuracy.

Two optional methods, found on the guide first, then on the model, are read here:

- ``classify(**batch) -> logits`` (B, C): a classifier of the labels ``y`` (e.g. M2's q(y | x));
  its accuracy is the fraction of rows whose argmax equals ``batch["y"]``;
- ``cluster(**batch) -> probabilities`` (B, K): a posterior over K clusters (e.g. a Gaussian-mixture
  VAE's q(y | x)); clusters carry no label names, so its accuracy is that of the best one-to-one
  matching of clusters to labels (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``):

      accuracy = max over one-to-one maps m: clusters -> labels of (1/N) sum_n [m(k_n) = y_n],

  with k_n = argmax_k p(k | x_n). With K > C clusters, the K - C unmatched ones count as errors.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def clustering_accuracy(assignments, labels, num_clusters: int | None = None, num_classes: int | None = None) -> float:
    """Accuracy of cluster ``assignments`` (N integers) against ``labels`` (N integers) under the
    best one-to-one matching of clusters to labels (see the module docstring)."""
    assignments = np.asarray(torch.as_tensor(assignments).cpu(), dtype=np.int64).reshape(-1)
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    if assignments.shape != labels.shape:
        raise ValueError(f"clustering_accuracy: {assignments.shape[0]} assignments but {labels.shape[0]} labels")
    if assignments.size == 0:
        raise ValueError("clustering_accuracy: no rows")
    if assignments.min() < 0 or labels.min() < 0:
        raise ValueError("clustering_accuracy: assignments and labels must be integers >= 0")
    clusters = max(int(assignments.max()) + 1, num_clusters or 0)
    classes = max(int(labels.max()) + 1, num_classes or 0)
    counts = np.zeros((clusters, classes), dtype=np.int64)  # counts[k, c] = #{n: k_n = k, y_n = c}
    np.add.at(counts, (assignments, labels), 1)
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum()) / assignments.size


def part_method(name: str, *parts) -> Callable | None:
    """The optional method ``name`` of the first of ``parts`` that has it (callers pass the guide,
    then the model), or None."""
    for part in parts:
        method = getattr(part, name, None)
        if callable(method):
            return method
    return None


def _over_batches(method: Callable, data: Mapping[str, torch.Tensor], batch_size: int, inputs: Mapping | None) -> torch.Tensor:
    rows = int(data["x"].shape[0])
    outputs = []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            batch = {key: value[start : start + batch_size] for key, value in data.items()}
            outputs.append(method(**batch, **dict(inputs or {})))
    return torch.cat(outputs)


def label_metrics(
    model, guide, data: Mapping[str, torch.Tensor], batch_size: int = 100, inputs: Mapping[str, float] | None = None
) -> dict[str, float]:
    """``accuracy`` (a part has ``classify``) and ``cluster_accuracy`` (a part has ``cluster``) on
    every row of ``data`` (a batch dict with integer labels ``y``), with the parts in evaluation
    mode; empty when the data have no integer labels or no part has either method."""
    y = data.get("y")
    if not torch.is_tensor(y) or y.dim() != 1 or y.dtype.is_floating_point:
        return {}
    metrics = {}
    modules = [part for part in (model, guide) if isinstance(part, torch.nn.Module)]
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        classify = part_method("classify", guide, model)
        if classify is not None:
            predicted = _over_batches(classify, data, batch_size, inputs).argmax(-1)
            metrics["accuracy"] = float((predicted == y).double().mean())
        cluster = part_method("cluster", guide, model)
        if cluster is not None:
            probabilities = _over_batches(cluster, data, batch_size, inputs)
            metrics["cluster_accuracy"] = clustering_accuracy(
                probabilities.argmax(-1), y, num_clusters=probabilities.shape[-1]
            )
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return metrics
