"""Random translations of flattened images, for regularising a classifier trained on few labels.

    shifted_n(i, j) = x_n(i + dy_n, j + dx_n)    (0 outside the image),  dy_n, dx_n ~ U{-s, ..., s}

drawn independently per row with torch's global RNG (so a compiled training step draws them as
graph operations, and a checkpointed run repeats them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from pyrovae.nn.conv import channels_first


def random_shift(x: torch.Tensor, image_shape: Sequence[int], max_shift: int) -> torch.Tensor:
    """``x`` of shape (B, prod(image_shape)) with each row's image moved by up to ``max_shift``
    pixels along each axis (see the module docstring). ``image_shape`` is (H, W) or (C, H, W)."""
    if max_shift == 0:
        return x
    channels, height, width = channels_first(image_shape)
    rows = x.shape[0]
    images = F.pad(x.reshape(rows, channels, height, width), (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, rows, 1), device=x.device)
    row_index = (offsets[0] + torch.arange(height, device=x.device)).unsqueeze(-1)  # (B, H, 1)
    column_index = (offsets[1] + torch.arange(width, device=x.device)).unsqueeze(-2)  # (B, 1, W)
    batch_index = torch.arange(rows, device=x.device).view(rows, 1, 1)
    # (B, H, W, C) after advanced indexing on dims 0, 2, 3 -> back to (B, C, H, W)
    moved = images.permute(0, 2, 3, 1)[batch_index, row_index, column_index]
    return moved.permute(0, 3, 1, 2).reshape(rows, -1)
