"""Sentence models: the LSTM sentence VAE of Bowman et al. 2016, its dilated-CNN-decoder variant
(Yang et al. 2017), the rating-conditioned text VAE, and the language-model baseline without a latent.

Both registered models share one decoder (:class:`SentenceDecoderModel`): an autoregressive
core from :mod:`pyrovae.nn.sequence` reading the teacher-forced words [<bos>, x_1 .. x_{T-1}]
and a conditioning vector c (z, a label embedding, both or nothing). The observation site

    x_n ~ prod_{t < L_n} Categorical(x_{n,t} | softmax(logits_{n,t}))

scores the real positions only (``Distribution.mask``), so padding adds exactly 0 to every
log-probability. The same decoder decodes word by word (:mod:`pyrovae.analysis.decoding`) with

    context = model.decoder_context(z, y)            # c, or None
    state = model.start_decoding(context, rows)
    logits, state = model.next_token_logits(tokens, state)   # (rows,) ids -> (rows, V)
    state = model.select_states(state, index)        # reorder rows (beam search)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import nn

from pyrovae.distributions import StandardNormal
from pyrovae.errors import DataError
from pyrovae.likelihoods import ProjectedWordCategorical
from pyrovae.nn import MLP, DilatedCNNDecoderCore, LSTMDecoderCore, check_sizes, real_positions, teacher_forcing_inputs, word_dropout
from pyrovae.pair import DataSpec, LatentSite, Model, auxiliary_term
from pyrovae.registry import MODELS
from pyrovae.tokens import EOS, SPECIAL_TOKENS

DECODERS = ("lstm", "dilated_cnn")


@dataclass
class SentenceDecoderConfig:
    embedding_dim: int = 128
    # LSTM decoder: the state size.
    hidden: int = 256
    decoder: str = "lstm"
    # Dilated-CNN decoder: one residual block per dilation, kernel_size wide, channels deep.
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    kernel_size: int = 3
    channels: int = 256
    # Condition the decoder on an embedding of the label y (e.g. a review's rating), label_dim wide.
    condition_on_label: bool = False
    label_dim: int = 16
    # Dropout on the decoder's input embeddings and on its outputs before the softmax layer.
    dropout: float = 0.0

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder = {self.decoder!r} is not allowed: choose one of {', '.join(DECODERS)}")
        check_sizes(
            embedding_dim=self.embedding_dim,
            hidden=self.hidden,
            dilations=self.dilations,
            kernel_size=self.kernel_size,
            channels=self.channels,
            label_dim=self.label_dim,
        )
        if self.kernel_size < 2:
            raise ValueError(f"kernel_size = {self.kernel_size} is not allowed: a causal convolution needs >= 2 to see earlier words")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout!r} is not allowed: it must lie in [0, 1)")


@dataclass
class SentenceVAEConfig(SentenceDecoderConfig):
    latent_dim: int = 32
    # LSTM decoder: also concatenate c = z (and the label embedding) to every input embedding, not
    # only initialise the state from it (the dilated CNN always reads c at every input).
    z_every_step: bool = True
    # Zhao et al. 2017's bag-of-words loss: in training, also predict the sentence's words, in
    # any order, from z alone, weighted so (0: off). An auxiliary term, not part of p(x, z).
    bag_of_words_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_sizes(latent_dim=self.latent_dim)
        if not 0.0 <= self.bag_of_words_weight < float("inf"):
            raise ValueError(f"bag_of_words_weight = {self.bag_of_words_weight!r} is not allowed: it must be a finite number >= 0 (0 turns it off)")
        if not self.z_every_step and self.decoder != "lstm":
            raise ValueError("z_every_step = false needs decoder = 'lstm': the dilated CNN has no state to start from z")


@dataclass
class LanguageModelConfig(SentenceDecoderConfig):
    """The decoder's options; there is no latent to configure."""


class SentenceDecoderModel(Model):
    """The decoder shared by :class:`SentenceVAE` and :class:`LanguageModel`:

        c_n = [z_n, E_y y_n]  (the parts the model has)
        x_{n,t} ~ Categorical(softmax(core([<bos>, x_{n,1} .. x_{n,t-1}], c_n)_t))   t < L_n

    with core the LSTM or dilated-CNN decoder of :mod:`pyrovae.nn.sequence`. Word dropout
    (keep rate ``word_keep``, a scheduled input) replaces decoder inputs by <unk> in training.
    """

    scheduled_inputs = {"word_keep": 1.0}

    def __init__(self, config: SentenceDecoderConfig, data: DataSpec, latent_size: int = 0, context_every_step: bool = True):
        super().__init__(data)
        self.latent_size = latent_size
        name = type(self).__name__
        if data.support != "categorical" or not data.num_categories or data.num_categories <= EOS:
            raise ValueError(
                f"{name} needs word ids (support 'categorical', num_categories >= {len(SPECIAL_TOKENS)} for "
                f"{' '.join(SPECIAL_TOKENS)}); data set {data.name!r} has support {data.support!r}, "
                f"num_categories {data.num_categories}"
            )
        if config.condition_on_label and (not data.num_classes or data.label_format != "integer"):
            raise ValueError(
                f"condition_on_label = true needs integer labels (num_classes); data set {data.name!r} has "
                f"num_classes {data.num_classes}, label_format {data.label_format!r}"
            )
        self.config = config
        self.label_embedding = nn.Embedding(data.num_classes, config.label_dim) if config.condition_on_label else None
        context_dim = self.latent_size + (config.label_dim if config.condition_on_label else 0)
        vocabulary = data.num_categories
        if config.decoder == "lstm":
            self.decoder = LSTMDecoderCore(
                vocabulary, config.embedding_dim, config.hidden, context_dim, context_every_step, config.dropout
            )
        else:
            self.decoder = DilatedCNNDecoderCore(
                vocabulary, config.embedding_dim, config.channels, config.dilations, config.kernel_size, context_dim, config.dropout
            )

    def check_batch(self, batch) -> None:
        if self.config.condition_on_label:
            if "y" not in batch:
                raise DataError(
                    f"{type(self).__name__} conditions on labels (condition_on_label): batch['y'] is missing (keys {sorted(batch)})"
                )
            y_mask = batch.get("y_mask")
            if torch.is_tensor(y_mask) and not bool(y_mask.all()):
                row = int((~y_mask).nonzero()[0])
                raise DataError(
                    f"batch['y_mask'] row {row} is False: {type(self).__name__} conditions on every label and would "
                    "read a hidden label as class 0; use fully labelled data"
                )
        super().check_batch(batch)

    @property
    def conditions_on_label(self) -> bool:
        return self.label_embedding is not None

    def label_context(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """E_y y (None when the model does not condition on labels)."""
        if self.label_embedding is None:
            return None
        if y is None:
            raise ValueError(f"{type(self).__name__} was built with condition_on_label = true: give the labels y")
        return self.label_embedding(y.long())

    def decoder_context(self, z: torch.Tensor | None, y: torch.Tensor | None = None) -> torch.Tensor | None:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None, word_keep: float) -> None:
        """The observation site ``x``, inside the caller's data plate."""
        inputs = word_dropout(teacher_forcing_inputs(x), word_keep, self.training)
        output = self.decoder.output
        features = self.decoder.output_features(inputs, context)
        words = ProjectedWordCategorical(features, output.weight, output.bias, validate_args=False).mask(mask).to_event(1)
        pyro.sample("x", words, obs=x)

    # --- the fast importance-sampled likelihood (pyrovae.analysis.likelihood) -------------------

    def conditional_log_prob(self, z: torch.Tensor | None, x: torch.Tensor, mask=None, lengths=None, y=None, **batch):
        """log p(x_n | z_{k,n}) = sum_{t < L_n} log p(x_{n,t} | x_{n,<t}, c_{k,n}) for particles z
        (K, N, D) of the N rows of x (N, T): (K, N). The K particles are folded into the rows of
        one decoder call; the output layer runs at the real positions only
        (:meth:`~pyrovae.nn.sequence.DecoderCore.sequence_log_prob`). Word dropout is not applied:
        this is the evaluation density (the site ``x`` of :meth:`forward` in eval mode).
        ``z = None``: the language model, (1, N)."""
        mask, _ = real_positions(x, mask, lengths)
        if z is None:
            context = self.decoder_context(None, y)
            particles = 1
        else:
            particles = z.shape[0]
            labels = None if y is None else y.expand((particles,) + y.shape)
            context = self.decoder_context(z, labels)
        rows = particles * x.shape[0]
        expand = lambda t: t.expand((particles,) + t.shape).reshape((rows,) + t.shape[1:])  # noqa: E731
        flat_context = None if context is None else context.expand((particles, x.shape[0], context.shape[-1])).reshape(rows, -1)
        scores = self.decoder.sequence_log_prob(
            expand(teacher_forcing_inputs(x)), expand(x), expand(mask), flat_context
        )
        return scores.view(particles, x.shape[0])

    def latent_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) summed over the latent's dimensions, (...) for z (..., D): the prior of site ``z``."""
        return StandardNormal(z.shape[:-1], z.shape[-1:], dtype=z.dtype, device=z.device).log_prob(z)

    # --- decoding, one word at a time (pyrovae.analysis.decoding) ------------------------------

    def start_decoding(self, context: torch.Tensor | None, rows: int):
        return self.decoder.start(context, rows)

    def next_token_logits(self, tokens: torch.Tensor, state):
        """(logits of the next word (rows, V), the new state) after reading ``tokens`` (rows,)."""
        return self.decoder.step(tokens, state)

    def select_states(self, state, index: torch.Tensor):
        return self.decoder.select(state, index)


@MODELS.register("sentence_vae")
class SentenceVAE(SentenceDecoderModel):
    """Sentence VAE (Bowman et al. 2016; with ``decoder = "dilated_cnn"``, Yang et al. 2017), generative half:

        z_n ~ Normal(0, I_D)
        c_n = z_n, or [z_n, E_y y_n] with ``condition_on_label`` (the rating-conditioned text VAE)
        LSTM:  (h_0, c_0) = W_0 c_n + b_0,  h_t = LSTM(h_{t-1}, [e(w_{t-1}), c_n])   ([e(w_{t-1})] alone
               unless ``z_every_step``);  CNN: causal dilated convolutions over [e(w_{t-1}), c_n]
        x_{n,t} ~ Categorical(softmax(W_o h_t + b_o))         for the real positions t < L_n only

    with w_0 = <bos> and w_{t-1} = x_{n,t-1}, or <unk> with probability 1 - ``word_keep`` in
    training (word dropout). The inference network is the ``sentence_lstm`` guide.

    With ``bag_of_words_weight = lambda > 0`` (Zhao et al. 2017), training also maximises

        lambda sum_{t < L_n, x_{n,t} != <eos>} log softmax(f_bow(z_n))_{x_{n,t}},
        f_bow = Linear -> tanh -> Linear (latent_dim -> hidden -> V),

    which only z can serve (f_bow sees no earlier words), so the guide must put the sentence's
    words into z. It is an auxiliary term (:func:`pyrovae.pair.auxiliary_term`): absent in eval
    mode, and left out of the elbo, the NLL and every other reported number.
    """

    Config = SentenceVAEConfig

    def __init__(self, config: SentenceVAEConfig, data: DataSpec):
        super().__init__(config, data, latent_size=config.latent_dim, context_every_step=config.z_every_step)
        self.bag_of_words = (
            MLP(config.latent_dim, [config.hidden], data.num_categories) if config.bag_of_words_weight else None
        )

    def bag_of_words_log_prob(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum_{t < L_n, x_{n,t} != <eos>} log softmax(f_bow(z_n))_{x_{n,t}}: (..., N) for z (..., N, D)
        and x, mask (N, T)."""
        log_probs = torch.log_softmax(self.bag_of_words(z), -1)
        words = log_probs.gather(-1, x.expand(log_probs.shape[:-2] + x.shape))
        return (words * (mask & (x != EOS)).to(words.dtype)).sum(-1)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def decoder_context(self, z: torch.Tensor | None, y: torch.Tensor | None = None) -> torch.Tensor:
        """c = z, or [z, E_y y]."""
        if z is None or z.shape[-1] != self.config.latent_dim:
            shape = None if z is None else tuple(z.shape)
            raise ValueError(f"{type(self).__name__} decodes z of shape (..., {self.config.latent_dim}); got {shape}")
        label = self.label_context(y)
        if label is None:
            return z
        return torch.cat([z, label.expand(z.shape[:-1] + label.shape[-1:])], -1)

    def forward(self, x: torch.Tensor, mask=None, lengths=None, y=None, word_keep: float = 1.0, **batch):
        mask, _ = real_positions(x, mask, lengths)
        with pyro.plate("data", x.shape[0], device=x.device):
            prior = StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=self.decoder.output.weight.dtype, device=x.device)
            z = pyro.sample("z", prior)
            self.observe(x, mask, self.decoder_context(z, y), word_keep)
            if self.config.bag_of_words_weight and self.training:
                auxiliary_term("bag_of_words", self.config.bag_of_words_weight * self.bag_of_words_log_prob(z, x, mask))


@MODELS.register("language_model")
class LanguageModel(SentenceDecoderModel):
    """Language-model baseline of Bowman et al. 2016, without a latent variable:

        c_n = E_y y_n with ``condition_on_label``, else nothing
        x_{n,t} ~ Categorical(softmax(decoder([<bos>, x_{n,1} .. x_{n,t-1}], c_n)_t))   t < L_n

    with the same decoder as :class:`SentenceVAE`. Train it with the ``no_latents`` guide: the
    ELBO is then log p(x) itself.
    """

    Config = LanguageModelConfig

    @property
    def latent_sites(self):
        return ()

    def decoder_context(self, z: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor | None:
        """c = E_y y, or None. The model has no z: only None or a (rows, 0) placeholder is accepted."""
        if z is not None and z.shape[-1] != 0:
            raise ValueError(f"{type(self).__name__} has no latent z; decode with z = None, got z of shape {tuple(z.shape)}")
        return self.label_context(y)

    def forward(self, x: torch.Tensor, mask=None, lengths=None, y=None, word_keep: float = 1.0, **batch):
        mask, _ = real_positions(x, mask, lengths)
        with pyro.plate("data", x.shape[0], device=x.device):
            self.observe(x, mask, self.decoder_context(None, y), word_keep)
