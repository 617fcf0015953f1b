from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from pyrovae.errors import DataError
from pyrovae.distributions import StandardNormal
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, ConvNet, check_sizes, random_shift
from pyrovae.nn.split_input import SplitInputMLP
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS


@dataclass
class M2Config:
    latent_dim: int = 50
    # Decoder p(x | y, z): [z, onehot(y)] -> hidden -> x.
    hidden: list[int] = field(default_factory=lambda: [500])
    # Classifier q(y | x): x -> classifier_hidden -> C logits. It lives here because the
    # classification term of the training objective reads it; the guide reuses it.
    classifier_hidden: list[int] = field(default_factory=lambda: [500])
    # [] (the default): the classifier is the MLP above on the flattened pixels. A list of channel
    # counts makes it a small convolutional network on the image (pyrovae.nn.conv.ConvNet: one
    # 5x5 stride-2 convolution per entry, then classifier_hidden), e.g. [16, 32] for MNIST.
    classifier_channels: list[int] = field(default_factory=list)
    # The classification term reads each labelled image moved by up to this many pixels along
    # each axis (pyrovae.nn.augment.random_shift), drawn afresh each step; training only, and the
    # bound itself always reads x as it is. 0 (the default) is Kingma et al.'s term.
    classifier_shift: int = 0
    activation: str = "softplus"
    likelihood: str = "bernoulli"
    # Weight of alpha * log q(y_n | x_n) per labelled row, relative to that row's bound (Pyro's
    # ss_vae "aux_loss_multiplier"; Kingma et al. write it as alpha = 0.1 N for the mean over
    # labelled rows). 0 turns the term off.
    alpha: float = 50.0

    def __post_init__(self):
        check_sizes(
            latent_dim=self.latent_dim, hidden=self.hidden, classifier_hidden=self.classifier_hidden,
            classifier_channels=self.classifier_channels,
        )
        if not len(self.hidden) >= 1:
            raise ValueError("hidden = [] is not allowed: the decoder needs at least one hidden layer")
        if isinstance(self.classifier_shift, bool) or not isinstance(self.classifier_shift, int) or self.classifier_shift < 0:
            raise ValueError(f"classifier_shift = {self.classifier_shift!r} is not allowed: it must be an integer >= 0")
        if not (self.alpha >= 0 and self.alpha < float("inf")):
            raise ValueError(f"alpha = {self.alpha!r} is not allowed: it must be a finite number >= 0")


@MODELS.register("m2")
class M2(Model):
    """Semi-supervised M2 (Kingma et al. 2014), generative half, with C classes:

        y_n ~ Categorical(1/C)                    observed where y_mask_n, else latent (site y_unobserved)
        z_n ~ Normal(0, I_D)
        x_n ~ likelihood(decoder([z_n, onehot(y_n)]))

    Where y_n is latent the guide enumerates it (objective ``enum_elbo``), so the bound of an
    unlabelled row is sum_y q(y | x) [L(x, y) - log q(y | x)], and of a labelled row
    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)].

    Training adds Kingma et al.'s classification term (their J^alpha) on labelled rows,

        + alpha * log q(y_n | x_n)                (a ``pyro.factor`` named y_aux)

    with q(y | x) = Categorical(softmax(classifier(x_n))), the classifier an MLP on the pixels or,
    with ``classifier_channels``, a small convolutional network on the image. It is a term of the
    training objective, not of p(x, y, z), so it is added in training mode only: validation and test
    bounds (and the log-likelihood) are bounds on log p(x) (or log p(x, y)); ``train/elbo`` includes it.
    With ``classifier_shift = s`` the term reads alpha * log q(y_n | x'_n), x'_n the image x_n moved
    by up to s pixels along each axis, drawn each step: a regulariser of the classifier, not of the bound.
    """

    Config = M2Config

    def __init__(self, config: M2Config, data: DataSpec):
        super().__init__(data)
        if not data.num_classes or data.num_classes < 2 or data.label_format != "integer":
            raise ValueError(f"M2 needs integer class labels y with num_classes >= 2; data set {data.name!r} has none")
        self.config = config
        self.classes = int(data.num_classes)
        self.likelihood = build_likelihood(config.likelihood, data)
        self.decoder = SplitInputMLP(
            (config.latent_dim, self.classes), config.hidden, self.likelihood.out_features, activation=config.activation
        )
        if (config.classifier_channels or config.classifier_shift) and data.image_shape is None:
            option = "classifier_channels" if config.classifier_channels else "classifier_shift"
            raise ValueError(f"{option} needs image data; data set {data.name!r} has no image_shape")
        self.image_shape = data.image_shape
        if config.classifier_shift and config.classifier_shift >= min(data.image_shape[-2:]):
            raise ValueError(
                f"classifier_shift = {config.classifier_shift} is not allowed for {data.name!r}: a shift must be smaller "
                f"than the image ({'x'.join(map(str, data.image_shape[-2:]))}), or every shifted image is empty"
            )
        if config.classifier_channels:
            self.classifier = ConvNet(
                data.image_shape, config.classifier_channels, config.classifier_hidden, self.classes, activation=config.activation
            )
        else:
            self.classifier = MLP(data.x_features, config.classifier_hidden, self.classes, activation=config.activation)

    @property
    def latent_sites(self):
        return (
            LatentSite("y_unobserved", (), discrete=True, enumerated=True),
            LatentSite("z", (self.config.latent_dim,)),
        )

    def classifier_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x), shape (B, C)."""
        return self.classifier(x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None, **batch):
        if y_mask is None:
            raise DataError(
                f"M2 needs y_mask in the batch (which labels are observed; the batch has {sorted(['x', 'y', *batch])}): "
                "set data.labels_per_class > 0 with a built-in loader, or give y_mask (bool, (B,)) from your own"
            )
        rows, classes = x.shape[0], self.classes
        with pyro.plate("data", rows, device=x.device):
            uniform = x.new_zeros((rows, classes))
            label = pyro.sample("y", dist.Categorical(logits=uniform), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", StandardNormal((rows,), (self.config.latent_dim,), dtype=x.dtype, device=x.device))
            # label: (B,), or (C, 1.., B) when enumerated; the decoder broadcasts it against z's dims.
            pyro.sample("x", self.likelihood(self.decoder(z, F.one_hot(label, classes).to(x.dtype))), obs=x)
            if self.training and self.config.alpha > 0:
                seen = random_shift(x.reshape(rows, -1), self.image_shape, self.config.classifier_shift)  # x itself at 0
                log_q = self.classifier_logits(seen).log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
                pyro.factor("y_aux", self.config.alpha * torch.where(y_mask, log_q, torch.zeros_like(log_q)))
