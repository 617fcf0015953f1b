from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from pyrovae.errors import DataError
from pyrovae.distributions import DiagonalNormal
from pyrovae.models.m2 import M2
from pyrovae.nn import check_sizes
from pyrovae.nn.split_input import SplitInputMLP
from pyrovae.pair import DataSpec, Guide
from pyrovae.registry import GUIDES


@dataclass
class M2GuideConfig:
    # q(z | x, y): [x, onehot(y)] -> hidden -> (mu, sigma).
    hidden: list[int] = field(default_factory=lambda: [500])
    activation: str = "softplus"
    # sigma = softplus(raw) + min_scale keeps log q finite.
    min_scale: float = 1e-4
    # True: the missing labels are enumerated (objective enum_elbo sums them out exactly).
    # False: they are sampled from q(y | x) (score-function gradients under elbo / VIMCO under iwae).
    enumerate: bool = True

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if not len(self.hidden) >= 1:
            raise ValueError("hidden = [] is not allowed: q(z | x, y) needs at least one hidden layer")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")


@GUIDES.register("m2")
class M2Guide(Guide):
    """Inference half of M2 (Kingma et al. 2014):

        q(y_n | x_n)      = Categorical(softmax(classifier(x_n)))        for rows whose label is hidden
        y'_n              = y_n where y_mask_n, else the draw (or enumerated value) of q(y_n | x_n)
        q(z_n | x_n, y'_n) = Normal(mu, diag(sigma^2)),  [mu, raw] = encoder([x_n, onehot(y'_n)]),
                            sigma = softplus(raw) + min_scale

    ``classifier`` is the model's network (it also scores the training objective's classification
    term); the encoder's first layer is split by input (:class:`~pyrovae.nn.split_input.SplitInputMLP`),
    so enumerating y costs one product with x, not C. :meth:`classify` gives q(y | x)'s logits.
    """

    Config = M2GuideConfig

    def __init__(self, config: M2GuideConfig, data: DataSpec, model: M2):
        super().__init__(data)
        if not isinstance(getattr(model, "classifier", None), torch.nn.Module):
            raise ValueError(f"M2Guide needs a model with a label classifier (M2); got {type(model).__name__}")
        self.config = config
        self.classes = int(model.classes)
        self.latent_dim = int(model.config.latent_dim)
        self.classifier = model.classifier  # the model owns it
        self.encoder = SplitInputMLP((data.x_features, self.classes), config.hidden, 2 * self.latent_dim, activation=config.activation)

    def classify(self, x: torch.Tensor, **batch) -> torch.Tensor:
        """Logits of q(y | x), shape (B, C)."""
        return self.classifier(x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None, **batch):
        if y_mask is None:
            raise DataError(
                f"M2Guide needs y_mask in the batch (which labels are observed; the batch has {sorted(['x', 'y', *batch])}): "
                "set data.labels_per_class > 0 with a built-in loader, or give y_mask (bool, (B,)) from your own"
            )
        flat = x.reshape(x.shape[0], -1)
        logits = self.classifier(flat)
        infer = {"enumerate": "parallel"} if self.config.enumerate else {}
        with pyro.plate("data", x.shape[0], device=x.device):
            guess = pyro.sample("y_unobserved", dist.Categorical(logits=logits).mask(~y_mask), infer=infer)
            label = torch.where(y_mask, y, guess)  # (B,), or (C, 1.., B) when enumerated
            loc, raw_scale = self.encoder(flat, F.one_hot(label, self.classes).to(x.dtype)).chunk(2, -1)
            pyro.sample("z", DiagonalNormal(loc, F.softplus(raw_scale) + self.config.min_scale))
