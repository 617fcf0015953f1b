"""Inference half of the sentence VAE in ``models/sentence.py``: an LSTM encoder q(z | x)."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal
from pyrovae.errors import DataError
from pyrovae.nn import LSTMEncoder, check_sizes, real_positions
from pyrovae.pair import DataSpec, Guide, Model
from pyrovae.registry import GUIDES
from pyrovae.tokens import PAD


@dataclass
class SentenceLSTMGuideConfig:
    embedding_dim: int = 128
    hidden: int = 256
    # Also read an embedding of the label y: q(z | x, y) (for the rating-conditioned model).
    condition_on_label: bool = False
    label_dim: int = 16
    # Read x through the model's decoder embedding instead of an own one (then embedding_dim must
    # equal the model's; the shared table trains in the model's parameter group).
    share_embedding: bool = False
    # sigma = softplus(raw) + min_scale keeps q from collapsing to a point and log q finite.
    min_scale: float = 1e-4

    def __post_init__(self):
        check_sizes(embedding_dim=self.embedding_dim, hidden=self.hidden, label_dim=self.label_dim)
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@GUIDES.register("sentence_lstm")
class SentenceLSTMGuide(Guide):
    """LSTM encoder of the sentence VAE (Bowman et al. 2016):

        h_n = LSTM(e(x_{n,1}), ..., e(x_{n,L_n}))_{L_n}        state after the last real word (<eos>)
        r_n = h_n, or [h_n, E_y y_n] with ``condition_on_label``
        q(z_n | x_n) = Normal(mu_n, diag sigma_n^2),   mu_n = W_mu r_n + b_mu,
                                                        sigma_n = softplus(W_s r_n + b_s) + min_scale

    The encoder stops at each row's length, so padding never changes q.
    """

    Config = SentenceLSTMGuideConfig

    def __init__(self, config: SentenceLSTMGuideConfig, data: DataSpec, model: Model):
        super().__init__(data)
        sites = model.latent_sites
        if [site.name for site in sites] != ["z"] or len(sites[0].event_shape) != 1:
            raise ValueError(f"sentence_lstm guides one vector latent 'z'; {type(model).__name__} declares {[s.name for s in sites]}")
        if not data.num_categories:
            raise ValueError(f"sentence_lstm reads word ids; data set {data.name!r} has no vocabulary (num_categories)")
        if config.condition_on_label and (not data.num_classes or data.label_format != "integer"):
            raise ValueError(f"condition_on_label = true needs integer labels (num_classes); data set {data.name!r} has none")
        self.config = config
        self.latent_dim = int(sites[0].event_shape[0])
        if config.share_embedding:
            embedding = model.decoder.embedding
            if embedding.embedding_dim != config.embedding_dim:
                raise ValueError(
                    f"share_embedding = true reads the model's embedding of width {embedding.embedding_dim}, "
                    f"but embedding_dim = {config.embedding_dim}: make them equal"
                )
        else:
            embedding = nn.Embedding(data.num_categories, config.embedding_dim, padding_idx=PAD)
        self.encoder = LSTMEncoder(embedding, config.hidden)
        self.label_embedding = nn.Embedding(data.num_classes, config.label_dim) if config.condition_on_label else None
        features = config.hidden + (config.label_dim if config.condition_on_label else 0)
        self.head = nn.Linear(features, 2 * self.latent_dim)

    def forward(self, x: torch.Tensor, mask=None, lengths=None, y=None, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", self.posterior(x, mask, lengths, y))

    def posterior(self, x: torch.Tensor, mask=None, lengths=None, y=None, **batch) -> DiagonalNormal:
        """q(z | x) of every row: the distribution that :meth:`forward` samples site ``z`` from
        (batch shape (N,), event (D,)), one encoder pass per sentence."""
        _, lengths = real_positions(x, mask, lengths)
        features = self.encoder(x, lengths)
        if self.label_embedding is not None:
            if y is None:
                raise DataError(f"{type(self).__name__} conditions on labels (condition_on_label): the batch has no 'y'")
            features = torch.cat([features, self.label_embedding(y.long())], -1)
        loc, raw_scale = self.head(features).chunk(2, -1)
        scale = F.softplus(raw_scale) + self.config.min_scale
        return DiagonalNormal(loc, scale, 1)
