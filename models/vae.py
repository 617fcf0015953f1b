from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch

from pyrovae.distributions import StandardNormal
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS


@dataclass
class GaussianVAEConfig:
    latent_dim: int = 50
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "tanh"
    likelihood: str = "bernoulli"
    # Gaussian likelihood only: a fixed observation scale, or None to learn one per feature.
    observation_scale: float | None = None
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        check_sizes(latent_dim=self.latent_dim, hidden=self.hidden)
        if self.observation_scale is not None and not self.observation_scale > 0:
            raise ValueError(f"observation_scale = {self.observation_scale!r} is not allowed: it must be > 0 (or left out to learn it)")


@MODELS.register("vae")
class GaussianVAE(Model):
    """Gaussian-latent VAE (Kingma and Welling 2014), generative half:

        z_n ~ Normal(0, I_D)                          for n in data
        x_n ~ likelihood(decoder(z_n))                 decoder = MLP: D -> hidden -> out

    where ``likelihood`` is Bernoulli(logits), Gaussian(mean, sigma) or Categorical(logits).
    """

    Config = GaussianVAEConfig

    def __init__(self, config: GaussianVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        options = {"scale": config.observation_scale} if config.likelihood == "gaussian" else {}
        self.likelihood = build_likelihood(config.likelihood, data, **options)
        self.decoder = MLP(
            config.latent_dim,
            config.hidden,
            self.likelihood.out_features,
            activation=config.activation,
            batch_norm=config.batch_norm,
            dropout=config.dropout,
        )

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x: torch.Tensor, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            # Built at the plate's batch shape so the plate has nothing to broadcast.
            prior = StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device)
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
