"""Splits whose per-row matrices are sparse on the host, made dense a batch at a time on the device.

For data whose rows are long and mostly zero (user-item clicks, bag-of-words documents, multi-hot
labels over thousands of classes), a dense split may not fit in memory, let alone on the device.
:class:`SparseSplits` keeps every per-row matrix of a split (``x``, and e.g. ``heldout`` or ``y``)
in compressed sparse row (CSR) form in host memory, and builds each batch's rows dense on the
training device: only the batch's nonzeros (values and column indices) travel, and they are
scattered into a zero tensor there. Other keys (integer labels, masks) are ordinary tensors, held
on the host and moved per batch.

Storage. The split dicts hold ``torch.sparse_csr`` tensors (the arrays a
``scipy.sparse.csr_matrix`` holds, shared with one without a copy: :func:`csr_view`), so every
generic reader of a split (``check_loader_result``, ``len``, ``.shape``) sees a tensor with the
examples on dim 0 and nothing is densified to look at it. Rows are gathered through the SciPy
view. Build one from SciPy matrices (any sparse format), torch sparse tensors or dense tensors::

    SparseSplits(spec, train={"x": csr_train}, valid={"x": csr_valid}, test={"x": csr_test})
    make_sparse_splits(spec, {"x": csr_train, "y": y_train}, {"x": csr_test, "y": y_test}, validation=0.1, seed=0)

The batch contract and the seeded order are those of :class:`DataSplits` (and of
:class:`~pyrovae.data.memmap.MemmapSplits`, whose shape this follows): ``batches``, ``take``,
``random_batch`` and ``shard_batches`` give dicts of dense tensors on :attr:`device`, and a
shuffled epoch is the same ``torch.randperm`` drawn on the training device, so on one device a
run from sparse splits takes the same steps as a run from the same rows held dense.

Bounded memory. No method densifies more than ``dense_rows_limit`` elements at once:
``check_chunks`` gives a split in pieces of at most that many elements, and ``rows(lo, hi)``
gives a range that is larger than that as :class:`SparseRows` views, which a caller slices a
batch at a time (as ``importance_log_likelihood``, ``mutual_information`` and ``active_units``
do); a smaller range (e.g. the 16 rows of a samples file) comes dense.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import scipy.sparse
import torch

from pyrovae.data.splits import SPLITS, Batch, DataSplits, check_held_out, split_rows
from pyrovae.errors import DataError
from pyrovae.pair import DataSpec

# At most this many elements (rows x columns) are made dense at once outside training batches.
DENSE_ROWS_LIMIT = 1 << 24


def is_sparse_rows(value) -> bool:
    """Whether a split's value is a per-row sparse matrix (a ``torch.sparse_csr`` tensor)."""
    return torch.is_tensor(value) and value.layout == torch.sparse_csr


def csr_tensor(matrix) -> torch.Tensor:
    """A 2-d sparse matrix (SciPy, any format; or a torch sparse tensor) as a ``torch.sparse_csr``
    tensor of the default float dtype on the host, duplicates summed and columns sorted per row.
    A SciPy CSR matrix of that dtype is shared, not copied."""
    if torch.is_tensor(matrix):
        if matrix.layout == torch.sparse_csr and matrix.device.type == "cpu" and matrix.dtype == torch.get_default_dtype():
            return matrix  # already as held (e.g. replace() rebuilding the splits)
        if matrix.layout == torch.sparse_csr:
            matrix = csr_view(matrix.cpu())
        elif matrix.layout == torch.sparse_coo:
            matrix = matrix.cpu().coalesce().to_sparse_csr()
            matrix = csr_view(matrix)
        else:
            raise DataError(f"csr_tensor takes a sparse matrix; got a {matrix.layout} tensor")
    if not scipy.sparse.issparse(matrix) or matrix.ndim != 2:
        raise DataError(f"csr_tensor takes a 2-d sparse matrix; got {type(matrix).__name__}")
    dtype = torch.empty((), dtype=torch.get_default_dtype()).numpy().dtype
    matrix = scipy.sparse.csr_matrix(matrix, dtype=dtype)
    if not matrix.has_canonical_format:  # index-put on the device would keep one of two duplicates
        matrix = matrix.copy()
        matrix.sum_duplicates()
    index_dtype = np.int64 if matrix.indptr.dtype == np.int64 or matrix.indices.dtype == np.int64 else np.int32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its sparse CSR support beta
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(index_dtype, copy=False)),
            torch.from_numpy(matrix.indices.astype(index_dtype, copy=False)),
            torch.from_numpy(matrix.data),
            size=matrix.shape,
        )


def csr_view(tensor: torch.Tensor) -> scipy.sparse.csr_matrix:
    """The ``scipy.sparse.csr_matrix`` sharing a host ``torch.sparse_csr`` tensor's arrays (no copy)."""
    return scipy.sparse.csr_matrix(
        (tensor.values().numpy(), tensor.col_indices().numpy(), tensor.crow_indices().numpy()),
        shape=tuple(tensor.shape),
        copy=False,
    )


def dense_rows(matrix: scipy.sparse.csr_matrix, rows, device: torch.device) -> torch.Tensor:
    """Rows ``rows`` (a slice or an array of row numbers) of a host CSR matrix as a dense tensor on
    ``device``: the rows' nonzeros are moved there and scattered into zeros."""
    part = matrix[rows]
    count, width = part.shape
    values = torch.from_numpy(part.data).to(device, non_blocking=True)
    dense = torch.zeros(count, width, dtype=values.dtype, device=device)
    if part.nnz:
        columns = torch.from_numpy(part.indices.astype(np.int64, copy=False)).to(device, non_blocking=True)
        per_row = torch.from_numpy(np.diff(part.indptr).astype(np.int64, copy=False)).to(device, non_blocking=True)
        row_ids = torch.repeat_interleave(torch.arange(count, device=device), per_row)
        dense[row_ids, columns] = values
    return dense


def _host_value(key: str, value):
    """A split's value as held: per-row sparse matrices as CSR tensors, other tensors on the host."""
    if scipy.sparse.issparse(value) or (torch.is_tensor(value) and value.layout in (torch.sparse_csr, torch.sparse_coo)):
        return csr_tensor(value)
    if torch.is_tensor(value):
        return value.cpu()
    return value  # check_loader_result refuses it by name


@dataclass
class SparseSplits(DataSplits):
    """:class:`DataSplits` whose per-row matrices are sparse (CSR) on the host (see the module
    docstring). ``to(device)`` only records where batches go; each batch is made dense there."""

    target: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dense_rows_limit: int = DENSE_ROWS_LIMIT
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in SPLITS:
            tensors = self.split(name)
            if isinstance(tensors, dict):
                setattr(self, name, {key: _host_value(key, value) for key, value in tensors.items()})
        if self.dense_rows_limit < 1:
            raise DataError(f"SparseSplits.dense_rows_limit must be >= 1, got {self.dense_rows_limit}")

    @property
    def device(self) -> torch.device:
        return self.target

    def to(self, device: torch.device | str) -> "SparseSplits":
        return replace(self, target=torch.device(device))

    def csr(self, name: str, key: str = "x") -> scipy.sparse.csr_matrix:
        """The SciPy view of a sparse key of a split (shares its memory; do not write to it)."""
        value = self.split(name)[key]
        if not is_sparse_rows(value):
            raise DataError(f"{name}[{key!r}] is not held sparse (it is a {getattr(value, 'layout', type(value).__name__)} value)")
        cached = self._views.get((name, key))
        if cached is None or cached[0] is not value:
            cached = self._views[(name, key)] = (value, csr_view(value))
        return cached[1]

    def _gather(self, name: str, rows) -> Batch:
        """Rows ``rows`` (a slice, or a 1-d integer array of row numbers on the host) of every key."""
        batch = {}
        for key, value in self.split(name).items():
            if is_sparse_rows(value):
                batch[key] = dense_rows(self.csr(name, key), rows, self.target)
            else:
                index = rows if isinstance(rows, slice) else torch.as_tensor(rows)
                batch[key] = value[index].to(self.target, non_blocking=True)
        return batch

    def _binarized(self, name: str, batch: Batch) -> Batch:
        if name == "train" and self.binarize == "dynamic":
            batch["x"] = torch.bernoulli(batch["x"])
        return batch

    def batches(
        self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None, *, start: int = 0
    ) -> Iterator[Batch]:
        size = self.size(name) if limit is None else min(limit, self.size(name))
        # The same draw as dense data on this device; the host needs the order to gather rows.
        order = torch.randperm(size, device=self.target).cpu().numpy() if shuffle else None
        for begin in range(start, size, batch_size):
            rows = slice(begin, min(begin + batch_size, size)) if order is None else order[begin : begin + batch_size]
            yield self._binarized(name, self._gather(name, rows))

    def shard_batches(self, name: str, batch_size: int, order: torch.Tensor, rank: int, world_size: int):
        # Rows are gathered on the host: one copy of the epoch's order there, not one per step.
        return super().shard_batches(name, batch_size, order.cpu(), rank, world_size)

    def take(self, name: str, index: torch.Tensor) -> Batch:
        return self._gather(name, index.cpu().numpy())

    def _width(self, name: str) -> int:
        """Elements per row of the widest sparse key of a split (1 if it has none)."""
        widths = [math.prod(value.shape[1:]) for value in self.split(name).values() if is_sparse_rows(value)]
        return max(widths, default=1)

    def rows(self, name: str, lo: int, hi: int) -> Batch:
        """Rows ``[lo, hi)`` of a split on the device: dense when they hold at most
        ``dense_rows_limit`` elements, else sparse keys as :class:`SparseRows` views (sliced a
        batch at a time by the caller) and other keys as tensors."""
        size = self.size(name)
        lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
        hi = max(lo, hi)
        if (hi - lo) * self._width(name) <= self.dense_rows_limit:
            return self._gather(name, slice(lo, hi))
        return {
            key: SparseRows(self, name, key, lo, hi) if is_sparse_rows(value) else value[lo:hi].to(self.target)
            for key, value in self.split(name).items()
        }

    def check_chunks(self, name: str) -> Iterator[tuple[str | None, Batch]]:
        size = self.size(name)
        step = max(1, self.dense_rows_limit // self._width(name))
        for lo in range(0, size, step):
            hi = min(lo + step, size)
            piece = {}
            for key, value in self.split(name).items():
                # Checked on the host: the check needs no device memory.
                piece[key] = dense_rows(self.csr(name, key), slice(lo, hi), torch.device("cpu")) if is_sparse_rows(value) else value[lo:hi]
            yield (None if (lo, hi) == (0, size) else f"rows {lo}-{hi - 1}"), piece


class SparseRows:
    """Rows ``[lo, hi)`` of one sparse key of a split, not yet dense: slicing it (``rows[a:b]``, or
    a 1-d array of row numbers) gives those rows as a dense tensor on the splits' device.
    ``shape``, ``dtype``, ``device`` and ``len`` describe the dense rows it stands for."""

    def __init__(self, splits: SparseSplits, name: str, key: str, lo: int, hi: int):
        self.splits, self.name, self.key, self.lo, self.hi = splits, name, key, lo, hi
        value = splits.split(name)[key]
        self.shape = torch.Size((hi - lo, *value.shape[1:]))
        self.dtype = value.dtype
        self.device = splits.device

    def __len__(self) -> int:
        return self.hi - self.lo

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, index) -> torch.Tensor:
        matrix = self.splits.csr(self.name, self.key)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            rows = slice(self.lo + start, self.lo + max(start, stop)) if step == 1 else np.arange(start, stop, step) + self.lo
        elif isinstance(index, int):
            return self[index : index + 1][0] if index >= 0 else self[len(self) + index]
        else:
            relative = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64).reshape(-1)
            if relative.size and (relative.min() < -len(self) or relative.max() >= len(self)):
                raise IndexError(f"row index out of range for {len(self)} rows")
            rows = np.where(relative < 0, relative + len(self), relative) + self.lo
        return dense_rows(matrix, rows, self.device)

    def to_dense(self) -> torch.Tensor:
        """Every row, dense: for rows known to be few (the caller's choice, not the default)."""
        return self[:]

    def __repr__(self) -> str:
        return f"SparseRows({self.name}[{self.key!r}] rows {self.lo}-{self.hi - 1}, shape {tuple(self.shape)}, on {self.device})"


def _rows_of(value, index: np.ndarray):
    if scipy.sparse.issparse(value):
        return scipy.sparse.csr_matrix(value)[index]
    if is_sparse_rows(value):
        return csr_view(value)[index]
    if torch.is_tensor(value) and value.layout == torch.sparse_coo:
        return csr_view(value.coalesce().to_sparse_csr())[index]
    return value[torch.as_tensor(index)]


def make_sparse_splits(spec: DataSpec, train: dict, test: dict, *, validation: int | float, seed: int) -> SparseSplits:
    """:func:`~pyrovae.data.make_splits` for sparse rows: carve a validation set off ``train`` (a
    fraction in (0, 1) or a count) with the same seeded permutation, so the same rows held dense
    give the same three splits. Values may be SciPy sparse matrices, torch sparse tensors or
    dense tensors (labels)."""
    count = int(train["x"].shape[0])
    valid_size = split_rows(validation, count, "validation")
    check_held_out(valid_size, count, "validation", validation)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    valid_index, train_index = order[:valid_size], order[valid_size:]
    return SparseSplits(
        spec=spec,
        train={key: _rows_of(value, train_index) for key, value in train.items()},
        valid={key: _rows_of(value, valid_index) for key, value in train.items()},
        test=dict(test),
    )
