"""Splits that stay on disk: memory-mapped ``.npy`` arrays, read a batch at a time.

For data larger than memory (or than the GPU): instead of holding each split as a tensor on the
training device, :class:`MemmapSplits` keeps every array as a memory-mapped NumPy ``.npy`` file
(copy-on-write, so nothing ever writes to it) and gathers each batch's rows on the host, then
moves that batch to the device. The operating system pages the rows in and out; resident memory
is bounded by the page cache, not by the data set.

It keeps the batch contract and the seeded order: batches are the same dicts of tensors, the
training order is the same ``torch.randperm`` (drawn on the training device, one host copy per
epoch), and dynamic binarization draws on the device, so on the same device a run from memory
and a run from these files take the same steps with the same random numbers. Under ``torchrun``
each rank reads only the rows of its shard (:meth:`DataSplits.shard_batches`).

On disk (one folder)::

    pyrovae-arrays.json      format version, the DataSpec, binarize, the arrays' shapes and
                             dtypes, and what wrote them ("source")
    train/x.npy, train/y.npy, ... valid/..., test/...   one .npy file per key and split

Write one with :func:`write_memmap` (from any :class:`DataSplits`); open one with
:func:`open_memmap` or ``[data] name = "memmap"``, ``dir = "FOLDER"``. The MNIST-style loaders
(``mnist``, ``fashion-mnist``) and ``digits`` take ``memmap = "FOLDER"``: the first run writes
the arrays there, later runs open them. Arrays may also be written by other tools (e.g.
``numpy.lib.format.open_memmap``, a piece at a time) next to a hand-written ``pyrovae-arrays.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pyrovae.data.splits import SPLITS, Batch, DataSplits
from pyrovae.errors import DataError
from pyrovae.pair import DataSpec
from pyrovae.registry import DATASETS

INDEX_FILE = "pyrovae-arrays.json"
FORMAT = 1
# check_splits reads a memory-mapped split in pieces of this many rows (bounded memory).
CHECK_ROWS = 65536


@dataclass
class MemmapSplits(DataSplits):
    """:class:`DataSplits` whose tensors are memory-mapped files on the host. ``to(device)``
    only records where batches go; each batch is gathered on the host and moved there."""

    target: torch.device = field(default_factory=lambda: torch.device("cpu"))
    folder: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.target

    def to(self, device: torch.device | str) -> "MemmapSplits":
        return replace(self, target=torch.device(device))

    def _deliver(self, batch: Batch) -> Batch:
        if self.target.type == "cpu":
            return batch
        return {key: value.to(self.target, non_blocking=True) for key, value in batch.items()}

    def batches(
        self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None, *, start: int = 0
    ) -> Iterator[Batch]:
        tensors = self.split(name)
        size = self.size(name) if limit is None else min(limit, self.size(name))
        # The same draw as in-memory data on this device; the host needs the order to read rows.
        order = torch.randperm(size, device=self.target).cpu() if shuffle else None
        dynamic = name == "train" and self.binarize == "dynamic"
        for begin in range(start, size, batch_size):
            if order is None:
                batch = {key: value[begin : min(begin + batch_size, size)] for key, value in tensors.items()}
            else:
                index = order[begin : begin + batch_size]
                batch = {key: value.index_select(0, index) for key, value in tensors.items()}
            batch = self._deliver(batch)
            if dynamic:
                batch["x"] = torch.bernoulli(batch["x"])
            yield batch

    def shard_batches(self, name: str, batch_size: int, order: torch.Tensor, rank: int, world_size: int):
        # The rows are read on the host: one copy of the epoch's order there, not one per step.
        return super().shard_batches(name, batch_size, order.cpu(), rank, world_size)

    def take(self, name: str, index: torch.Tensor) -> Batch:
        index = index.cpu()
        return self._deliver({key: value.index_select(0, index) for key, value in self.split(name).items()})

    def rows(self, name: str, lo: int, hi: int) -> Batch:
        # A copy: the rows may outlive the mapping and are moved to the device anyway.
        return self._deliver({key: value[lo:hi].clone() for key, value in self.split(name).items()})

    def check_chunks(self, name: str) -> Iterator[tuple[str | None, Batch]]:
        size = self.size(name)
        for lo in range(0, size, CHECK_ROWS):
            hi = min(lo + CHECK_ROWS, size)
            yield (None if (lo, hi) == (0, size) else f"rows {lo}-{hi - 1}"), {key: value[lo:hi] for key, value in self.split(name).items()}


def _spec_record(spec: DataSpec) -> dict:
    record = asdict(spec)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


class _WrittenMeanwhile(Exception):
    pass


def write_memmap(data: DataSplits, folder: str | Path, source: dict | None = None) -> Path:
    """Write every split of ``data`` as ``.npy`` arrays in ``folder`` (see the module docstring),
    atomically: into a temporary folder beside it, renamed into place when complete."""
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} is not empty; write memory-mapped arrays into a new or empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    arrays: dict[str, dict] = {}
    try:
        for name in SPLITS:
            (staging / name).mkdir(parents=True)
            arrays[name] = {}
            for key, value in data.split(name).items():
                if not isinstance(key, str) or not key.isidentifier():
                    raise DataError(f"cannot write {name}[{key!r}]: keys written to disk must be identifiers")
                array = value.detach().cpu().numpy()
                np.save(staging / name / f"{key}.npy", array, allow_pickle=False)
                arrays[name][key] = {"dtype": str(array.dtype), "shape": list(array.shape)}
        index = {
            "format": FORMAT,
            "spec": _spec_record(data.spec),
            "binarize": data.binarize,
            "arrays": arrays,
            "source": source or {},
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        try:
            if folder.exists():
                folder.rmdir()
            os.replace(staging, folder)
        except OSError:
            if (folder / INDEX_FILE).exists():  # another process (e.g. another rank) wrote it first
                raise _WrittenMeanwhile() from None
            raise
    except TypeError as error:  # a dtype NumPy has no name for (e.g. bfloat16)
        raise DataError(f"cannot write memory-mapped arrays to {folder}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_index(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    path = folder / INDEX_FILE
    if not path.exists():
        raise DataError(f"{folder} holds no memory-mapped arrays (no {INDEX_FILE}); write them with pyrovae.data.write_memmap")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is damaged ({error}); delete the folder and write the arrays again") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path} has format {index.get('format')!r}; this pyrovae reads format {FORMAT}")
    return index


def open_memmap(folder: str | Path) -> MemmapSplits:
    """Open arrays written by :func:`write_memmap` (no row is read until a batch needs it)."""
    folder = Path(folder).expanduser().absolute()
    index = read_index(folder)
    spec_fields = dict(index["spec"])
    for key in ("x_shape", "image_shape"):
        if spec_fields.get(key) is not None:
            spec_fields[key] = tuple(spec_fields[key])
    try:
        spec = DataSpec(**spec_fields)
    except (TypeError, ValueError) as error:
        raise DataError(f"{folder / INDEX_FILE}: bad spec ({error})") from None
    splits: dict[str, Batch] = {}
    for name in SPLITS:
        splits[name] = {}
        for key, about in index["arrays"].get(name, {}).items():
            path = folder / name / f"{key}.npy"
            try:
                # Copy-on-write: a stray in-place write changes private memory, never the file.
                array = np.load(path, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise DataError(f"{path}: cannot map the array ({error}); delete the folder and write the arrays again") from None
            if list(array.shape) != list(about["shape"]) or str(array.dtype) != about["dtype"]:
                raise DataError(
                    f"{path} holds {array.dtype} {list(array.shape)}, but {INDEX_FILE} says {about['dtype']} {about['shape']}"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                splits[name][key] = torch.from_numpy(array)
        if "x" not in splits[name]:
            raise DataError(f"{folder}: the {name} split has no x.npy")
    return MemmapSplits(spec=spec, train=splits["train"], valid=splits["valid"], test=splits["test"], binarize=index["binarize"], folder=folder)


def cached_memmap(folder: str | Path, source: dict, build: Callable[[], DataSplits]) -> MemmapSplits:
    """Open the arrays in ``folder`` if they were written for ``source`` (the loader and its
    options); if the folder is new or empty, ``build()`` the splits, write them there once, and open them."""
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()):
        found = read_index(folder).get("source", {})
        if found != source:
            changed = sorted(key for key in set(found) | set(source) if found.get(key) != source.get(key))
            raise DataError(
                f"data.memmap = {str(folder)!r} holds arrays written for other data options ({', '.join(changed)}: "
                f"{', '.join(f'{found.get(k)!r} there, {source.get(k)!r} now' for k in changed)}); use another folder"
            )
        return open_memmap(folder)
    try:
        write_memmap(build(), folder, source=source)
    except _WrittenMeanwhile:  # several processes started on a new folder at once: one of them won
        return cached_memmap(folder, source, build)
    except DataError:
        if not (folder / INDEX_FILE).exists():
            raise
        return cached_memmap(folder, source, build)
    return open_memmap(folder)


@DATASETS.register("memmap")
def memmap(dir: Path) -> MemmapSplits:
    """Memory-mapped arrays in ``dir`` written by :func:`write_memmap` (or a loader's ``memmap`` option)."""
    return open_memmap(dir)
