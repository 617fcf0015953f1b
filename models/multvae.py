"""Variational and denoising autoencoders with a multinomial likelihood for collaborative filtering
(Liang, Krishnan, Hoffman and Jebara 2018, "Variational Autoencoders for Collaborative Filtering").

A row x_n counts the items user n clicked (0/1 for MovieLens); N_n = sum_i x_ni. Both models put
a multinomial over the items, so the items compete for probability mass, which is what ranking
them needs. Evaluate either with ``pyrovae.analysis.ranking:RankingMetrics`` as the objective
(NDCG@100, Recall@20/50 on held-out items, model selection by NDCG@100) and the ``movielens``
data, whose held-out users bring their fold-in items as ``x`` and the items to rank as ``heldout``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import StandardNormal
from pyrovae.likelihoods import MultinomialLikelihood
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS


class NormalizedInputDropout(nn.Module):
    """x~ = dropout(x / ||x||_2): the input corruption of Liang et al. (dropout, with its 1/(1-p)
    rescaling, in training mode only; in evaluation x~ = x / ||x||_2)."""

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout = {rate!r} is not allowed: it must lie in [0, 1)")
        self.dropout = nn.Dropout(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.normalize(x, dim=-1))


@dataclass
class MultVAEConfig:
    latent_dim: int = 200
    # The decoder's hidden layers: z -> 600 -> items in the paper.
    hidden: list[int] = field(default_factory=lambda: [600])
    activation: str = "tanh"
    # Report the true multinomial log-likelihood (log N! - sum log x_i! included); false drops that
    # constant as the paper's loss does (same gradients; the ELBO is then not a bound on log p(x)).
    include_constant: bool = True

    def __post_init__(self):
        check_sizes(latent_dim=self.latent_dim, hidden=self.hidden)


@MODELS.register("mult_vae")
class MultVAE(Model):
    """Mult-VAE, generative half (pair it with the ``mult_vae_encoder`` guide):

        z_n ~ Normal(0, I_D)                                  for n in data
        pi_n = softmax(f(z_n))                                f = MLP: D -> hidden -> items, tanh
        x_n ~ Multinomial(N_n = sum_i x_ni, pi_n)

    so log p(x_n | z_n) = log N_n! - sum_i log x_ni! + sum_i x_ni log pi_ni. The paper's
    "partially regularised" bound E_q[log p(x | z)] - beta KL(q(z | x) || p(z)), with beta
    annealed linearly to 0.2, is this pair under ``[anneal] name = "capped_linear"``; the
    reported ``elbo`` is always the unannealed one.
    """

    Config = MultVAEConfig

    def __init__(self, config: MultVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.likelihood = MultinomialLikelihood(data, include_constant=config.include_constant)
        self.decoder = MLP(config.latent_dim, config.hidden, self.likelihood.out_features, activation=config.activation)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x: torch.Tensor, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            prior = StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device)
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood(self.decoder(z), total_count=x.sum(-1)), obs=x)


@dataclass
class MultDAEConfig:
    # items -> 600 -> 200 -> 600 -> items, tanh on every hidden layer (the paper's code).
    hidden: list[int] = field(default_factory=lambda: [600, 200, 600])
    activation: str = "tanh"
    # Dropout on the L2-normalised input (training only): the denoising corruption.
    dropout: float = 0.5
    include_constant: bool = True

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout!r} is not allowed: it must lie in [0, 1)")


@MODELS.register("mult_dae")
class MultDAE(Model):
    """Mult-DAE, the deterministic variant: no latent variables, hence no KL (pair it with the
    ``no_latents`` guide):

        x~_n = dropout(x_n / ||x_n||_2)                       in training; x_n / ||x_n||_2 in evaluation
        pi_n = softmax(f(x~_n))                               f = MLP: items -> hidden -> items, tanh
        x_n ~ Multinomial(N_n = sum_i x_ni, pi_n)

    The objective is log p(x_n | x~_n) itself: the denoising autoencoder's multinomial log-loss.
    Its ``elbo`` and ``test_log_likelihood`` are that reconstruction log-likelihood of x given a
    (clean, in evaluation) copy of x, not a marginal likelihood: compare Mult-DAE with Mult-VAE by
    the ranking metrics, not by these numbers.
    """

    Config = MultDAEConfig

    def __init__(self, config: MultDAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.likelihood = MultinomialLikelihood(data, include_constant=config.include_constant)
        self.corrupt = NormalizedInputDropout(config.dropout)
        self.network = MLP(data.x_features, config.hidden, self.likelihood.out_features, activation=config.activation)

    @property
    def latent_sites(self):
        return ()

    def forward(self, x: torch.Tensor, **batch):
        logits = self.network(self.corrupt(x))
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("x", self.likelihood(logits, total_count=x.sum(-1)), obs=x)
