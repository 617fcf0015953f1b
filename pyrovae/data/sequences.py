"""Variable-length integer-token sequences (text, event streams) from python lists.

:func:`pad_sequences` turns rows of tokens into the batch contract's sequence keys, and
:func:`sequence_splits` builds a whole :class:`DataSplits` (with a ``DataSpec`` that says
``support = "categorical"``, ``variable_length = True``) for a model such as a GRU sequence VAE,
or for a text loader to return::

    splits = sequence_splits([[3, 1, 2], [4, 4]], [[1, 2]], validation=1, padding_index=0)
    splits.train["x"]        # tensor([[4, 4, 0]])   (padded to the longest row, int64)
    splits.train["lengths"]  # tensor([2])
    splits.train["mask"]     # tensor([[True, True, False]])
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Mapping, Sequence

import torch

from pyrovae.data.splits import Batch, DataSplits, make_splits
from pyrovae.errors import DataError
from pyrovae.pair import DataSpec

Rows = Sequence[Sequence[int]]


def pad_sequences(
    rows: Rows, max_length: int | None = None, padding_index: int = 0, truncate: bool = False, where: str = "rows"
) -> Batch:
    """``{"x": (N, T) int64 tokens padded with padding_index, "lengths": (N,) int64, "mask": (N, T) bool}``
    with T = ``max_length`` (default: the longest row). Empty rows, tokens that are not integers
    >= 0, and rows longer than ``max_length`` (unless ``truncate``) are errors naming the row."""
    rows = [list(row) for row in rows]
    if not rows:
        raise DataError(f"{where}: no sequences")
    for number, row in enumerate(rows):
        if not row:
            raise DataError(f"{where}: row {number} is empty; every sequence needs at least one token")
        for position, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, Integral) or token < 0:
                raise DataError(f"{where}: row {number}, position {position} holds {token!r}; tokens must be integers >= 0")
    longest = max(len(row) for row in rows)
    length = longest if max_length is None else int(max_length)
    if length < 1:
        raise DataError(f"{where}: max_length must be >= 1, got {max_length!r}")
    if longest > length and not truncate:
        number = next(n for n, row in enumerate(rows) if len(row) > length)
        raise DataError(
            f"{where}: row {number} has {len(rows[number])} tokens, more than max_length = {length} (or set truncate)"
        )
    x = torch.full((len(rows), length), int(padding_index), dtype=torch.int64)
    lengths = torch.tensor([min(len(row), length) for row in rows], dtype=torch.int64)
    for number, row in enumerate(rows):
        x[number, : lengths[number]] = torch.tensor([int(token) for token in row[:length]], dtype=torch.int64)
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    return {"x": x, "lengths": lengths, "mask": mask}


def _split(split: Rows | Mapping[str, Any], where: str, **options) -> Batch:
    """A split given as rows, or as ``{"x": rows, key: per-row values, ...}``."""
    extra: dict[str, Any] = {}
    if isinstance(split, Mapping):
        if "x" not in split:
            raise DataError(f"{where}: a split given as a dict needs the rows under 'x'; got keys {sorted(split)}")
        extra = {key: value for key, value in split.items() if key != "x"}
        split = split["x"]
    batch = pad_sequences(split, where=where, **options)
    for key, value in extra.items():
        if key in batch:
            raise DataError(f"{where}: key {key!r} is made from the rows; do not give it")
        tensor = value if torch.is_tensor(value) else torch.as_tensor(value)
        if tensor.dim() == 0 or tensor.shape[0] != batch["x"].shape[0]:
            raise DataError(
                f"{where}[{key!r}] has shape {tuple(tensor.shape)}; it needs one entry per row ({batch['x'].shape[0]})"
            )
        batch[key] = tensor
    return batch


def _longest(split) -> int:
    rows = split["x"] if isinstance(split, Mapping) else split
    return max((len(row) for row in rows), default=0)


def _largest_token(split) -> int:
    rows = split["x"] if isinstance(split, Mapping) else split
    return max((int(token) for row in rows for token in row if isinstance(token, Integral)), default=-1)


def sequence_splits(
    train: Rows | Mapping[str, Any],
    test: Rows | Mapping[str, Any],
    *,
    valid: Rows | Mapping[str, Any] | None = None,
    validation: int | float = 0.1,
    num_categories: int | None = None,
    max_length: int | None = None,
    padding_index: int = 0,
    truncate: bool = False,
    num_classes: int | None = None,
    label_format: str = "integer",
    name: str = "sequences",
    seed: int = 0,
) -> DataSplits:
    """Splits of variable-length token sequences, each padded to one length T, with ``lengths``
    and ``mask``.

    Each split is a list of integer lists, or a dict ``{"x": rows, "y": labels, ...}`` whose other
    entries (one per row) become batch keys. Without ``valid``, a ``validation`` fraction or count
    of ``train`` is held out with ``seed``. ``num_categories`` (the vocabulary size) defaults to the
    largest token + 1; ``max_length`` (T) to the longest row of any split. Give ``num_classes`` if
    the splits carry labels ``y``.
    """
    splits = {"train": train, "test": test} | ({"valid": valid} if valid is not None else {})
    if max_length is None:
        max_length = max(_longest(split) for split in splits.values())
    largest = max(_largest_token(split) for split in splits.values())
    vocabulary = largest + 1 if num_categories is None else int(num_categories)
    if vocabulary < 1 or largest >= vocabulary:
        raise DataError(f"{name}: num_categories = {num_categories} is too small for token {largest}")
    options = {"max_length": max_length, "padding_index": padding_index, "truncate": truncate}
    batches = {key: _split(split, f"{name} {key}", **options) for key, split in splits.items()}
    spec = DataSpec(
        name=name,
        x_shape=(int(max_length),),
        support="categorical",
        num_categories=vocabulary,
        num_classes=num_classes,
        label_format=label_format,
        variable_length=True,
        padding_index=padding_index,
    )
    if valid is None:
        data = make_splits(spec, batches["train"], batches["test"], validation=validation, binarize="none", seed=seed)
    else:
        data = DataSplits(spec=spec, train=batches["train"], valid=batches["valid"], test=batches["test"])
    for split in ("train", "valid", "test"):
        spec.check_batch(data.split(split))
    return data
