"""Data: loaders for standard formats (each takes a local directory), splits and device-resident batching."""

from pyrovae.data.images import digits, download_idx, fashion_mnist, load_idx_images, mnist, read_idx
from pyrovae.data.splits import Batch, DataSplits, make_splits

__all__ = [
    "Batch",
    "DataSplits",
    "digits",
    "download_idx",
    "fashion_mnist",
    "load_idx_images",
    "make_splits",
    "mnist",
    "read_idx",
]
