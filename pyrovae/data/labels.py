"""Semi-supervised splits: keep a few labels per class in the training split.

``labels_per_class = k > 0`` (an option of the built-in image loaders) keeps exactly k labels of
every class among the training rows, chosen with a fixed seed, and hides the rest:

- train: ``y_mask`` is True on the k x C kept rows; ``y`` of every other row is 0, so no hidden
  label reaches the model, the guide or a metric by mistake (0 rather than, say, -1, because a
  model observing ``y`` with ``obs_mask`` still evaluates the prior at every row's value);
- valid and test: ``y`` holds the true labels and ``y_mask`` is all False. Models that honour
  ``y_mask`` (M2: ``obs=y, obs_mask=y_mask``) then treat every label as unobserved there, so the
  reported ELBO and log-likelihood bound log p(x) of unlabelled data, while a classifier's
  accuracy can still be measured against ``batch["y"]``.

Every split gets a ``y_mask``, because the same model and guide are called on all of them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pyrovae.data.splits import DataSplits
from pyrovae.errors import DataError

# Added to the loader's seed, so the labelled rows do not repeat another draw made from it.
LABEL_SEED_OFFSET = 7


def keep_labels_per_class(splits: DataSplits, labels_per_class: int, seed: int) -> DataSplits:
    """Return ``splits`` with ``labels_per_class`` labels of each class kept in ``train`` (see the
    module docstring); ``labels_per_class = 0`` returns them unchanged (all labelled, no ``y_mask``)."""
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 0:
        raise DataError(f"data.labels_per_class must be an integer >= 0 (0 keeps every label), got {labels_per_class!r}")
    if labels_per_class == 0:
        return splits
    spec = splits.spec
    if "y" not in splits.train or spec.num_classes is None or spec.label_format != "integer":
        raise DataError(f"data.labels_per_class needs integer class labels 'y'; data set {spec.name!r} has none")
    y = splits.train["y"]
    generator = torch.Generator().manual_seed(seed + LABEL_SEED_OFFSET)
    kept = []
    for label in range(spec.num_classes):
        rows = (y == label).nonzero().flatten().cpu()
        if len(rows) < labels_per_class:
            raise DataError(
                f"data.labels_per_class = {labels_per_class}, but class {label} of data set {spec.name!r} has only "
                f"{len(rows)} training examples (after the validation split)"
            )
        kept.append(rows[torch.randperm(len(rows), generator=generator)[:labels_per_class]])
    y_mask = torch.zeros(len(y), dtype=torch.bool)
    y_mask[torch.cat(kept)] = True
    y_mask = y_mask.to(y.device)
    train = {**splits.train, "y": torch.where(y_mask, y, torch.zeros_like(y)), "y_mask": y_mask}

    def unobserved(tensors):
        return {**tensors, "y_mask": torch.zeros(len(tensors["y"]), dtype=torch.bool, device=tensors["y"].device)}

    return replace(splits, train=train, valid=unobserved(splits.valid), test=unobserved(splits.test))
