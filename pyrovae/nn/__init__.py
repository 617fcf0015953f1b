"""Neural building blocks in plain torch. They know nothing of Pyro."""

from pyrovae.nn.mlp import MLP, activation_layer, check_sizes

__all__ = ["MLP", "activation_layer", "check_sizes"]
