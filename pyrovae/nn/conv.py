"""A small convolutional network on flattened images, for classifiers such as M2's q(y | x).

    x (features) -> image (channels_in, H, W)
      -> [Conv2d(kernel k, stride 2, padding k // 2) -> activation] * len(channels)
      -> flatten -> [Linear -> activation] * len(hidden) -> Linear -> out_features

Each convolution halves the height and width (rounding up), so two of them take a 28 x 28 MNIST
image to 7 x 7. Its last layer is linear, like :class:`~pyrovae.nn.mlp.MLP`'s.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pyrovae.nn.mlp import activation_layer, check_sizes


def channels_first(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of an image shape given as (H, W) (one channel) or (C, H, W)."""
    shape = tuple(int(n) for n in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"an image shape is (H, W) or (C, H, W), got {shape}")
    return shape


def _halved(size: int, layers: int) -> int:
    for _ in range(layers):
        size = (size + 1) // 2
    return size


class ConvNet(nn.Sequential):
    """Convolutions over ``image_shape`` ((H, W) or (C, H, W)) on inputs flattened to (..., C * H * W);
    see the module docstring."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
        kernel_size: int = 5,
    ):
        image_shape = channels_first(image_shape)
        check_sizes(image_shape=list(image_shape), channels=list(channels), hidden=list(hidden), out_features=out_features)
        if not channels:
            raise ValueError("ConvNet needs at least one convolution (channels = [] is an MLP)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size = {kernel_size} is not allowed: it must be odd and >= 1")
        layers: list[nn.Module] = [nn.Unflatten(-1, image_shape)]
        width = image_shape[0]
        for size in channels:
            layers += [nn.Conv2d(width, size, kernel_size, stride=2, padding=kernel_size // 2), activation_layer(activation)]
            width = size
        layers.append(nn.Flatten())
        width *= _halved(image_shape[1], len(channels)) * _halved(image_shape[2], len(channels))
        for size in hidden:
            layers += [nn.Linear(width, size), activation_layer(activation)]
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.in_features = image_shape[0] * image_shape[1] * image_shape[2]
        self.out_features = out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Fold leading (particle, enumeration) dims into the batch and unfold after.
        leading = inputs.shape[:-1]
        outputs = super().forward(inputs.reshape(-1, inputs.shape[-1]))
        return outputs.reshape(*leading, self.out_features)
