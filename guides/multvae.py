"""The inference network of Mult-VAE (Liang et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch

from pyrovae.distributions import DiagonalNormal
from pyrovae.models.multvae import NormalizedInputDropout
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, Guide, Model
from pyrovae.registry import GUIDES


@dataclass
class MultVAEEncoderConfig:
    # items -> 600 -> (mu, log sigma^2) of the latent in the paper.
    hidden: list[int] = field(default_factory=lambda: [600])
    activation: str = "tanh"
    # Dropout on the L2-normalised input, training only (0.5 in the paper).
    dropout: float = 0.5

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout!r} is not allowed: it must lie in [0, 1)")


@GUIDES.register("mult_vae_encoder")
class MultVAEEncoder(Guide):
    """q(z | x) of Mult-VAE, for a model with one continuous latent site z (``mult_vae``):

        x~_n = dropout(x_n / ||x_n||_2)                       in training; x_n / ||x_n||_2 in evaluation
        h_n = g(x~_n)                                         g = MLP hidden layers, tanh
        [mu_n, log sigma_n^2] = W h_n + b
        z_n ~ Normal(mu_n, diag(sigma_n^2))                   for n in data

    The variance is parameterised by its log, as in the paper. Ranking metrics score a user at
    z = mu_n (the mean of q), without dropout.
    """

    Config = MultVAEEncoderConfig

    def __init__(self, config: MultVAEEncoderConfig, data: DataSpec, model: Model):
        super().__init__(data)
        sites = list(model.latent_sites)
        if len(sites) != 1 or sites[0].discrete:
            raise ValueError(f"mult_vae_encoder guides one continuous latent site; {type(model).__name__} declares {[s.name for s in sites]}")
        self.config = config
        self.site = sites[0]
        self.latent_size = int(torch.Size(self.site.event_shape).numel())
        self.corrupt = NormalizedInputDropout(config.dropout)
        self.encoder = MLP(data.x_features, config.hidden, 2 * self.latent_size, activation=config.activation)

    def forward(self, x: torch.Tensor, **batch):
        loc, log_variance = self.encoder(self.corrupt(x.reshape(x.shape[0], -1))).chunk(2, -1)
        shape = loc.shape[:-1] + tuple(self.site.event_shape)
        scale = (0.5 * log_variance).exp()
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample(self.site.name, DiagonalNormal(loc.reshape(shape), scale.reshape(shape), len(self.site.event_shape)))
