from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from torch import nn

from pyrovae.distributions import DiagonalNormal
from pyrovae.models.ladder import LadderVAE, check_layer_sizes, normal_parameters
from pyrovae.nn import MLP, activation_layer, check_sizes
from pyrovae.pair import DataSpec, Guide
from pyrovae.registry import GUIDES


def _ladder_model(model, guide_name: str) -> LadderVAE:
    if not isinstance(model, LadderVAE):
        raise ValueError(f"the {guide_name!r} guide is an inference half of 'ladder_vae', not of {type(model).__name__}")
    return model


def _check_scales(config) -> None:
    activation_layer(config.activation)
    if not config.min_scale > 0:
        raise ValueError(f"min_scale = {config.min_scale!r} is not allowed: it must be > 0")
    if config.initial_scale is not None and not config.initial_scale > config.min_scale:
        raise ValueError(f"initial_scale = {config.initial_scale!r} is not allowed: it must be > min_scale = {config.min_scale!r} (or left out)")


def start_scale(head: nn.Linear, initial_scale: float | None, min_scale: float) -> None:
    """Start a [mu, s] head with sigma = softplus(s) + min_scale about ``initial_scale`` (the s-half's
    bias set to give it, its small weights left as they are drawn), so the first steps train close to
    an autoencoder. None keeps the usual init (sigma about 0.7)."""
    if initial_scale is None:
        return
    half = head.out_features // 2
    with torch.no_grad():
        head.bias[half:] = torch.tensor(initial_scale - min_scale).expm1().log()


def _hidden(config_hidden, model: LadderVAE) -> list[list[int]]:
    """The guide's hidden sizes per layer: its own, or by default the model's (mirrored)."""
    hidden = model.config.hidden if config_hidden is None else config_hidden
    check_layer_sizes("guide hidden", hidden, model.layers)
    return [list(sizes) for sizes in hidden]


@dataclass
class BottomUpGuideConfig:
    # hidden[l - 1]: the network into z_l (x -> z_1, z_{l-1} -> z_l); None: the model's hidden.
    hidden: list[list[int]] | None = None
    activation: str = "leaky_relu"
    batch_norm: bool = False
    min_scale: float = 1e-4
    # sigma of each q(z_l | .) at initialization (see start_scale); None: the usual init.
    initial_scale: float | None = 0.1

    def __post_init__(self):
        _check_scales(self)


@GUIDES.register("ladder_bottom_up")
class BottomUpGuide(Guide):
    """Bottom-up Markov guide of :class:`~pyrovae.models.ladder.LadderVAE` (Burda et al. 2016):

        q(z_1 | x)       = Normal(mu_1(x), diag sigma_1(x)^2)
        q(z_l | z_{l-1}) = Normal(mu_l(z_{l-1}), diag sigma_l(z_{l-1})^2)      l = 2 .. L

    with [mu_l, s_l] = up[l](input), sigma_l = softplus(s_l) + min_scale (sigma_l = initial_scale
    at initialization); its networks are its own (nothing is shared with the model).
    """

    Config = BottomUpGuideConfig

    def __init__(self, config: BottomUpGuideConfig, data: DataSpec, model: LadderVAE):
        super().__init__(data)
        model = _ladder_model(model, "ladder_bottom_up")
        self.config = config
        self.dims = list(model.config.latent_dims)
        inputs = [data.x_features] + self.dims[:-1]
        self.up = nn.ModuleList(
            MLP(width, sizes, 2 * dim, activation=config.activation, batch_norm=config.batch_norm)
            for width, sizes, dim in zip(inputs, _hidden(config.hidden, model), self.dims)
        )
        for network in self.up:
            start_scale(network[-1], config.initial_scale, config.min_scale)

    def forward(self, x: torch.Tensor, **batch):
        below = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0], device=x.device):
            for level, network in enumerate(self.up, start=1):
                loc, scale = normal_parameters(network(below), self.config.min_scale)
                below = pyro.sample(LadderVAE.site_name(level), DiagonalNormal(loc, scale))


@dataclass
class LadderGuideConfig:
    # hidden[l - 1]: the upward network d_{l-1} -> d_l (d_0 = x); None: the model's hidden.
    hidden: list[list[int]] | None = None
    # Width of each d_l; None: the last hidden size of its network (2 * dim z_l if it has none).
    deterministic: list[int] | None = None
    activation: str = "leaky_relu"
    batch_norm: bool = False
    min_scale: float = 1e-4
    # sigma^_l of each estimate at initialization (see start_scale); None: the usual init.
    initial_scale: float | None = 0.1

    def __post_init__(self):
        if self.deterministic is not None:
            check_sizes(deterministic=self.deterministic)
        _check_scales(self)


@GUIDES.register("ladder")
class LadderGuide(Guide):
    """Top-down ladder guide of :class:`~pyrovae.models.ladder.LadderVAE` (Sønderby et al. 2016,
    eq. 17-19). A deterministic upward pass gives each layer a likelihood-like estimate:

        d_0 = x,   d_l = up[l](d_{l-1}),   [mu^_l, s^_l] = head[l](d_l),   sigma^_l = softplus(s^_l) + min_scale

    Then the guide samples top-down, merging each estimate with the model's own top-down
    prior term p(z_l | z_{l+1}) = Normal(mu_p,l, sigma_p,l) (the model's ``top_down`` networks,
    shared, evaluated at the guide's z_{l+1}) by precision weighting:

        q(z_L | x)         = Normal(mu^_L, diag sigma^_L^2)
        q(z_l | z_{l+1}, x) = Normal(mu_q,l, diag sigma_q,l^2)                   l = L-1, ..., 1
        sigma_q,l^2 = 1 / (sigma^_l^-2 + sigma_p,l^-2)
        mu_q,l      = (mu^_l sigma^_l^-2 + mu_p,l sigma_p,l^-2) sigma_q,l^2

    The networks up[l] are MLPs with ``hidden[l-1]`` and a linear output of width
    ``deterministic[l-1]``; head[l] is linear, starting at sigma^_l = ``initial_scale``.
    """

    Config = LadderGuideConfig

    def __init__(self, config: LadderGuideConfig, data: DataSpec, model: LadderVAE):
        super().__init__(data)
        model = _ladder_model(model, "ladder")
        self.config = config
        self.dims = list(model.config.latent_dims)
        hidden = _hidden(config.hidden, model)
        widths = config.deterministic
        if widths is None:
            widths = [sizes[-1] if sizes else 2 * dim for sizes, dim in zip(hidden, self.dims)]
        elif len(widths) != len(self.dims):
            raise ValueError(f"deterministic = {widths!r} has {len(widths)} widths, but the model has {len(self.dims)} stochastic layers")
        inputs = [data.x_features] + list(widths[:-1])
        self.up = nn.ModuleList(
            MLP(i, sizes, w, activation=config.activation, batch_norm=config.batch_norm) for i, sizes, w in zip(inputs, hidden, widths)
        )
        self.heads = nn.ModuleList(nn.Linear(width, 2 * dim) for width, dim in zip(widths, self.dims))
        for head in self.heads:
            start_scale(head, config.initial_scale, config.min_scale)
        # The model owns these networks (and trains them in its parameter group).
        self.top_down = model.top_down
        self.prior_min_scale = model.config.min_scale

    def upward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mu^_l, sigma^_l) for l = 1 .. L from the deterministic upward pass."""
        estimates, d = [], x.reshape(x.shape[0], -1)
        for network, head in zip(self.up, self.heads):
            d = network(d)
            estimates.append(normal_parameters(head(d), self.config.min_scale))
        return estimates

    def forward(self, x: torch.Tensor, **batch):
        estimates = self.upward(x)
        layers = len(self.dims)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample(LadderVAE.site_name(layers), DiagonalNormal(*estimates[-1]))
            for level in range(layers - 1, 0, -1):
                loc_p, scale_p = normal_parameters(self.top_down[level - 1](z), self.prior_min_scale)
                loc_e, scale_e = estimates[level - 1]
                precision_p, precision_e = scale_p.pow(-2), scale_e.pow(-2)
                precision = precision_e + precision_p
                loc = (loc_e * precision_e + loc_p * precision_p) / precision
                z = pyro.sample(LadderVAE.site_name(level), DiagonalNormal(loc, precision.rsqrt()))
