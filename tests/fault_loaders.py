"""Data loaders that return broken or bad data, for the fault-injection tests (used by import path)."""

import pyrovae
import torch

from pyrovae import DataSpec
from pyrovae.data import make_splits


def _clean(rows: int = 200, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((rows, 12), 0.3), generator=generator)
    return DataSpec("blocks", (12,), "binary"), x


@pyrovae.data_loader
def bad_row(split: str = "valid", row: int = 7, value: float = 7.0):
    """Clean binary data except one value in one row of one split."""
    spec, x = _clean()
    splits = make_splits(spec, {"x": x[:160]}, {"x": x[160:]}, validation=40, binarize="none", seed=0)
    getattr(splits, split)["x"][row, 3] = value
    return splits


@pyrovae.data_loader
def not_splits():
    return {"train": {"x": torch.zeros(3, 12)}}


@pyrovae.data_loader
def without_x():
    splits = bad_row(value=1.0)
    splits.test = {"pixels": splits.test["x"]}
    return splits
