"""The training device named by ``train.device``."""

from __future__ import annotations

import torch

from pyrovae.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA where available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked
    against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}, but CUDA is not available on this machine; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
