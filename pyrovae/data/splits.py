"""Train/validation/test splits held as tensors on the training device, and batching by indexing.

Data sets that fit in memory are kept whole on the device; a batch is an index
into them, so there is no per-item collation and no host-to-device copy per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from pyrovae.errors import DataError
from pyrovae.pair import DataSpec

BINARIZATIONS = ("none", "dynamic", "static")

Batch = dict[str, torch.Tensor]


@dataclass
class DataSplits:
    """``train``, ``valid`` and ``test`` are dicts of tensors with the examples on dim 0
    (``x``, and optionally ``y`` ...). With ``binarize = "dynamic"`` every training
    batch is a fresh Bernoulli draw of the grey levels; the validation and test sets
    were drawn once, with a fixed seed, so evaluations are comparable."""

    spec: DataSpec
    train: Batch
    valid: Batch
    test: Batch
    binarize: str = "none"

    def split(self, name: str) -> Batch:
        try:
            return {"train": self.train, "valid": self.valid, "test": self.test}[name]
        except KeyError:
            raise ValueError(f"unknown split {name!r}; choose train, valid or test") from None

    def size(self, name: str) -> int:
        return int(self.split(name)["x"].shape[0])

    def num_batches(self, name: str, batch_size: int) -> int:
        return math.ceil(self.size(name) / batch_size)

    def to(self, device: torch.device | str) -> "DataSplits":
        def move(tensors: Batch) -> Batch:
            return {key: value.to(device) for key, value in tensors.items()}

        return replace(self, train=move(self.train), valid=move(self.valid), test=move(self.test))

    def batches(self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None) -> Iterator[Batch]:
        tensors = self.split(name)
        size = self.size(name) if limit is None else min(limit, self.size(name))
        device = tensors["x"].device
        order = torch.randperm(size, device=device) if shuffle else None
        dynamic = name == "train" and self.binarize == "dynamic"
        for start in range(0, size, batch_size):
            if order is None:
                batch = {key: value[start : min(start + batch_size, size)] for key, value in tensors.items()}
            else:
                index = order[start : start + batch_size]
                batch = {key: value.index_select(0, index) for key, value in tensors.items()}
            if dynamic:
                batch["x"] = torch.bernoulli(batch["x"])
            yield batch


def _binarize_once(x: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def make_splits(
    spec: DataSpec,
    train: Batch,
    test: Batch,
    *,
    validation: int | float,
    binarize: str,
    seed: int,
) -> DataSplits:
    """Carve a validation set off ``train`` (a fraction in (0, 1) or a count), with a fixed seed,
    and binarize: ``"static"`` draws every split once; ``"dynamic"`` draws valid/test once and
    training batches afresh."""
    if binarize not in BINARIZATIONS:
        raise DataError(f"data.binarize must be one of {', '.join(BINARIZATIONS)}, got {binarize!r}")
    count = int(train["x"].shape[0])
    valid_size = int(round(validation * count)) if isinstance(validation, float) and validation < 1 else int(validation)
    if not 0 < valid_size < count:
        raise DataError(f"data.validation must leave training examples: got {validation!r} for {count} examples")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    valid_index, train_index = order[:valid_size], order[valid_size:]
    valid = {key: value[valid_index] for key, value in train.items()}
    train = {key: value[train_index] for key, value in train.items()}
    if binarize != "none":
        for tensors in (train, valid, test):
            x = tensors["x"]
            if x.min() < 0 or x.max() > 1:
                raise DataError(f"binarization needs grey levels in [0, 1]; {spec.name} has [{float(x.min())}, {float(x.max())}]")
        valid["x"] = _binarize_once(valid["x"], seed + 1)
        test["x"] = _binarize_once(test["x"], seed + 2)
        if binarize == "static":
            train["x"] = _binarize_once(train["x"], seed + 3)
        spec = replace(spec, support="binary")
    return DataSplits(spec=spec, train=train, valid=valid, test=test, binarize=binarize)
