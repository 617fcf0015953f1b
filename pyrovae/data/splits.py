"""Train/validation/test splits held as tensors on the training device, and batching by indexing.

Data sets that fit in memory are kept whole on the device; a batch is an index
into them, so there is no per-item collation and no host-to-device copy per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from numbers import Real

from pyrovae.errors import ConfigError, DataError
from pyrovae.pair import DataSpec, first_offender
from pyrovae.traces import preserved_rng

BINARIZATIONS = ("none", "dynamic", "static")
SPLITS = ("train", "valid", "test")

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

    @property
    def device(self) -> torch.device:
        """Where batches are delivered."""
        return self.train["x"].device

    def batches(
        self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None, *, start: int = 0
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows of a split, in order or (``shuffle``) in the order of one
        ``torch.randperm`` from the global RNG; rows ``[start, limit)`` when given."""
        tensors = self.split(name)
        size = self.size(name) if limit is None else min(limit, self.size(name))
        device = tensors["x"].device
        order = torch.randperm(size, device=device) if shuffle else None
        dynamic = name == "train" and self.binarize == "dynamic"
        for begin in range(start, size, batch_size):
            if order is None:
                batch = {key: value[begin : min(begin + batch_size, size)] for key, value in tensors.items()}
            else:
                index = order[begin : begin + batch_size]
                batch = {key: value.index_select(0, index) for key, value in tensors.items()}
            if dynamic:
                batch["x"] = torch.bernoulli(batch["x"])
            yield batch

    def random_batch(self, name: str, batch_size: int) -> Batch:
        """``batch_size`` distinct rows of a split drawn at random (global RNG), as a training batch
        (dynamically binarized where the split is): the fresh batches of aggressive guide updates."""
        size = self.size(name)
        index = torch.randperm(size, device=self.device)[: min(batch_size, size)]
        batch = self.take(name, index)
        if name == "train" and self.binarize == "dynamic":
            batch["x"] = torch.bernoulli(batch["x"])
        return batch

    def take(self, name: str, index: torch.Tensor) -> Batch:
        """The rows ``index`` (a 1-d integer tensor on :attr:`device`) of a split, on the device."""
        return {key: value.index_select(0, index) for key, value in self.split(name).items()}

    def rows(self, name: str, lo: int, hi: int) -> Batch:
        """Rows ``[lo, hi)`` of a split, as one batch on the device (no binarization)."""
        return {key: value[lo:hi] for key, value in self.split(name).items()}

    def shard_batches(
        self, name: str, batch_size: int, order: torch.Tensor, rank: int, world_size: int
    ) -> Iterator[tuple[Batch, int, int]]:
        """This rank's shard of every global batch, for data-parallel training.

        ``order`` is the epoch's permutation of the split's rows, the same on every rank. Global
        batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]``, exactly the rows a
        single process takes at that step; it is cut into ``world_size`` contiguous pieces
        (sizes differ by at most one row) and rank ``r`` gets piece ``r``. Yields ``(batch,
        rows, global_rows)``; a rank whose piece is empty (a last batch of fewer rows than
        ranks) gets one stand-in row with ``rows = 0``, to be weighted by zero."""
        size = self.size(name)
        dynamic = name == "train" and self.binarize == "dynamic"
        for begin in range(0, size, batch_size):
            index = order[begin : begin + batch_size]
            total = int(index.shape[0])
            mine = index.tensor_split(world_size)[rank]
            rows = int(mine.shape[0])
            if rows == 0:
                mine = index[-1:]
            batch = self.take(name, mine)
            if dynamic:
                batch["x"] = torch.bernoulli(batch["x"])
            yield batch, rows, total

    def check_chunks(self, name: str) -> Iterator[tuple[str | None, Batch]]:
        """The split as ``(piece, tensors)`` for :func:`check_splits`: in memory, the whole split
        (``piece`` None); data read from disk come in pieces named like ``"rows 0-65535"``."""
        yield None, self.split(name)


def _offender(bad: torch.Tensor, x: torch.Tensor) -> str:
    """``batch['x'] row r, feature f holds v`` for the first True of ``bad`` (rows on dim 0)."""
    where, value = first_offender(bad, x)
    return f"batch['x'] {where} holds {value}"


def _grey_level_problem(x: torch.Tensor) -> str | None:
    """What keeps ``x`` from being binarized (grey levels: finite floats in [0, 1]), or None."""
    if not torch.is_tensor(x) or not x.dtype.is_floating_point:
        return f"batch['x'] has dtype {getattr(x, 'dtype', type(x).__name__)}; grey levels must be a float tensor"
    bad = ~((x >= 0) & (x <= 1))  # NaN compares False, so it is bad too
    if bad.any():
        return _offender(bad, x)
    return None


def _binarize_once(x: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def split_rows(amount: int | float, total: int, key: str) -> int:
    """The number of rows that ``data.<key>`` (``validation``, ``test``) asks for out of ``total``: a
    float in (0, 1) is a fraction, an integer is a count. A float of 1 or more (``1.0``) is refused as
    ambiguous rather than read as a count, and a negative, non-numeric or fractional count is refused,
    each naming ``data.<key>``."""
    meaning = "give a fraction in (0, 1) (e.g. 0.1) or a whole count of rows (e.g. 500)"
    if isinstance(amount, bool) or not isinstance(amount, Real):
        raise ConfigError(f"data.{key} = {amount!r} is not allowed: {meaning}")
    if isinstance(amount, float):
        if 0 < amount < 1:
            return int(round(amount * total))
        if amount >= 1 and amount.is_integer():
            raise ConfigError(
                f"data.{key} = {amount!r} is ambiguous: a fraction must lie in (0, 1), and a count is written "
                f"without a decimal point (data.{key} = {int(amount)})"
            )
        if amount != 0:
            raise ConfigError(f"data.{key} = {amount!r} is not allowed: {meaning}")
    if amount < 0:
        raise ConfigError(f"data.{key} = {amount!r} is not allowed: {meaning}")
    return int(amount)


def check_held_out(held: int, available: int, key: str, amount) -> None:
    """Refuse a held-out split that takes none, or every one, of the ``available`` rows, naming the key."""
    if held <= 0:
        raise DataError(f"data.{key} = {amount!r} holds out no rows of {available}; give a fraction in (0, 1) or a count >= 1")
    if held >= available:
        raise DataError(
            f"data.{key} = {amount!r} holds out {held} of the {available} rows and leaves none for training; "
            f"give a smaller fraction or count"
        )


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
    valid_size = split_rows(validation, count, "validation")
    check_held_out(valid_size, count, "validation", validation)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    valid_index, train_index = order[:valid_size], order[valid_size:]
    valid = {key: value[valid_index] for key, value in train.items()}
    train = {key: value[train_index] for key, value in train.items()}
    if binarize != "none":
        for name, tensors in zip(SPLITS, (train, valid, test)):
            problem = _grey_level_problem(tensors["x"])
            if problem:
                raise DataError(f"binarization needs finite grey levels in [0, 1]; {spec.name} {name} split: {problem}")
        valid["x"] = _binarize_once(valid["x"], seed + 1)
        test["x"] = _binarize_once(test["x"], seed + 2)
        if binarize == "static":
            train["x"] = _binarize_once(train["x"], seed + 3)
        spec = replace(spec, support="binary")
    return DataSplits(spec=spec, train=train, valid=valid, test=test, binarize=binarize)


# In-memory splits that passed a check, by (what checked them, the tensors' identities and versions):
# fitting several pairs to one data set in a process (a sweep, a benchmark) checks it once.
_PASSED: dict[tuple, bool] = {}


def _fingerprint(data: DataSplits, cache_key) -> tuple | None:
    if cache_key is None or type(data) is not DataSplits:
        return None  # data read from disk may change between checks
    tensors = []
    for name in SPLITS:
        for key, value in sorted(data.split(name).items()):
            if not torch.is_tensor(value):
                return None
            # _version counts in-place writes, so a tensor changed since its check is checked again.
            tensors.append((name, key, id(value), value._version, value.data_ptr(), tuple(value.shape), str(value.device)))
    return (cache_key, data.binarize, tuple(tensors))


def check_splits(data: DataSplits, check_batch: Callable[[Batch], None], cache_key=None) -> None:
    """Check every split in full before training: ``check_batch`` (the model's own check,
    ``Model.check_batch``) runs on each whole split as one batch, so the rows it names are rows of
    that split; its :class:`DataError` is raised again with the split named in front. With
    ``binarize = "dynamic"`` the raw training grey levels must be finite and in [0, 1], and the check
    runs on one Bernoulli draw of the whole training split, drawn without moving the global RNG.

    ``cache_key`` (hashable) names what ``check_batch`` checks (e.g. the model's class, data spec and
    config): in-memory splits that passed under the same key, unchanged since (same tensors, no
    in-place writes), are not checked again."""
    fingerprint = _fingerprint(data, cache_key)
    if fingerprint is not None and fingerprint in _PASSED:
        return
    _check_every_split(data, check_batch)
    if fingerprint is not None:
        if len(_PASSED) > 64:
            _PASSED.clear()
        _PASSED[fingerprint] = True


def _check_every_split(data: DataSplits, check_batch: Callable[[Batch], None]) -> None:
    for name in SPLITS:
        for piece, tensors in data.check_chunks(name):
            x = tensors.get("x") if isinstance(tensors, dict) else None
            # Data read in pieces (memory-mapped) name the piece: row numbers are the piece's own.
            where = name if piece is None else f"{name} ({piece})"
            if torch.is_tensor(x) and (x.dim() == 0 or x.shape[0] == 0):
                raise DataError(f"{name} split is empty: batch['x'] has shape {tuple(x.shape)}; every split needs examples")
            if name == "train" and data.binarize == "dynamic" and torch.is_tensor(x):
                problem = _grey_level_problem(x)
                if problem:
                    raise DataError(
                        f"{where.replace('train', 'train split', 1)}: {problem}, but binarize = 'dynamic' draws each "
                        "training batch from grey levels, which must be finite and lie in [0, 1]"
                    )
                with preserved_rng():
                    tensors = dict(tensors, x=torch.bernoulli(x))
            try:
                check_batch(tensors)
            except DataError as error:
                message = " ".join(str(error).split("\n"))
                raise DataError(f"{where.replace(name, name + ' split', 1)}: {message}") from None


def check_loader_result(result: object, loader: str) -> DataSplits:
    """Refuse, in one line naming ``loader``, what a data loader returned that breaks the loader
    contract (see :mod:`pyrovae.data`); return ``result`` unchanged when it keeps it."""
    about = f"data loader {loader!r}"
    if not isinstance(result, DataSplits):
        raise DataError(
            f"{about} returned {type(result).__module__}.{type(result).__qualname__}; it must return "
            "pyrovae.data.DataSplits(spec, train, valid, test) (e.g. from pyrovae.data.make_splits)"
        )
    if not isinstance(result.spec, DataSpec):
        raise DataError(f"{about} returned DataSplits whose spec is {type(result.spec).__name__}; it must be a pyrovae.DataSpec")
    for name in SPLITS:
        tensors = result.split(name)
        if not isinstance(tensors, dict):
            raise DataError(f"{about}: the {name} split is {type(tensors).__name__}; it must be a dict of tensors (with key 'x')")
        if "x" not in tensors:
            raise DataError(f"{about}: the {name} split has no key 'x' (keys: {sorted(map(str, tensors))})")
        for key, value in tensors.items():
            if not torch.is_tensor(value):
                raise DataError(f"{about}: {name}[{key!r}] is {type(value).__name__}; every value of a split must be a tensor")
        x = tensors["x"]
        if x.dim() == 0 or x.shape[0] == 0:
            raise DataError(f"{about}: the {name} split is empty (batch['x'] has shape {tuple(x.shape)}); every split needs examples")
        rows = int(x.shape[0])
        for key, value in tensors.items():
            if value.dim() == 0 or value.shape[0] != rows:
                count = "no rows (a 0-dim tensor)" if value.dim() == 0 else f"{int(value.shape[0])} rows"
                raise DataError(
                    f"{about}: in the {name} split, {name}[{key!r}] has {count} but {name}['x'] has {rows}; "
                    "every tensor of a split holds the examples on dim 0"
                )
    keys = {name: set(result.split(name)) for name in SPLITS}
    for name in SPLITS[1:]:
        if keys[name] != keys["train"]:
            extra, lacking = sorted(map(str, keys[name] - keys["train"])), sorted(map(str, keys["train"] - keys[name]))
            parts = ([f"{name} lacks {', '.join(map(repr, lacking))}"] if lacking else []) + (
                [f"only {name} has {', '.join(map(repr, extra))}"] if extra else []
            )
            raise DataError(
                f"{about}: the splits have different keys: {'; '.join(parts)} "
                f"(train: {sorted(map(str, keys['train']))}, {name}: {sorted(map(str, keys[name]))}); "
                "one model is called on all three, so they need the same keys"
            )
    return result
