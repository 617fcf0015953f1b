from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal, StandardNormal
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, activation_layer, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS


def normal_parameters(output: torch.Tensor, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A network output [m, s] (halves of the last dim) as a Normal's mu = m and
    sigma = softplus(s) + min_scale."""
    loc, raw_scale = output.chunk(2, -1)
    return loc, F.softplus(raw_scale) + min_scale


def check_layer_sizes(key: str, layers, count: int) -> None:
    """``layers`` must be ``count`` lists of hidden sizes (an empty list is one linear map)."""
    if not isinstance(layers, (list, tuple)) or any(not isinstance(sizes, (list, tuple)) for sizes in layers):
        raise ValueError(f"{key} = {layers!r} is not allowed: give one list of hidden sizes per stochastic layer, e.g. [[512, 512], [256, 256]]")
    if len(layers) != count:
        raise ValueError(f"{key} = {layers!r} has {len(layers)} lists, but the model has {count} stochastic layers (one list each)")
    for index, sizes in enumerate(layers):
        check_sizes(**{f"{key}[{index}]": list(sizes)})


@dataclass
class LadderVAEConfig:
    # Sizes of z_1 (next to x) ... z_L (the top); L >= 2.
    latent_dims: list[int] = field(default_factory=lambda: [64, 32])
    # hidden[0]: the decoder z_1 -> x; hidden[l]: the network z_{l+1} -> z_l (l = 1 .. L-1).
    hidden: list[list[int]] = field(default_factory=lambda: [[512, 512], [256, 256]])
    # Sønderby et al. use leaky ReLU; with tanh (2 x 512) the networks saturated and the pair stayed
    # at the mean image (-208 nats on MNIST) for the first epochs.
    activation: str = "leaky_relu"
    # Batch normalization after each hidden linear layer (Sønderby et al. use it).
    batch_norm: bool = False
    likelihood: str = "bernoulli"
    # Gaussian likelihood only: a fixed observation scale, or None to learn one per feature.
    observation_scale: float | None = None
    # sigma_l = softplus(.) + min_scale in p(z_l | z_{l+1}).
    min_scale: float = 1e-3

    def __post_init__(self):
        check_sizes(latent_dims=self.latent_dims)
        if not isinstance(self.latent_dims, (list, tuple)) or len(self.latent_dims) < 2:
            raise ValueError(f"latent_dims = {self.latent_dims!r}: a ladder needs at least 2 stochastic layers (for one, use model 'vae')")
        check_layer_sizes("hidden", self.hidden, len(self.latent_dims))
        activation_layer(self.activation)
        if self.observation_scale is not None and not self.observation_scale > 0:
            raise ValueError(f"observation_scale = {self.observation_scale!r} is not allowed: it must be > 0 (or left out to learn it)")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@MODELS.register("ladder_vae")
class LadderVAE(Model):
    """Hierarchical VAE with L Gaussian stochastic layers (the generative half of the Ladder VAE,
    Sønderby et al. 2016; Burda et al. 2016's two-layer VAE for L = 2):

        z_L ~ Normal(0, I)
        z_l ~ Normal(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)      l = L-1, ..., 1
        x   ~ likelihood(decoder(z_1))

    with [mu_l, s_l] = top_down[l](z_{l+1}), sigma_l = softplus(s_l) + min_scale, each network an
    MLP with ``hidden[l]`` (``hidden[0]`` for the decoder). Sites are named ``z1`` ... ``zL``, so
    ``[anneal.sites.z2]`` warms up a layer's KL on its own. The ladder guide reuses ``top_down``.
    """

    Config = LadderVAEConfig

    def __init__(self, config: LadderVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        dims, hidden = list(config.latent_dims), [list(h) for h in config.hidden]
        options = {"scale": config.observation_scale} if config.likelihood == "gaussian" else {}
        self.likelihood = build_likelihood(config.likelihood, data, **options)
        layer = {"activation": config.activation, "batch_norm": config.batch_norm}
        self.decoder = MLP(dims[0], hidden[0], self.likelihood.out_features, **layer)
        # top_down[l - 1] gives p(z_l | z_{l+1}), l = 1 .. L-1.
        self.top_down = nn.ModuleList(
            MLP(dims[level], hidden[level], 2 * dims[level - 1], **layer) for level in range(1, len(dims))
        )

    @property
    def layers(self) -> int:
        return len(self.config.latent_dims)

    @staticmethod
    def site_name(level: int) -> str:
        return f"z{level}"

    @property
    def latent_sites(self):
        return tuple(LatentSite(self.site_name(level), (self.config.latent_dims[level - 1],)) for level in range(self.layers, 0, -1))

    def conditional(self, level: int, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_l, sigma_l) of p(z_l | z_{l+1} = upper), for l = ``level`` in 1 .. L-1."""
        return normal_parameters(self.top_down[level - 1](upper), self.config.min_scale)

    def forward(self, x: torch.Tensor, **batch):
        top = self.config.latent_dims[-1]
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample(self.site_name(self.layers), StandardNormal((x.shape[0],), (top,), dtype=x.dtype, device=x.device))
            for level in range(self.layers - 1, 0, -1):
                z = pyro.sample(self.site_name(level), DiagonalNormal(*self.conditional(level, z)))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
