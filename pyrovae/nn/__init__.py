"""Neural building blocks in plain torch. They know nothing of Pyro."""

from pyrovae.nn.augment import random_shift
from pyrovae.nn.conv import ConvNet
from pyrovae.nn.mlp import MLP, activation_layer, check_sizes
from pyrovae.nn.sequence import (
    CausalConvBlock,
    DecoderCore,
    DilatedCNNDecoderCore,
    LSTMDecoderCore,
    LSTMEncoder,
    real_positions,
    teacher_forcing_inputs,
    word_dropout,
)

__all__ = [
    "MLP", "activation_layer", "check_sizes", "ConvNet", "random_shift",
    "CausalConvBlock", "DecoderCore", "DilatedCNNDecoderCore", "LSTMDecoderCore", "LSTMEncoder",
    "real_positions", "teacher_forcing_inputs", "word_dropout",
]
