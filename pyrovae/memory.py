"""How much memory a device has free, for the checks that refuse work that cannot fit before it starts
(a model too large to train, an analysis too large to hold)."""

from __future__ import annotations

import torch


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free on ``device``: for the CPU, ``MemAvailable`` of ``/proc/meminfo`` (Linux); for a
    CUDA device, the free memory CUDA reports. None where it cannot be read (nothing is checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gigabytes(count: float) -> str:
    return f"{count / 1e9:.3g} GB"
