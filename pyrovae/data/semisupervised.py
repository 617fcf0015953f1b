"""Semi-supervised batching: labelled rows in every training batch.

With a few labels (``labels_per_class``, see :mod:`pyrovae.data.labels`) a shuffled batch of 100
MNIST rows holds a labelled one only every few batches, and the labelled terms of a
semi-supervised objective (M2's log p(x, y) and its classification term) see each labelled row
about once per epoch. :class:`LabelledEveryBatch` adds ``labelled_per_batch`` labelled rows to
every training batch:

- the batch is the usual shuffled slice of the whole training split (so an epoch still passes
  over every row once, and ``num_batches`` is unchanged), followed by ``labelled_per_batch``
  rows drawn from the labelled ones (``y_mask`` True) without replacement, a fresh permutation
  of them each time they run out (with k labels and 1 <= k < ``labelled_per_batch`` a batch holds
  some twice);
- dynamically binarized data draw the added rows afresh too;
- validation and test batches, and unshuffled training batches (the checks and evaluations), are
  those of :class:`~pyrovae.data.splits.DataSplits`.

The draws use torch's global RNG, which the fit loop checkpoints, so a run resumed from an epoch's
end repeats them. Data-parallel training (``shard_batches``, under torchrun) does not add the rows.

In TOML, the built-in image loaders with this option are ``pyrovae.data.semisupervised:mnist``,
``pyrovae.data.semisupervised:fashion_mnist`` and ``pyrovae.data.semisupervised:digits``; they take
the options of ``mnist`` etc. and ``labelled_per_batch``. :func:`labelled_in_every_batch` makes
such a loader from any loader that gives ``y_mask``::

    [data]
    name = "pyrovae.data.semisupervised:mnist"
    dir = "../../shared/data/mnist"
    labels_per_class = 10
    labelled_per_batch = 10
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch

from pyrovae.data import images
from pyrovae.data.splits import Batch, DataSplits
from pyrovae.errors import DataError
from pyrovae.registry import declare


@dataclass
class LabelledEveryBatch(DataSplits):
    """:class:`DataSplits` whose shuffled training batches end with ``labelled_per_batch``
    labelled rows (see the module docstring)."""

    labelled_per_batch: int = 0

    def __post_init__(self):
        k = self.labelled_per_batch
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise DataError(f"data.labelled_per_batch must be an integer >= 0, got {k!r}")
        if k and "y_mask" not in self.train:
            raise DataError(
                f"data.labelled_per_batch = {k} needs semi-supervised data (a 'y_mask' in the training split): "
                "set data.labels_per_class > 0"
            )
        if k and not bool(self.train["y_mask"].any()):
            raise DataError(f"data.labelled_per_batch = {k}, but no training row is labelled (y_mask is all False)")

    def batches(self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None, **options) -> Iterator[Batch]:
        # ``options``: whatever else DataSplits.batches takes, passed on untouched.
        if name != "train" or not shuffle or self.labelled_per_batch == 0:
            yield from super().batches(name, batch_size, shuffle=shuffle, limit=limit, **options)
            return
        labelled = self.train["y_mask"].nonzero().flatten()
        queue = labelled[:0]
        for batch in super().batches(name, batch_size, shuffle=True, limit=limit, **options):
            while len(queue) < self.labelled_per_batch:
                queue = torch.cat([queue, labelled[torch.randperm(len(labelled), device=labelled.device)]])
            index, queue = queue[: self.labelled_per_batch], queue[self.labelled_per_batch :]
            extra = {key: value.index_select(0, index) for key, value in self.train.items()}
            if self.binarize == "dynamic":
                extra["x"] = torch.bernoulli(extra["x"])
            yield {key: torch.cat([value, extra[key]]) for key, value in batch.items()}


def with_labelled_rows(splits: DataSplits, labelled_per_batch: int) -> LabelledEveryBatch:
    """``splits`` as :class:`LabelledEveryBatch` (same tensors, nothing copied)."""
    values = {f.name: getattr(splits, f.name) for f in fields(DataSplits)}
    return LabelledEveryBatch(**values, labelled_per_batch=labelled_per_batch)


def labelled_in_every_batch(loader: Callable[..., DataSplits]) -> Callable[..., LabelledEveryBatch]:
    """A loader with ``loader``'s options and ``labelled_per_batch`` (default 10), whose training
    batches each end with that many labelled rows."""

    @functools.wraps(loader)
    def load(*args, labelled_per_batch: int = 10, **options) -> LabelledEveryBatch:
        return with_labelled_rows(loader(*args, **options), labelled_per_batch)

    signature = inspect.signature(loader)
    added = inspect.Parameter("labelled_per_batch", inspect.Parameter.KEYWORD_ONLY, default=10, annotation="int")
    load.__signature__ = signature.replace(parameters=[*signature.parameters.values(), added])
    load.__annotations__ = {**loader.__annotations__, "labelled_per_batch": "int"}
    load.__doc__ = f"{loader.__doc__ or ''}\n\nEvery shuffled training batch ends with ``labelled_per_batch`` labelled rows."
    return declare("data set")(load)


mnist = labelled_in_every_batch(images.mnist)
fashion_mnist = labelled_in_every_batch(images.fashion_mnist)
digits = labelled_in_every_batch(images.digits)
