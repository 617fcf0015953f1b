from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, Guide, Model
from pyrovae.registry import GUIDES


@dataclass
class DiagonalNormalGuideConfig:
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "tanh"
    batch_norm: bool = False
    dropout: float = 0.0
    # sigma = softplus(raw) + min_scale keeps q from collapsing to a point and log q finite.
    min_scale: float = 1e-4

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@GUIDES.register("diag_normal")
class DiagonalNormalGuide(Guide):
    """Amortized mean-field Gaussian guide, one head per continuous latent site s of the model:

        h_n = trunk(x_n)                                       MLP hidden layers, shared by all sites
        mu_s = W_s h_n + b_s,   sigma_s = softplus(V_s h_n + c_s) + min_scale
        z_{n,s} ~ Normal(mu_s, diag(sigma_s^2))                for n in data

    so q(z | x) = prod_s q(z_s | x), amortized over x.
    """

    Config = DiagonalNormalGuideConfig

    def __init__(self, config: DiagonalNormalGuideConfig, data: DataSpec, model: Model):
        super().__init__(data)
        self.config = config
        self.sites = [site for site in model.latent_sites if not site.discrete]
        if len(self.sites) != len(model.latent_sites):
            raise ValueError(f"diag_normal guides continuous latents only; {type(model).__name__} has discrete ones")
        self.site_sizes = [int(torch.Size(site.event_shape).numel()) for site in self.sites]
        # The encoder's last (linear) layer holds every head: [mu_s for s] + [raw sigma_s for s].
        self.encoder = MLP(
            data.x_features,
            config.hidden,
            2 * sum(self.site_sizes),
            activation=config.activation,
            batch_norm=config.batch_norm,
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor, **batch):
        loc, raw_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        scale = F.softplus(raw_scale) + self.config.min_scale
        with pyro.plate("data", x.shape[0], device=x.device):
            for site, loc_s, scale_s in zip(
                self.sites, loc.split(self.site_sizes, -1), scale.split(self.site_sizes, -1)
            ):
                shape = loc_s.shape[:-1] + tuple(site.event_shape)
                pyro.sample(site.name, DiagonalNormal(loc_s.reshape(shape), scale_s.reshape(shape), len(site.event_shape)))
