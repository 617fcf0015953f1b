"""An MLP on a concatenation of inputs, whose first layer is applied to each input separately.

    h = act(W [a; b; ...] + c) = act(W_a a + W_b b + ... + c)

The two sides are equal, but the right one never builds the concatenation, so an input that is
shared by many rows of another one is multiplied once: in q(z | x, y) with the label y enumerated
over C values, W_x x is computed for B rows and broadcast against W_y y of shape (C, B, H),
instead of multiplying C copies of x. Inputs broadcast against each other on their leading dims
(enumeration and particle dims), like ``torch.cat`` after an ``expand``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pyrovae.nn.mlp import MLP, activation_layer, check_sizes


class SplitInputMLP(nn.Module):
    """``MLP(sum(in_features), hidden, out_features)`` on ``concat(inputs, -1)``, with the first
    layer split by input (see the module docstring). ``hidden`` needs at least one layer."""

    def __init__(
        self,
        in_features: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
        activation: str = "tanh",
    ):
        super().__init__()
        check_sizes(in_features=list(in_features), hidden=list(hidden), out_features=out_features)
        if not hidden:
            raise ValueError("SplitInputMLP needs at least one hidden layer (hidden = [] has no first layer to split)")
        self.in_features = tuple(int(n) for n in in_features)
        # One bias for the first layer; each input gets its own weight block.
        self.first = nn.ModuleList(nn.Linear(n, hidden[0], bias=index == 0) for index, n in enumerate(self.in_features))
        self.activation = activation_layer(activation)
        self.rest = MLP(hidden[0], list(hidden[1:]), out_features, activation=activation)
        self.out_features = out_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.first):
            raise ValueError(f"SplitInputMLP was built for {len(self.first)} inputs, got {len(inputs)}")
        pre = None
        for layer, value in zip(self.first, inputs):
            term = layer(value)
            pre = term if pre is None else pre + term  # broadcasts over leading dims
        return self.rest(self.activation(pre))
