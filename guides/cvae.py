"""Inference halves of the conditional VAEs in ``models/cvae.py``.

- ``cvae_recognition``: the recognition network q(z | x, y) of Sohn et al. 2015;
- ``label_cvae_encoder``: the encoder q(z | x, y) of the label-conditioned generator;
- ``no_latents``: the empty guide of a model without latent variables (the deterministic baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch

from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, Guide, Model
from pyrovae.registry import GUIDES
from pyrovae.models.cvae import expand_leading, label_features, normal_head


@dataclass
class ConditionalEncoderConfig:
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    # sigma = softplus(raw) + min_scale keeps q from collapsing to a point and log q finite.
    min_scale: float = 1e-4

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


def _latent_size(model: Model, guide: str) -> int:
    sites = model.latent_sites
    if [site.name for site in sites] != ["z"] or len(sites[0].event_shape) != 1:
        raise ValueError(f"{guide} guides one vector latent 'z'; {type(model).__name__} declares {[s.name for s in sites]}")
    return int(sites[0].event_shape[0])


@GUIDES.register("cvae_recognition")
class RecognitionGuide(Guide):
    """Recognition network of Sohn et al. 2015 (Fig. 1b), the proposal of the CLL estimate:

        r_n = x_n at given pixels, y_n at target pixels          (the whole image)
        q(z_n | x_n, y_n) = Normal(mu(r_n), diag sigma(r_n)^2),   sigma = softplus(.) + min_scale

    with x_n the batch's ``c`` and y_n its ``x`` at ``target`` pixels; ``x`` is read nowhere else, so
    pixels outside the target change nothing.
    """

    Config = ConditionalEncoderConfig

    def __init__(self, config: ConditionalEncoderConfig, data: DataSpec, model: Model):
        super().__init__(data)
        self.config = config
        self.encoder = MLP(data.x_features, config.hidden, 2 * _latent_size(model, "cvae_recognition"), activation=config.activation)

    def forward(self, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor, **batch):
        whole = torch.where(target, x, c)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", normal_head(self.encoder(whole), self.config.min_scale))


@GUIDES.register("label_cvae_encoder")
class LabelConditionedEncoder(Guide):
    """Encoder of the label-conditioned generator:

        q(z_n | x_n, y_n) = Normal(mu([x_n, e(y_n)]), diag sigma([x_n, e(y_n)])^2)

    with e(y) the one-hot (integer labels) or multi-hot label vector, as in the model.
    """

    Config = ConditionalEncoderConfig

    def __init__(self, config: ConditionalEncoderConfig, data: DataSpec, model: Model):
        super().__init__(data)
        if not data.num_classes:
            raise ValueError(f"label_cvae_encoder needs labelled data (num_classes); data set {data.name!r} has no labels")
        self.config = config
        latent = _latent_size(model, "label_cvae_encoder")
        self.encoder = MLP(data.x_features + data.num_classes, config.hidden, 2 * latent, activation=config.activation)

    def forward(self, x: torch.Tensor, y: torch.Tensor, **batch):
        label = label_features(y, self.data, x.dtype)
        features = torch.cat([x.reshape(x.shape[0], -1), expand_leading(label, x.shape[:1])], -1)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", normal_head(self.encoder(features), self.config.min_scale))


@dataclass
class NoLatentsConfig:
    """The empty guide has nothing to configure."""


@GUIDES.register("no_latents")
class NoLatentsGuide(Guide):
    """q = the empty distribution: the model has no latent variables, so the ELBO is log p(x) itself
    and every importance weight is p(x). For deterministic models such as ``cvae_baseline``."""

    Config = NoLatentsConfig

    def __init__(self, config: NoLatentsConfig, data: DataSpec, model: Model):
        super().__init__(data)
        if model.latent_sites:
            names = [site.name for site in model.latent_sites]
            raise ValueError(f"no_latents is for models without latent variables; {type(model).__name__} declares {names}")

    def forward(self, x: torch.Tensor, **batch):
        pass
