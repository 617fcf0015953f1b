from __future__ import annotations

from typing import Sequence

from torch import nn

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def activation_layer(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(sorted(_ACTIVATIONS))}") from None


def check_sizes(**sizes: int | Sequence[int]) -> None:
    """Raise ValueError naming the key unless every size (an integer, or each of a list of them) is >= 1,
    e.g. ``check_sizes(latent_dim=config.latent_dim, hidden=config.hidden)`` in a config's ``__post_init__``."""
    for key, value in sizes.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"{key} = {value!r} is not allowed: every size must be an integer >= 1")


class MLP(nn.Sequential):
    """in_features -> [Linear -> (BatchNorm) -> activation -> (Dropout)] * len(hidden) -> Linear -> out_features.

    The last layer is linear: heads (likelihoods, Normal parameters) decide what its outputs mean.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "tanh",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        check_sizes(in_features=in_features, hidden=list(hidden), out_features=out_features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(activation_layer(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, inputs):
        if inputs.dim() == 2:
            return super().forward(inputs)
        # BatchNorm1d wants (N, C): fold particle dims into the batch and unfold after.
        leading = inputs.shape[:-1]
        outputs = super().forward(inputs.reshape(-1, inputs.shape[-1]))
        return outputs.reshape(*leading, self.out_features)
