from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS


@dataclass
class GMVAEConfig:
    clusters: int = 10
    latent_dim: int = 10
    # Decoder p(x | z): z -> hidden -> x.
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    likelihood: str = "bernoulli"
    # Learn the mixture weights pi (softmax of free logits), or keep them uniform.
    learn_weights: bool = False
    # The component means start as draws of Normal(0, init_spread^2 I), the scales at 1.
    init_spread: float = 1.0
    # sigma_k = softplus(raw_k) + min_scale.
    min_scale: float = 1e-3

    def __post_init__(self):
        check_sizes(clusters=self.clusters, latent_dim=self.latent_dim, hidden=self.hidden)
        if not self.clusters >= 2:
            raise ValueError(f"clusters = {self.clusters!r} is not allowed: a mixture needs at least 2")
        for key in ("init_spread", "min_scale"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key} = {value!r} is not allowed: it must be a finite number > 0")


@MODELS.register("gmvae")
class GMVAE(Model):
    """VAE with a Gaussian-mixture prior (Dilokthanakul et al. 2016; Jiang et al. 2017's VaDE
    prior), K clusters:

        y_n ~ Categorical(pi)                               enumerated: summed out exactly
        z_n | y_n ~ Normal(mu_{y_n}, diag(sigma_{y_n}^2))    mu, sigma: K learned vectors
        x_n ~ likelihood(decoder(z_n))

    pi is uniform, or softmax(w) with learned w (``learn_weights``). The site y is marked
    ``infer={"enumerate": "parallel"}``: a guide may enumerate it itself (``gmvae`` guide,
    q(y | x) q(z | x, y)) or leave it to the model (``gmvae_marginal`` guide, q(z | x)), where
    enum_elbo sums it out: log p(z) = log sum_k pi_k N(z; mu_k, sigma_k^2).
    :meth:`cluster_posterior` is p(y | z) = pi_y N(z; mu_y, sigma_y^2) / p(z).
    """

    Config = GMVAEConfig

    def __init__(self, config: GMVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.likelihood = build_likelihood(config.likelihood, data)
        self.decoder = MLP(config.latent_dim, config.hidden, self.likelihood.out_features, activation=config.activation)
        self.component_locs = nn.Parameter(torch.randn(config.clusters, config.latent_dim) * config.init_spread)
        # softplus(0.5413) = 1: unit scales to start.
        self.component_raw_scales = nn.Parameter(torch.full((config.clusters, config.latent_dim), 0.5413))
        self.weight_logits = nn.Parameter(torch.zeros(config.clusters), requires_grad=config.learn_weights)

    @property
    def latent_sites(self):
        return (LatentSite("y", (), discrete=True, enumerated=True), LatentSite("z", (self.config.latent_dim,)))

    def component_scales(self) -> torch.Tensor:
        return F.softplus(self.component_raw_scales) + self.config.min_scale

    def log_weights(self) -> torch.Tensor:
        """log pi, shape (K,)."""
        return self.weight_logits.log_softmax(-1)

    def cluster_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """p(y | z) for z of shape (..., D): probabilities of shape (..., K) that sum to 1."""
        prior = DiagonalNormal(self.component_locs, self.component_scales())  # batch (K,)
        joint = self.log_weights() + prior.log_prob(z.unsqueeze(-2))
        return joint.softmax(-1)

    def forward(self, x: torch.Tensor, **batch):
        rows = x.shape[0]
        with pyro.plate("data", rows, device=x.device):
            weights = self.log_weights().expand(rows, self.config.clusters)
            y = pyro.sample("y", dist.Categorical(logits=weights), infer={"enumerate": "parallel"})
            # y: (B,), or (K, 1.., 1) when enumerated; the component parameters follow it.
            z = pyro.sample("z", DiagonalNormal(self.component_locs[y], self.component_scales()[y]))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
