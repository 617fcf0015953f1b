"""Synthetic sentences from an LSTM with a scalar latent: the data of He et al. 2019, section 3
("Lagging inference networks and posterior collapse"), where the true posterior is known.

The generator :class:`LatentLSTMGenerator` is a one-layer LSTM language model with random,
fixed weights, driven by one latent number per sentence:

    z_n ~ Normal(0, 1)
    (h_0, c_0) = W_0 z_n + b_0
    h_t = LSTM(h_{t-1}, [e(w_{t-1}), z_n])                  w_0 = <bos>
    w_t ~ Categorical(softmax(W_o h_t + b_o) over the word ids >= 4)      t = 1 .. length
    x_n = [w_1, ..., w_length, <eos>]                        (every row length + 1 ids)

The special ids (:data:`~pyrovae.data.text.PAD` ... :data:`~pyrovae.data.text.EOS`) are never
drawn as words, and the last position is always ``<eos>``, so x follows the text rows' contract
(:mod:`pyrovae.data.text`). Weights are drawn uniformly from [-a, a] with a = ``weight_scale``
for the embedding and the LSTM, ``latent_scale`` for everything z multiplies (W_0 and z's column
of the LSTM's input weights) and ``output_scale`` for W_o (b_o = 0). A large ``latent_scale``
makes the words depend strongly on z, so the true posterior p(z | x) is narrow against the
prior and I(x; z) is clearly above 0; a large ``output_scale`` makes each word less random.

The ``synthetic_lstm`` loader draws train, validation and test sentences from one generator
(seeded: the same options give the same weights and the same data) and returns
:class:`~pyrovae.data.text.TextSplits` with a made-up vocabulary ``w4, w5, ...`` (so runs write
``samples.txt``). Each row also carries its ``true_z`` (float, (B,)), which models and guides
ignore. In TOML::

    [data]
    name = "synthetic_lstm"
    vocabulary_size = 500 # ids, the 4 special ones included
    length = 10           # words per sentence (x has length + 1 ids)
    train = 10000
    valid = 1000
    test = 1000
    hidden = 50
    seed = 0

:meth:`LatentLSTMGenerator.model` is the generator as a Pyro model of the batch contract (the
same keyword arguments as a trained model), so the same code computes the posterior of the truth
and of a trained model.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.data.text import BOS, EOS, SPECIAL_TOKENS, TextSplits, Vocabulary
from pyrovae.data.sequences import sequence_splits
from pyrovae.errors import ConfigError, DataError
# A module import, read at call time: pyrovae.nn.sequence imports pyrovae.data.text, so this
# module may load while pyrovae.nn.sequence is still half-initialised.
import pyrovae.nn.sequence as sequence_blocks
from pyrovae.registry import DATASETS

FIRST_WORD = len(SPECIAL_TOKENS)  # word ids start after <pad> <unk> <bos> <eos>


class LatentLSTMGenerator(nn.Module):
    """The true model of the module docstring: p(z) p(x | z) with fixed random weights.

        log p(x | z) = sum_{t=1}^{length} log softmax_{v >= 4}(W_o h_t + b_o)_{w_t}   (+ log 1 for <eos>)

    ``word_logits`` gives the teacher-forced logits with every impossible id at -inf, so a
    Categorical over them is exactly p(x_t | x_<t, z) at every position, <eos> included.
    """

    def __init__(
        self,
        vocabulary_size: int = 500,
        length: int = 10,
        embedding_dim: int = 50,
        hidden: int = 50,
        weight_scale: float = 0.5,
        latent_scale: float = 2.0,
        output_scale: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        _check_generator_options(vocabulary_size, length, embedding_dim, hidden, weight_scale, latent_scale, output_scale)
        self.vocabulary_size, self.length = vocabulary_size, length
        self.core = sequence_blocks.LSTMDecoderCore(vocabulary_size, embedding_dim, hidden, context_dim=1, context_every_step=True)
        generator = torch.Generator().manual_seed(seed)

        def uniform_(tensor: torch.Tensor, bound: float) -> None:
            tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)

        with torch.no_grad():
            uniform_(self.core.embedding.weight, weight_scale)
            for parameter in self.core.lstm.parameters():
                uniform_(parameter, weight_scale)
            # The LSTM's input is [e(w), z]: its last input column is z's.
            uniform_(self.core.lstm.weight_ih_l0[:, -1], latent_scale)
            uniform_(self.core.initial_state.weight, latent_scale)
            uniform_(self.core.initial_state.bias, weight_scale)
            uniform_(self.core.output.weight, output_scale)
            self.core.output.bias.zero_()
        self.requires_grad_(False)
        # allowed[t, v]: id v can stand at position t (words before the end, <eos> at the end).
        allowed = torch.zeros(length + 1, vocabulary_size, dtype=torch.bool)
        allowed[:length, FIRST_WORD:] = True
        allowed[length, EOS] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def word_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_t = v | x_<t, z) up to a constant per position, (..., length + 1, V): -inf
        where v cannot stand. ``x`` (B, length + 1) ids, ``z`` (..., B, 1) broadcasts over x."""
        logits = self.core(sequence_blocks.teacher_forcing_inputs(x), z)
        return logits.masked_fill(~self.allowed[: x.shape[-1]], -math.inf)

    def model(self, x: torch.Tensor, mask=None, lengths=None, **batch) -> None:
        """The generator as a Pyro model of the batch contract: z ~ N(0, 1), x ~ p(x | z)."""
        mask, _ = sequence_blocks.real_positions(x, mask, lengths)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", dist.Normal(x.new_zeros((), dtype=torch.float32), 1.0).expand([x.shape[0], 1]).to_event(1))
            words = dist.Categorical(logits=self.word_logits(x, z)).mask(mask).to_event(1)
            pyro.sample("x", words, obs=x)

    def sample(self, count: int, generator: torch.Generator, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (count,), x (count, length + 1)): sentences drawn word by word from ``generator``,
        with z drawn from the prior, or the given ``z`` (count,)."""
        z = torch.randn(count, 1, generator=generator) if z is None else z.reshape(count, 1).float()
        state = self.core.start(z, count)
        tokens = torch.full((count,), BOS, dtype=torch.int64)
        words = []
        with torch.no_grad():
            for position in range(self.length):
                logits, state = self.core.step(tokens, state)
                logits = logits.masked_fill(~self.allowed[position], -math.inf)
                tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
                words.append(tokens)
        words.append(torch.full((count,), EOS, dtype=torch.int64))
        return z.squeeze(-1), torch.stack(words, 1)


def _check_generator_options(vocabulary_size, length, embedding_dim, hidden, weight_scale, latent_scale, output_scale) -> None:
    def integer(value) -> bool:
        return isinstance(value, Integral) and not isinstance(value, bool)

    def scale(value) -> bool:
        return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    checks = {
        "vocabulary_size": (integer(vocabulary_size) and vocabulary_size >= FIRST_WORD + 2, f"an integer >= {FIRST_WORD + 2} (4 special ids and 2 words)"),
        "length": (integer(length) and length >= 1, "an integer >= 1"),
        "embedding_dim": (integer(embedding_dim) and embedding_dim >= 1, "an integer >= 1"),
        "hidden": (integer(hidden) and hidden >= 1, "an integer >= 1"),
        "weight_scale": (scale(weight_scale), "a finite number >= 0"),
        "latent_scale": (scale(latent_scale), "a finite number >= 0"),
        "output_scale": (scale(output_scale), "a finite number >= 0"),
    }
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise ConfigError(f"data.{key} = {locals()[key]!r} is not allowed: it must be {allowed}")


def word_vocabulary(size: int) -> Vocabulary:
    """The specials, then made-up words ``w4 .. w{size-1}`` (token ``w<i>`` has id i)."""
    return Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(FIRST_WORD, size)), min_count=1, max_size=size)


@DATASETS.register("synthetic_lstm")
def synthetic_lstm(
    vocabulary_size: int = 500,
    length: int = 10,
    train: int = 10000,
    valid: int = 1000,
    test: int = 1000,
    embedding_dim: int = 50,
    hidden: int = 50,
    weight_scale: float = 0.5,
    latent_scale: float = 2.0,
    output_scale: float = 1.0,
    vocabulary: Path | None = None,
    seed: int = 0,
) -> TextSplits:
    """Sentences of :class:`LatentLSTMGenerator` (see the module docstring): ``train``, ``valid``
    and ``test`` rows, drawn in that order, after the weights, from generators seeded with
    ``seed``. ``vocabulary_size`` counts the ids, the 4 special ones included. ``vocabulary`` (set
    when a run rebuilds its data from its ``vocabulary.json``) must be this data's vocabulary."""
    for key, count in (("train", train), ("valid", valid), ("test", test)):
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 1:
            raise ConfigError(f"data.{key} = {count!r} is not allowed: it must be an integer >= 1")
    generator_model = LatentLSTMGenerator(vocabulary_size, length, embedding_dim, hidden, weight_scale, latent_scale, output_scale, seed)
    words = word_vocabulary(vocabulary_size)
    if vocabulary is not None and Vocabulary.load(vocabulary) != words:
        raise DataError(f"{vocabulary}: not this data's vocabulary (<pad> <unk> <bos> <eos> w4 .. w{vocabulary_size - 1})")
    generator = torch.Generator().manual_seed(seed + 1)  # the data's stream, apart from the weights'
    splits = {}
    for name, count in (("train", train), ("valid", valid), ("test", test)):
        z, x = generator_model.sample(count, generator)
        splits[name] = {"x": x.tolist(), "true_z": z}
    data = sequence_splits(
        splits["train"], splits["test"], valid=splits["valid"], num_categories=vocabulary_size, max_length=length + 1, name="synthetic_lstm"
    )
    return TextSplits(spec=data.spec, train=data.train, valid=data.valid, test=data.test, vocabulary=words)


GENERATOR_OPTIONS = ("vocabulary_size", "length", "embedding_dim", "hidden", "weight_scale", "latent_scale", "output_scale", "seed")


def generator_of(options: dict) -> LatentLSTMGenerator:
    """The :class:`LatentLSTMGenerator` that the ``synthetic_lstm`` loader with these ``[data]``
    options draws from (other keys, e.g. ``name`` and the split sizes, are ignored)."""
    defaults = inspect.signature(synthetic_lstm).parameters
    return LatentLSTMGenerator(*(options.get(key, defaults[key].default) for key in GENERATOR_OPTIONS))
