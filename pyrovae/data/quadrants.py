"""Quadrant completion (Sohn et al. 2015, Sec. 5.1; Pyro's CVAE example): each image is cut into four
quadrants; ``given_quadrants`` of them are the input and the rest is the output to predict.

The quadrants are given in the order bottom-left, top-left, top-right (Pyro's example):

==================  ==============================  ===========================
``given_quadrants``  given (input)                   predicted (output)
==================  ==============================  ===========================
1                   bottom-left                     the other three
2                   left half                       right half
3                   all but bottom-right            bottom-right
==================  ==============================  ===========================

Every split follows the batch contract with two context keys:

- ``x`` (float (N, D), 0/1): the whole binarized image; only its target pixels are data;
- ``c`` (float (N, D)): the input, the image's given pixels, with -1 at every target pixel;
- ``target`` (bool (N, D)): which pixels are to be predicted (the same layout in every row);
- ``y``: the class label, passed through (the CVAE does not read it).

Models score ``x`` at the target pixels only (a masked likelihood), so the engine's importance-sampled
log-likelihood of ``x`` is the conditional log-likelihood log p(target pixels | given pixels).

Images are binarized once (``binarize = "static"``, with the data seed) *before* they are split, so
context and target come from one binary image. Dynamic binarization would draw ``x`` afresh per
batch while ``c`` kept the old draw, and is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pyrovae.data.splits import DataSplits
from pyrovae.errors import DataError
from pyrovae.registry import DATASETS, declare

# The order in which quadrants become inputs: (row half, column half), 0 = top / left.
GIVEN_ORDER = ((1, 0), (0, 0), (0, 1))
QUADRANT_NAMES = {(0, 0): "top-left", (0, 1): "top-right", (1, 0): "bottom-left", (1, 1): "bottom-right"}
SOURCES = ("mnist", "fashion-mnist", "digits")
UNKNOWN = -1.0


def quadrant_target(image_shape: tuple[int, int], given_quadrants: int) -> torch.Tensor:
    """The bool (H, W) mask of pixels to predict when the first ``given_quadrants`` of
    :data:`GIVEN_ORDER` are given (odd sizes put the middle row / column in the bottom / right half)."""
    if isinstance(given_quadrants, bool) or given_quadrants not in (1, 2, 3):
        raise DataError(f"data.given_quadrants must be 1, 2 or 3, got {given_quadrants!r}")
    height, width = image_shape
    target = torch.ones(height, width, dtype=torch.bool)
    rows = (slice(0, height // 2), slice(height // 2, height))
    columns = (slice(0, width // 2), slice(width // 2, width))
    for row, column in GIVEN_ORDER[:given_quadrants]:
        target[rows[row], columns[column]] = False
    return target


def split_quadrants(tensors: dict, target: torch.Tensor) -> dict:
    """Add the context ``c`` (given pixels, -1 at targets) and ``target`` (one flattened mask, expanded
    to every row without copying) to a split whose ``x`` holds flattened binary images."""
    x = tensors["x"]
    mask = target.reshape(-1).to(x.device)
    return {**tensors, "c": x.masked_fill(mask, UNKNOWN), "target": mask.expand(x.shape[0], -1)}


@declare("data set")
def quadrants(
    source: str = "mnist",
    given_quadrants: int = 1,
    dir: Path | None = None,
    binarize: str = "static",
    validation: int | float = 10000,
    download: bool = False,
    seed: int = 0,
) -> DataSplits:
    """Quadrant completion on ``source`` (``"mnist"``, ``"fashion-mnist"`` from IDX files in ``dir``, or
    ``"digits"``, scikit-learn's 8x8 digits, offline): see the module docstring. ``binarize`` is
    ``"static"`` (one draw per image, seeded) or ``"none"`` (grey levels, for a likelihood that takes them)."""
    if source not in SOURCES:
        raise DataError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}")
    if binarize not in ("static", "none"):
        raise DataError(
            f"data.binarize = {binarize!r} is not allowed for quadrant completion: choose 'static' or 'none'; "
            "'dynamic' would redraw the target pixels every batch but not the given ones in the context c"
        )
    options: dict = {"binarize": binarize, "validation": validation, "seed": seed}
    if source == "digits":
        if dir is not None or download:
            raise DataError("data.dir and data.download are for the IDX sources (mnist, fashion-mnist), not digits")
        if validation == 10000:
            options["validation"] = 0.1  # the digits set has 1,797 images
    else:
        options.update(download=download, **({"dir": dir} if dir is not None else {}))
    splits = DATASETS.resolve(source, "data.source")(**options)
    spec = splits.spec
    target = quadrant_target(spec.image_shape, given_quadrants)
    train, valid, test = (split_quadrants(tensors, target) for tensors in (splits.train, splits.valid, splits.test))
    spec = replace(spec, name=f"{source}-quadrants-{given_quadrants}")
    return replace(splits, spec=spec, train=train, valid=valid, test=test)
