"""Inference halves of the multi-label models in ``models/multilabel.py``.

- ``output_vae_encoder``: q(z | x) of the output-side VAE, which also predicts labels by decoding
  the posterior mean;
- ``joint_multilabel_encoder``: q(z | h) on the joint model's shared representation h = E(x).

Both keep a reference to their model that is not a child module: the model's networks stay in the
model's parameter group and state dict only (one copy in every checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch

from pyrovae.guides.normal import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models.cvae import normal_head
from pyrovae.models.multilabel import JointClassifierVAE, OutputVAE
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, Guide, Model
from pyrovae.registry import GUIDES


def _refer(guide: Guide, model: Model) -> None:
    # Written to __dict__ so that torch does not register the model as a child of the guide.
    vars(guide)["model"] = model


@dataclass
class OutputVAEEncoderConfig(DiagonalNormalGuideConfig):
    hidden: list[int] = field(default_factory=lambda: [600])


@GUIDES.register("output_vae_encoder")
class OutputVAEEncoder(DiagonalNormalGuide):
    """Encoder of the output-side VAE (the seed's X -> 600 -> 200 ~ z), a diagonal Normal on the features:

        h_n = trunk(x_n)                                      MLP: X -> hidden
        q(z_n | x_n) = Normal(mu(h_n), diag sigma(h_n)^2),    sigma = softplus(.) + min_scale

    :meth:`label_scores` decodes the posterior mean: P(y_l = 1 | x) = the model's label probability
    at z = mu(x) (:meth:`OutputVAE.label_probabilities`).
    """

    Config = OutputVAEEncoderConfig

    def __init__(self, config: OutputVAEEncoderConfig, data: DataSpec, model: Model):
        if not isinstance(model, OutputVAE):
            raise ValueError(f"output_vae_encoder predicts labels through an output_vae model; got {type(model).__name__}")
        super().__init__(config, data, model)
        _refer(self, model)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """mu(x), shape (B, D)."""
        return self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)[0]

    def label_scores(self, x: torch.Tensor, **batch) -> torch.Tensor:
        """P(y_l = 1 | z = mu(x)), shape (B, L)."""
        return self.model.label_probabilities(self.posterior_mean(x))


@dataclass
class JointEncoderConfig:
    # h -> hidden -> (mu, raw sigma); [] puts the Normal's heads straight on h.
    hidden: list[int] = field(default_factory=list)
    activation: str = "relu"
    min_scale: float = 1e-4

    def __post_init__(self):
        if self.hidden:
            check_sizes(hidden=self.hidden)
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@GUIDES.register("joint_multilabel_encoder")
class JointEncoder(Guide):
    """Guide of the joint classify-and-generate model, on the model's shared representation:

        h_n = E(x_n)                                       the model's encoder (it owns it)
        q(z_n | x_n) = Normal(mu(h_n), diag sigma(h_n)^2),  [mu, raw] = heads(h_n), sigma = softplus(raw) + min_scale
    """

    Config = JointEncoderConfig

    def __init__(self, config: JointEncoderConfig, data: DataSpec, model: Model):
        super().__init__(data)
        if not isinstance(model, JointClassifierVAE):
            raise ValueError(f"joint_multilabel_encoder reads the representation of a joint_multilabel model; got {type(model).__name__}")
        self.config = config
        _refer(self, model)
        features, out = model.config.representation_dim, 2 * model.config.latent_dim
        self.heads = MLP(features, config.hidden, out, activation=config.activation) if config.hidden else torch.nn.Linear(features, out)

    def forward(self, x: torch.Tensor, **batch):
        h = self.model.representation(x)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", normal_head(self.heads(h), self.config.min_scale))
