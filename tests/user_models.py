"""The README's 'declare a new model in Python' example, kept runnable: a user model outside pyrovae."""

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch

from pyrovae import LatentSite, Model
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP


@dataclass
class TwoLatentConfig:
    content_dim: int = 16
    style_dim: int = 4
    hidden: list[int] = field(default_factory=lambda: [256])


class TwoLatentVAE(Model):
    """z_c ~ N(0, I), z_s ~ N(0, I),  x ~ Bernoulli(decoder([z_c, z_s]))."""

    Config = TwoLatentConfig

    def __init__(self, config, data):
        super().__init__(data)
        self.config = config
        self.likelihood = build_likelihood("bernoulli", data)
        self.decoder = MLP(config.content_dim + config.style_dim, config.hidden, self.likelihood.out_features)

    @property
    def latent_sites(self):
        return (LatentSite("z_c", (self.config.content_dim,)), LatentSite("z_s", (self.config.style_dim,)))

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            z_c = pyro.sample("z_c", dist.Normal(x.new_zeros(self.config.content_dim), 1.0).to_event(1))
            z_s = pyro.sample("z_s", dist.Normal(x.new_zeros(self.config.style_dim), 1.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(torch.cat([z_c, z_s], -1))), obs=x)
