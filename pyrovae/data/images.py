"""Image data sets: scikit-learn's 8x8 digits (offline, the default) and MNIST /
Fashion-MNIST from standard IDX ``.gz`` files in a local directory."""

from __future__ import annotations

import gzip
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from pyrovae.data.labels import keep_labels_per_class
from pyrovae.data.memmap import cached_memmap
from pyrovae.data.splits import DataSplits, check_held_out, make_splits, split_rows
from pyrovae.errors import DataError
from pyrovae.pair import DataSpec
from pyrovae.registry import DATASETS

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = {  # the names of the integer labels, for plots
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if text.startswith(type(error).__name__) else f"{type(error).__name__}: {text}"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not): magic 0x0000TTNN, NN big-endian uint32 dims, data."""
    path = Path(path)
    compressed = path.suffix == ".gz"
    opener = gzip.open if compressed else open
    try:
        handle = opener(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot open the file ({_one_line(error)})") from None
    try:
        with handle:
            raw = handle.read()
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        what = "damaged or truncated gzip file" if compressed else "cannot read the file"
        raise DataError(f"{path}: {what} ({_one_line(error)}); delete it and fetch it again (data.download = true)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the IDX header declares {ndim} dims but the file ends after {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def download_idx(directory: str | Path, kind: str = "mnist") -> None:
    """Fetch the four IDX files of ``kind`` into ``directory`` (for users who are online)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for filename in IDX_FILES.values():
        target = directory / filename
        if target.exists():
            continue
        errors = []
        for mirror in MIRRORS[kind]:
            try:
                partial = target.with_suffix(".part")
                urllib.request.urlretrieve(mirror + filename, partial)
                partial.replace(target)
                break
            except OSError as error:
                errors.append(f"{mirror}: {error}")
        else:
            raise DataError(f"could not download {filename}: " + "; ".join(errors))


def load_idx_images(directory: str | Path, kind: str = "mnist", download: bool = False):
    """(train_x, train_y, test_x, test_y) with images as float32 in [0, 1], shape (N, 28, 28)."""
    directory = Path(directory).expanduser()
    missing = [name for name in IDX_FILES.values() if not (directory / name).exists()]
    if missing and download:
        download_idx(directory, kind)
    elif missing:
        raise DataError(
            f"{kind}: missing {', '.join(missing)} in {directory.resolve()}; "
            f"set data.dir to a folder with the IDX files, or data.download = true to fetch them"
        )
    arrays = {key: read_idx(directory / name) for key, name in IDX_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"{kind}: {split} images and labels differ in count")
    to_images = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return (
        to_images(arrays["train_images"]),
        to_labels(arrays["train_labels"]),
        to_images(arrays["test_images"]),
        to_labels(arrays["test_labels"]),
    )


def _image_splits(name, train_x, train_y, test_x, test_y, validation, binarize, seed, labels_per_class=0) -> DataSplits:
    image_shape = tuple(train_x.shape[1:])
    features = int(np.prod(image_shape))
    spec = DataSpec(name=name, x_shape=(features,), support="unit_interval", image_shape=image_shape, num_classes=10)
    train = {"x": train_x.reshape(len(train_x), features), "y": train_y}
    test = {"x": test_x.reshape(len(test_x), features), "y": test_y}
    splits = make_splits(spec, train, test, validation=validation, binarize=binarize, seed=seed)
    return keep_labels_per_class(splits, labels_per_class, seed)


def _idx_data_set(kind: str, description: str):
    """Register a loader for an IDX data set laid out like MNIST."""

    def load(
        dir: Path = f"~/.cache/pyrovae/{kind}",
        binarize: str = "dynamic",
        validation: int | float = 10000,
        download: bool = False,
        seed: int = 0,
        labels_per_class: int = 0,
        memmap: Path | None = None,
        limit: int = 0,
    ) -> DataSplits:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise DataError(f"{kind}: limit must be an integer >= 0 (0: all 60,000 training images), got {limit!r}")

        def build() -> DataSplits:
            train_x, train_y, test_x, test_y = load_idx_images(dir, kind, download)
            if limit:
                train_x, train_y = train_x[:limit], train_y[:limit]
            return _image_splits(kind, train_x, train_y, test_x, test_y, validation, binarize, seed, labels_per_class)

        if memmap is not None:  # the arrays written once to memory-mapped .npy files, then read from there
            source = {"loader": kind, "binarize": binarize, "validation": validation, "seed": seed, "labels_per_class": labels_per_class}
            if limit:
                source["limit"] = limit
            return cached_memmap(memmap, source, build)
        return build()

    load.__name__ = load.__qualname__ = kind.replace("-", "_")
    load.__doc__ = (
        f"{description} from IDX files in ``dir``: 60,000 train (less ``validation``), 10,000 test, with labels "
        "``y``. ``limit = N`` keeps the first N training images (validation is taken from them), for quick runs. ``labels_per_class > 0`` keeps that many training labels per class (see :mod:`pyrovae.data.labels`). "
        "``memmap = FOLDER`` writes the splits once to memory-mapped ``.npy`` arrays there and reads batches from "
        "them (see :mod:`pyrovae.data.memmap`)."
    )
    return DATASETS.register(kind)(load)


mnist = _idx_data_set("mnist", "MNIST (LeCun et al. 1998)")
fashion_mnist = _idx_data_set("fashion-mnist", "Fashion-MNIST (Xiao et al. 2017)")


@DATASETS.register("digits")
def digits(
    binarize: str = "dynamic",
    validation: int | float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    labels_per_class: int = 0,
    memmap: Path | None = None,
) -> DataSplits:
    """scikit-learn's handwritten digits (1,797 images of 8x8, grey levels 0..16, labels ``y``), shipped
    with scikit-learn, so it works offline. A ``test`` fraction is held out with a fixed seed.
    ``labels_per_class > 0`` keeps that many training labels per class (see :mod:`pyrovae.data.labels`).
    ``memmap = FOLDER``: as for the MNIST loaders, the splits are written there once and read from disk."""
    if memmap is not None:
        source = {"loader": "digits", "binarize": binarize, "validation": validation, "test": test, "seed": seed, "labels_per_class": labels_per_class}
        return cached_memmap(memmap, source, lambda: digits(binarize, validation, test, seed, labels_per_class))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 100))
    test_size = split_rows(test, len(images), "test")
    check_held_out(test_size, len(images), "test", test)
    test_index, train_index = order[:test_size], order[test_size:]
    return _image_splits(
        "digits",
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
        validation,
        binarize,
        seed,
        labels_per_class,
    )
