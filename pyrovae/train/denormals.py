"""Flush subnormal floats to zero on the CPU while training and evaluating.

A float32 below 1.2e-38 in magnitude is *subnormal*, and x86 CPUs compute on subnormals tens of
times slower than on normal numbers. Training makes them: saturated sigmoids and softplus
gradients, Bernoulli probabilities of pixels that are always off, tiny Adam moments. A run whose
tensors fill with them slows down epoch after epoch: M2 with a convolutional classifier on MNIST
went from 44 s to over 200 s an epoch on one core by epoch 15, and one of its steps took 409-432 ms
with subnormals computed against 133 ms flushed. ``torch.set_flush_denormal(True)`` (the
FTZ/DAZ modes) makes them zeros instead: a change below 1.2e-38 in any one number.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def flushing_denormals() -> bool:
    """Whether subnormal float32 results are flushed to zero in this thread now."""
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    return bool((tiny * 1e-10).item() == 0.0)  # 1e-40 is subnormal in float32


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Flush subnormals to zero inside the block (where the CPU supports it), then restore the
    setting found on entry. ``enabled=False`` leaves the setting as it is."""
    if not enabled:
        yield
        return
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
