from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal
from pyrovae.models.gmvae import GMVAE
from pyrovae.nn import MLP, check_sizes
from pyrovae.nn.split_input import SplitInputMLP
from pyrovae.pair import DataSpec, Guide
from pyrovae.registry import GUIDES


@dataclass
class GMVAEGuideConfig:
    # q(z | x, y): [x, onehot(y)] -> hidden -> (mu, sigma).
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    # q(y | x): x -> classifier_hidden -> K logits.
    classifier_hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    min_scale: float = 1e-4

    def __post_init__(self):
        check_sizes(hidden=self.hidden, classifier_hidden=self.classifier_hidden)
        if not len(self.hidden) >= 1:
            raise ValueError("hidden = [] is not allowed: q(z | x, y) needs at least one hidden layer")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


def _check_model(model) -> None:
    if not isinstance(model, GMVAE):
        raise ValueError(f"the GMVAE guides need a GMVAE model (clusters y, latent z); got {type(model).__name__}")


@GUIDES.register("gmvae")
class GMVAEGuide(Guide):
    """q(y | x) q(z | x, y) for the Gaussian-mixture VAE, y enumerated in the guide:

        q(y_n | x_n)      = Categorical(softmax(classifier(x_n)))             enumerated over K clusters
        q(z_n | x_n, y_n) = Normal(mu, diag(sigma^2)),  [mu, raw] = encoder([x_n, onehot(y_n)]),
                            sigma = softplus(raw) + min_scale

    so the bound is sum_y q(y | x) [E_q(z|x,y)[log p(x | z) + log p(z | y) - log q(z | x, y)]
    + log pi_y - log q(y | x)]. The encoder's first layer is split by input, so x is multiplied
    once for all K values. :meth:`cluster` is q(y | x).
    """

    Config = GMVAEGuideConfig

    def __init__(self, config: GMVAEGuideConfig, data: DataSpec, model: GMVAE):
        super().__init__(data)
        _check_model(model)
        self.config = config
        self.clusters = int(model.config.clusters)
        latent = int(model.config.latent_dim)
        self.classifier = MLP(data.x_features, config.classifier_hidden, self.clusters, activation=config.activation)
        self.encoder = SplitInputMLP((data.x_features, self.clusters), config.hidden, 2 * latent, activation=config.activation)

    def cluster(self, x: torch.Tensor, **batch) -> torch.Tensor:
        """q(y | x): probabilities of shape (B, K) that sum to 1."""
        return self.classifier(x.reshape(x.shape[0], -1)).softmax(-1)

    def forward(self, x: torch.Tensor, **batch):
        flat = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0], device=x.device):
            y = pyro.sample("y", dist.Categorical(logits=self.classifier(flat)), infer={"enumerate": "parallel"})
            loc, raw_scale = self.encoder(flat, F.one_hot(y, self.clusters).to(x.dtype)).chunk(2, -1)
            pyro.sample("z", DiagonalNormal(loc, F.softplus(raw_scale) + self.config.min_scale))


@dataclass
class GMVAEMarginalGuideConfig:
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    min_scale: float = 1e-4

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@GUIDES.register("gmvae_marginal")
class GMVAEMarginalGuide(Guide):
    """q(z | x) alone for the Gaussian-mixture VAE; the model sums y out (enum_elbo):

        q(z_n | x_n) = Normal(mu(x_n), diag(sigma(x_n)^2))
        bound = E_q(z|x)[log p(x | z) + log sum_k pi_k N(z; mu_k, sigma_k^2) - log q(z | x)]

    :meth:`cluster` is the model's p(y | z) at z = mu(x) (as VaDE assigns clusters).
    """

    Config = GMVAEMarginalGuideConfig

    def __init__(self, config: GMVAEMarginalGuideConfig, data: DataSpec, model: GMVAE):
        super().__init__(data)
        _check_model(model)
        self.config = config
        self.model = [model]  # read, not owned: a list keeps its parameters out of this module
        self.encoder = MLP(data.x_features, config.hidden, 2 * int(model.config.latent_dim), activation=config.activation)

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        return loc, F.softplus(raw_scale) + self.config.min_scale

    def cluster(self, x: torch.Tensor, **batch) -> torch.Tensor:
        """p(y | z = mu(x)): probabilities of shape (B, K) that sum to 1."""
        return self.model[0].cluster_posterior(self._posterior(x)[0])

    def forward(self, x: torch.Tensor, **batch):
        loc, scale = self._posterior(x)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", DiagonalNormal(loc, scale))
