from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch

from pyrovae.models.categorical import CategoricalVAE, categorical_latent
from pyrovae.nn import MLP, activation_layer, check_sizes
from pyrovae.pair import DataSpec, Guide
from pyrovae.registry import GUIDES


@dataclass
class CategoricalGuideConfig:
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    activation: str = "relu"

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        activation_layer(self.activation)


@GUIDES.register("categorical")
class CategoricalGuide(Guide):
    """Amortized guide of :class:`~pyrovae.models.categorical.CategoricalVAE`:

        logits_n = encoder(x_n)                                  MLP: x -> hidden -> N*K, as (N, K)
        q(z_{n,g} | x_n) = OneHotCategorical(softmax(logits_{n,g}))      g = 1..N

    drawn, like the model's prior, through the model's estimator: Concrete(tau, logits_{n,g})
    (straight-through or not) while it relaxes, else the exact OneHotCategorical (score-function
    training, and evaluation with ``discrete_eval``). The temperature tau is the scheduled input
    the model reads. Sizes (N, K, the estimator) come from the model.
    """

    Config = CategoricalGuideConfig
    scheduled_inputs = {"temperature": 1.0}

    def __init__(self, config: CategoricalGuideConfig, data: DataSpec, model: CategoricalVAE):
        super().__init__(data)
        if not isinstance(model, CategoricalVAE):
            raise ValueError(f"the 'categorical' guide is the inference half of 'categorical_vae', not of {type(model).__name__}")
        self.config, self.sizes = config, model.config
        self.encoder = MLP(data.x_features, config.hidden, self.sizes.groups * self.sizes.categories, activation=config.activation)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """logits_{n,g} of q(z | x), shaped (B, N, K)."""
        return self.encoder(x.reshape(x.shape[0], -1)).reshape(x.shape[0], self.sizes.groups, self.sizes.categories)

    def forward(self, x: torch.Tensor, temperature: float = 1.0, **batch):
        logits = self.logits(x)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", categorical_latent(logits, temperature, self.sizes, self.training))
