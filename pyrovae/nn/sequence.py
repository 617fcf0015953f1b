"""Sequence building blocks for sentence models, in plain torch.

- :func:`real_positions`, :func:`teacher_forcing_inputs`, :func:`word_dropout`: what a decoder reads;
- :class:`LSTMEncoder`: the state of an LSTM after each row's last real word (padding never counts);
- :class:`LSTMDecoderCore` and :class:`DilatedCNNDecoderCore`: autoregressive decoders that map
  teacher-forced inputs ``[<bos>, x_1 .. x_{T-1}]`` and an optional conditioning vector c (a
  latent z, a label embedding, both, or nothing) to next-word logits (B, T, V) in one
  whole-sequence call, and decode one word at a time with ``start`` / ``step`` / ``select``.

Token ids are those of :mod:`pyrovae.tokens` (``<pad>`` = 0, ``<unk>``, ``<bos>``, ``<eos>``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.tokens import BOS, PAD, UNK
from pyrovae.nn.mlp import check_sizes


def real_positions(
    x: torch.Tensor, mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, lengths)`` of padded sequences x (B, T) from whichever of them a batch gives
    (mask[n, t] = t < lengths[n]); with neither, every position is real."""
    if mask is None and lengths is None:
        lengths = torch.full(x.shape[:1], x.shape[1], dtype=torch.int64, device=x.device)
    if mask is None:
        mask = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1)
    if lengths is None:
        lengths = mask.sum(-1)
    return mask, lengths


def teacher_forcing_inputs(x: torch.Tensor, bos: int = BOS) -> torch.Tensor:
    """The decoder's inputs [<bos>, x_1, ..., x_{T-1}]: position t reads the words before x_t."""
    return torch.cat([torch.full_like(x[..., :1], bos), x[..., :-1]], -1)


def word_dropout(
    tokens: torch.Tensor, keep: float, training: bool, unk: int = UNK, pad: int = PAD, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Word dropout on decoder inputs (Bowman et al. 2016): each input word is
    replaced by ``<unk>`` with probability 1 - keep, independently, so the decoder must lean on
    its conditioning vector. The leading ``<bos>`` (position 0) and ``<pad>`` positions are kept.
    Identity (the same tensor) when not training; keep = 0 leaves only ``<unk>``.

    In training the uniform draws are taken whatever ``keep`` is (keep = 1 drops nothing), with no
    Python branch on its value: so a compiled step, where ``keep`` is a 0-dim tensor input (a
    scheduled number), runs the same operations and draws as the eager step."""
    if not torch.is_tensor(keep) and not 0.0 <= keep <= 1.0:
        raise ValueError(f"word_keep = {keep!r} is not allowed: a keep rate must lie in [0, 1]")
    if not training:
        return tokens
    drop = torch.rand(tokens.shape, device=tokens.device, generator=generator) >= keep
    drop[..., 0] = False
    return tokens.masked_fill(drop & (tokens != pad), unk)


class LSTMEncoder(nn.Module):
    """h_n = LSTM(e(x_{n,1}), ..., e(x_{n,L_n}))_{L_n}: the output after row n's last real word.

    The LSTM runs left to right over the whole padded batch in one call and the output at
    position L_n - 1 is gathered, so the padding after it never changes h_n.
    """

    def __init__(self, embedding: nn.Embedding, hidden: int):
        super().__init__()
        check_sizes(hidden=hidden)
        self.embedding = embedding
        self.lstm = nn.LSTM(embedding.embedding_dim, hidden, batch_first=True)

    @property
    def out_features(self) -> int:
        return self.lstm.hidden_size

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.embedding(tokens))
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        return outputs.gather(1, last).squeeze(1)


# The output layer and its log-softmax run on slices of at most this many (position, word) logits:
# 8 MB in float32. A whole batch's logits (64 x 40 x 4,592 = 47 MB) would be a fresh allocation of
# the process (glibc maps blocks above 32 MB anew each time), paid for in page faults on every first
# touch: about 20 ms a buffer, four buffers a training step, on the project's CPU.
LOGIT_SLICE_ELEMENTS = 2**21


def word_log_probs(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """log softmax(W h_p + b)[w_p] for features h (P, F) and words w (P,): (P,). The output layer
    and the fused log-softmax of ``cross_entropy`` run on slices of at most ``LOGIT_SLICE_ELEMENTS``
    logits, so no (P, V) tensor, nor its gradient, is ever held whole; the values and gradients are
    those of scoring the whole logits."""
    rows = max(1, LOGIT_SLICE_ELEMENTS // weight.shape[0])
    scores = [
        F.cross_entropy(torch.addmm(bias, part, weight.t()), part_words, reduction="none")
        for part, part_words in zip(features.split(rows), words.split(rows))
    ]
    return -torch.cat(scores)


class DecoderCore(nn.Module):
    """Shared shape handling of the autoregressive decoders.

    ``forward(inputs, context)``: inputs (*lead, T) token ids, context (*lead, C) or None (a
    context with more leading dims than the inputs, e.g. vectorized particles (K, B, C) against
    inputs (B, T), broadcasts them); returns logits (*lead, T, V). Decoding keeps a state:
    ``state = start(context, rows)``, then ``logits, state = step(tokens, state)`` per word
    ((rows,) ids in, (rows, V) logits out) and ``select(state, index)`` to reorder rows (beams).
    """

    def __init__(self, vocabulary: int, embedding_dim: int, context_dim: int, dropout: float):
        super().__init__()
        check_sizes(vocabulary=vocabulary, embedding_dim=embedding_dim)
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim = {context_dim!r} is not allowed: it must be an integer >= 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout!r} is not allowed: it must lie in [0, 1)")
        self.context_dim = context_dim
        self.embedding = nn.Embedding(vocabulary, embedding_dim, padding_idx=PAD)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., T, V) of inputs (..., T) and a context (..., C) or None.

        The output layer runs on the (rows * T, F) matrix of features: on a 3-d input whose weight
        does not require gradients (a guide-only step of aggressive training), ``nn.Linear`` would
        run a batched product with the weight broadcast to every row, about 3x slower on the CPU."""
        features = self.output_features(inputs, context)
        logits = self.output(features.reshape(-1, features.shape[-1]))
        return logits.view(features.shape[:-1] + logits.shape[-1:])

    def output_features(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """What the output layer reads (..., T, F), dropout applied, for inputs (..., T) and a
        context (..., C) or None: logits = ``output`` of them."""
        self._check_context(context)
        if context is None:
            lead = inputs.shape[:-1]
        else:
            lead = torch.broadcast_shapes(inputs.shape[:-1], context.shape[:-1])
            context = context.expand(lead + context.shape[-1:]).reshape(-1, context.shape[-1])
        flat = inputs.expand(lead + inputs.shape[-1:]).reshape(-1, inputs.shape[-1])
        features = self.dropout(self.features(flat, context))
        return features.reshape(lead + features.shape[-2:])

    def features(self, inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """What the output layer reads at each position, (rows, T, F)."""
        raise NotImplementedError

    def sequence_log_prob(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """sum_{t : mask[r, t]} log softmax(logits_{r, t})[targets_{r, t}] per row r, (rows,), for
        rows of ``inputs``, ``targets`` and ``mask`` (rows, T) and a context (rows, C) or None.

        The same numbers as scoring :meth:`forward`'s logits, computed without ever holding them:
        the output layer runs only at the real positions, through :func:`word_log_probs`."""
        features = self.output_features(inputs, context)
        real = mask.reshape(-1).nonzero().squeeze(-1)
        at_real = features.reshape(-1, features.shape[-1]).index_select(0, real)
        scores = word_log_probs(at_real, self.output.weight, self.output.bias, targets.reshape(-1).index_select(0, real))
        return features.new_zeros(mask.shape[0]).index_add_(0, real // mask.shape[1], scores)

    def _check_context(self, context: torch.Tensor | None) -> None:
        width = 0 if context is None else context.shape[-1]
        if width != self.context_dim:
            raise ValueError(f"{type(self).__name__} was built for a context of width {self.context_dim}, got {width}")

    def _embedded_inputs(self, inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """[e(w_t), c] at every position (just e(w_t) without a context)."""
        embedded = self.dropout(self.embedding(inputs))
        if context is None:
            return embedded
        return torch.cat([embedded, context.unsqueeze(1).expand(-1, inputs.shape[1], -1)], -1)


@contextlib.contextmanager
def _without_weight_gradients_on_cpu(lstm: nn.LSTM):
    """Run a CPU ``nn.LSTM`` whose weights are frozen (``requires_grad`` off: a guide-only step of
    aggressive training) on torch's native kernel instead of oneDNN's. oneDNN's LSTM backward
    computes the weight gradients whether or not they are wanted; the native one leaves them out,
    which halves the backward at the sentence VAE's sizes (the same input gradients, to float
    rounding). Trained weights, no gradient, or CUDA: nothing changes. Yields whether it switched.
    The switch is torch's process-wide flag: a program that trains in several threads of one
    process could see another thread's LSTM (or convolution) take the native kernel meanwhile,
    which changes its speed, not its values."""
    weight = lstm.weight_hh_l0
    if not (torch.is_grad_enabled() and weight.device.type == "cpu" and not weight.requires_grad and torch.backends.mkldnn.enabled):
        yield False
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield True
    finally:
        torch.backends.mkldnn.enabled = before


class LSTMState(NamedTuple):
    h: torch.Tensor  # (1, rows, H)
    c: torch.Tensor  # (1, rows, H)
    context: torch.Tensor | None  # (rows, C)


class LSTMDecoderCore(DecoderCore):
    """LSTM language-model decoder (Bowman et al. 2016):

        (h_0, c_0) = W_0 c + b_0                      (zeros without a context)
        h_t = LSTM(h_{t-1}, [e(w_{t-1}), c])           c at every step if ``context_every_step``,
                                                       else just e(w_{t-1})
        logits_t = W_o h_t + b_o                       p(x_t | x_<t, c) = softmax(logits_t)

    with w_0 = ``<bos>``. Training runs ``nn.LSTM`` once over the whole sequence; decoding
    carries (h, c) from word to word, so a sentence of T words costs O(T).
    """

    def __init__(
        self,
        vocabulary: int,
        embedding_dim: int,
        hidden: int,
        context_dim: int = 0,
        context_every_step: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(vocabulary, embedding_dim, context_dim, dropout)
        check_sizes(hidden=hidden)
        self.context_every_step = context_every_step and context_dim > 0
        self.lstm = nn.LSTM(embedding_dim + (context_dim if self.context_every_step else 0), hidden, batch_first=True)
        self.initial_state = nn.Linear(context_dim, 2 * hidden) if context_dim > 0 else None
        self.output = nn.Linear(hidden, vocabulary)

    def _initial(self, context: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.initial_state is None:
            zeros = self.output.weight.new_zeros(1, rows, self.lstm.hidden_size)
            return zeros, zeros
        h, c = self.initial_state(context).unsqueeze(0).chunk(2, -1)
        return h.contiguous(), c.contiguous()

    def features(self, inputs, context):
        step_context = context if self.context_every_step else None
        embedded = self._embedded_inputs(inputs, step_context)
        with _without_weight_gradients_on_cpu(self.lstm) as native:
            if native:
                # Time-major in memory, so the native kernel's input projection is one matrix product.
                embedded = embedded.transpose(0, 1).contiguous().transpose(0, 1)
            outputs, _ = self.lstm(embedded, self._initial(context, inputs.shape[0]))
        return outputs

    def start(self, context: torch.Tensor | None, rows: int) -> LSTMState:
        self._check_context(context)
        return LSTMState(*self._initial(context, rows), context)

    def step(self, tokens: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        step_context = state.context if self.context_every_step else None
        outputs, (h, c) = self.lstm(self._embedded_inputs(tokens.unsqueeze(1), step_context), (state.h, state.c))
        return self.output(self.dropout(outputs[:, 0])), LSTMState(h, c, state.context)

    def select(self, state: LSTMState, index: torch.Tensor) -> LSTMState:
        context = None if state.context is None else state.context.index_select(0, index)
        return LSTMState(state.h.index_select(1, index), state.c.index_select(1, index), context)


class CausalConvBlock(nn.Module):
    """Residual block of a causal dilated convolution (Yang et al. 2017, after van den Oord et al. 2016):

        h' = h + Dropout(Conv_{k, d}(ReLU(h)))     Conv_{k, d} reads positions t, t-d, ..., t-(k-1)d

    left-padded with (k - 1) d zeros, so position t never sees a later position."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.padding = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, channels, T)
        return h + self.dropout(self.conv(F.pad(F.relu(h), (self.padding, 0))))


class CNNState(NamedTuple):
    prefix: torch.Tensor  # (rows, t) the words read so far, at most the receptive field
    context: torch.Tensor | None  # (rows, C)


class DilatedCNNDecoderCore(DecoderCore):
    """Causal dilated-CNN decoder (Yang et al. 2017):

        u_t = W_in [e(w_{t-1}), c] + b_in                      (c left out without a context)
        h^0 = u,  h^l = h^{l-1} + Conv_{k, d_l}(ReLU(h^{l-1}))  for d_l in ``dilations``
        logits_t = W_o ReLU(h^L_t) + b_o                       p(x_t | x_<t, c) = softmax(logits_t)

    with w_0 = ``<bos>``. Logits at t depend on the last 1 + (k - 1) sum_l d_l inputs only (the
    receptive field); decoding recomputes the network over that window of the prefix.
    """

    def __init__(
        self,
        vocabulary: int,
        embedding_dim: int,
        channels: int,
        dilations: Sequence[int] = (1, 2, 4),
        kernel_size: int = 3,
        context_dim: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__(vocabulary, embedding_dim, context_dim, dropout)
        check_sizes(channels=channels, dilations=list(dilations), kernel_size=kernel_size)
        self.input = nn.Linear(embedding_dim + context_dim, channels)
        self.blocks = nn.Sequential(*(CausalConvBlock(channels, kernel_size, d, dropout) for d in dilations))
        self.output = nn.Linear(channels, vocabulary)
        self.receptive_field = 1 + (kernel_size - 1) * sum(dilations)

    def features(self, inputs, context):
        embedded = self._embedded_inputs(inputs, context)
        # On the flat (rows * T, E) matrix, as the output layer (see DecoderCore.forward).
        hidden = self.input(embedded.reshape(-1, embedded.shape[-1])).view(embedded.shape[:-1] + (-1,)).transpose(1, 2)
        return F.relu(self.blocks(hidden).transpose(1, 2))

    def start(self, context: torch.Tensor | None, rows: int) -> CNNState:
        self._check_context(context)
        return CNNState(self.output.weight.new_empty((rows, 0), dtype=torch.int64), context)

    def step(self, tokens: torch.Tensor, state: CNNState) -> tuple[torch.Tensor, CNNState]:
        prefix = torch.cat([state.prefix, tokens.unsqueeze(1)], 1)[:, -self.receptive_field :]
        return self.output(self.output_features(prefix, state.context)[:, -1]), CNNState(prefix, state.context)

    def select(self, state: CNNState, index: torch.Tensor) -> CNNState:
        context = None if state.context is None else state.context.index_select(0, index)
        return CNNState(state.prefix.index_select(0, index), context)
