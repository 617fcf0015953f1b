"""Multi-label prediction, generative halves (x: features, y: multi-hot labels over L labels).

- :class:`OutputVAE` (``output_vae``): the output-side VAE X -> 600 -> 200 ~ z -> 600 -> Y of the
  extreme-multi-label seed, shaped like Mult-VAE (Liang et al. 2018) with the labels as the output.
  Its encoder q(z | x) is the ``output_vae_encoder`` guide; labels are predicted by decoding the
  posterior mean.
- :class:`JointClassifierVAE` (``joint_multilabel``): the joint classify-and-generate model
  X -> encoder -> H ~ z; H -> MLP -> y_hat; (z, y_hat) -> decoder -> X. Its guide is
  ``joint_multilabel_encoder``.

Both read labels as ``batch["y"]`` (``label_format = "multi_hot"``). A part that predicts labels has
``label_scores(**batch) -> (B, L)`` probabilities, read by :mod:`pyrovae.analysis.multilabel`.
Guides are in ``guides/multilabel.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.nn import functional as F

from pyrovae.distributions import BernoulliLogits, StandardNormal
from pyrovae.errors import DataError
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS

LABEL_LIKELIHOODS = ("bernoulli", "multinomial")


def label_spec(data: DataSpec, owner: str) -> DataSpec:
    """The labels of ``data`` described as binary data of shape (L,), for the label likelihood heads."""
    if not data.num_classes or data.label_format != "multi_hot":
        raise ValueError(
            f"{owner} predicts multi-hot labels; data set {data.name!r} has "
            f"{'no labels' if not data.num_classes else repr(data.label_format) + ' labels'}"
        )
    return DataSpec(f"{data.name} labels", (data.num_classes,), "binary")


def check_label_batch(data: DataSpec, batch, owner: str) -> None:
    if not torch.is_tensor(batch.get("y")):
        raise DataError(f"{owner} needs multi-hot labels: batch['y'] (got keys {sorted(batch)})")
    data.check_batch(batch, owner=owner)


class PositiveWeightedBernoulli(BernoulliLogits):
    """Independent Bernoullis whose positive terms weigh ``w`` times as much:

        log p_w(y) = sum_l [ w y_l log sigmoid(l_l) + (1 - y_l) log sigmoid(-l_l) ]

    (binary cross-entropy with ``pos_weight = w``). For w != 1 this is not a normalized density: it
    is the reweighted loss of the seed, and an ELBO built on it is not a bound on log p(y)."""

    def __init__(self, logits: torch.Tensor, positive_weight: float, event_dim: int = 1, validate_args=None):
        self.positive_weight = float(positive_weight)
        super().__init__(logits, event_dim, validate_args=validate_args)

    def _expanded(self, batch_shape):
        return PositiveWeightedBernoulli(self.logits.expand(batch_shape + self.event_shape), self.positive_weight, self.event_dim, False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.logits
        if value.shape != logits.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        weight = torch.as_tensor(self.positive_weight, dtype=logits.dtype, device=logits.device)
        terms = F.binary_cross_entropy_with_logits(logits, value, reduction="none", pos_weight=weight)
        return -terms.sum(tuple(range(-self.event_dim, 0))) if self.event_dim else -terms


# --- the output-side VAE -------------------------------------------------------------------------


@dataclass
class OutputVAEConfig:
    latent_dim: int = 200
    hidden: list[int] = field(default_factory=lambda: [600])
    activation: str = "tanh"
    # "bernoulli": independent labels; "multinomial": the row's labels as draws from one softmax.
    likelihood: str = "bernoulli"
    # Bernoulli only: the weight of the positive-label terms (1: the plain likelihood).
    positive_weight: float = 1.0

    def __post_init__(self):
        check_sizes(latent_dim=self.latent_dim, hidden=self.hidden)
        if self.likelihood not in LABEL_LIKELIHOODS:
            raise ValueError(f"likelihood = {self.likelihood!r} is not allowed: choose one of {', '.join(LABEL_LIKELIHOODS)}")
        if not self.positive_weight > 0:
            raise ValueError(f"positive_weight = {self.positive_weight!r} is not allowed: it must be > 0")
        if self.positive_weight != 1.0 and self.likelihood != "bernoulli":
            raise ValueError("positive_weight reweights the Bernoulli likelihood; leave it at 1 with likelihood = 'multinomial'")


@MODELS.register("output_vae")
class OutputVAE(Model):
    """Output-side VAE for multi-label prediction (the seed's X -> 600 -> 200 ~ z -> 600 -> Y, after
    Mult-VAE), generative half:

        z_n ~ Normal(0, I_D)
        y_n ~ prod_l Bernoulli(y_nl | sigmoid(f_l(z_n)))              likelihood = "bernoulli"
        y_n ~ Multinomial(m_n, softmax(f(z_n))),  m_n = sum_l y_nl     likelihood = "multinomial"

    i.e. log p(y_n | z_n) = log m_n! + sum_l y_nl log pi_l(z_n) for 0/1 rows (the engine's
    ``multinomial`` likelihood, :class:`pyrovae.likelihoods.MultinomialLogits`).

    f = MLP: D -> hidden -> L. With ``positive_weight = w`` the Bernoulli's positive terms weigh w
    (:class:`PositiveWeightedBernoulli`; then not a density). The guide q(z | x) reads the features,
    so the ELBO E_q[log p(y | z)] - KL(q(z | x) || p(z)) bounds log p(y) with q as the proposal;
    its reconstruction term is the label log-likelihood given the features' code.

    Predicted label probabilities, decoding the posterior mean mu(x):
    P(y_l = 1) = sigmoid(f_l(mu)) (Bernoulli), or 1 - (1 - pi_l)^m_bar with pi = softmax(f(mu)) and
    m_bar the mean number of labels of the training rows seen (Multinomial: the chance that label l
    is among m_bar draws).
    """

    Config = OutputVAEConfig
    conditions_on_label = False  # y is what it models (from the features' guide), not a condition
    observed_site = "y"

    def __init__(self, config: OutputVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.label_likelihood = build_likelihood(config.likelihood, label_spec(data, "output_vae"))
        self.decoder = MLP(config.latent_dim, config.hidden, data.num_classes, activation=config.activation)
        # (sum of labels, rows) over training batches: m_bar for the Multinomial's predictions.
        self.register_buffer("label_counts", torch.zeros(2, dtype=torch.float64))

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def check_batch(self, batch) -> None:
        check_label_batch(self.data, batch, type(self).__name__)

    def label_distribution(self, logits: torch.Tensor) -> dist.Distribution:
        """p(y | z) from the decoder's logits. The Multinomial reads each row's m off the labels it
        scores; drawn without labels (samples, means) it takes round(m_bar) draws."""
        if self.config.positive_weight != 1.0:
            return PositiveWeightedBernoulli(logits, self.config.positive_weight)
        if self.config.likelihood == "multinomial":
            return self.label_likelihood(logits, total_count=self.label_mean().round().clamp(min=1))
        return self.label_likelihood(logits)

    def label_mean(self) -> torch.Tensor:
        """m_bar as a 0-dim tensor on the model's device (no host sync): the mean number of labels per
        training row seen so far, 1 before any."""
        total, rows = self.label_counts
        return torch.where(rows > 0, total / rows.clamp(min=1), torch.ones_like(total))

    @property
    def mean_labels(self) -> float:
        """m_bar as a number (see :meth:`label_mean`)."""
        return float(self.label_mean())

    def label_probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """P(y_l = 1 | z) for every label (see the class docstring), shape (..., L)."""
        logits = self.decoder(z)
        if self.config.likelihood == "multinomial":
            draws = self.label_mean().to(logits.dtype)
            return -torch.expm1(draws * torch.log1p(-torch.softmax(logits, -1).clamp(max=1 - 1e-7)))
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, y: torch.Tensor, **batch):
        if self.training and torch.is_grad_enabled():
            self.label_counts += torch.stack([y.sum().double(), torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)])
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device))
            pyro.sample("y", self.label_distribution(self.decoder(z)), obs=y.to(z.dtype))


# --- the joint classify-and-generate model -------------------------------------------------------


DECODER_LABELS = ("predicted", "true")


@dataclass
class JointClassifierVAEConfig:
    latent_dim: int = 32
    # X -> encoder_hidden -> H (the shared representation).
    encoder_hidden: list[int] = field(default_factory=lambda: [600])
    representation_dim: int = 200
    classifier_hidden: list[int] = field(default_factory=lambda: [200])
    decoder_hidden: list[int] = field(default_factory=lambda: [600])
    activation: str = "relu"
    # The likelihood of the features x (gaussian for standardized or TF-IDF features).
    likelihood: str = "gaussian"
    observation_scale: float | None = None
    # alpha: the weight of the classification term log p(y | y_hat) (Kingma et al. 2014's M2 weighs theirs too).
    classification_weight: float = 1.0
    # What the decoder reads in training: the classifier's y_hat (the seed's design) or the true y.
    # In evaluation mode it always reads y_hat; generate() reads the y it is given.
    decoder_labels: str = "predicted"

    def __post_init__(self):
        check_sizes(
            latent_dim=self.latent_dim,
            encoder_hidden=self.encoder_hidden,
            representation_dim=self.representation_dim,
            classifier_hidden=self.classifier_hidden,
            decoder_hidden=self.decoder_hidden,
        )
        if not self.classification_weight >= 0:
            raise ValueError(f"classification_weight = {self.classification_weight!r} is not allowed: it must be >= 0")
        if self.decoder_labels not in DECODER_LABELS:
            raise ValueError(f"decoder_labels = {self.decoder_labels!r} is not allowed: choose one of {', '.join(DECODER_LABELS)}")
        if self.observation_scale is not None and not self.observation_scale > 0:
            raise ValueError(f"observation_scale = {self.observation_scale!r} is not allowed: it must be > 0 (or left out to learn it)")


@MODELS.register("joint_multilabel")
class JointClassifierVAE(Model):
    """Joint classify-and-generate model (the seed's X -> encoder -> H ~ z; H -> MLP -> y_hat;
    (z, y_hat) -> decoder -> X), generative half:

        h_n     = E(x_n)                                   shared encoder: X -> encoder_hidden -> H
        y_hat_n = sigmoid(C(h_n))                          classifier:     H -> classifier_hidden -> L
        y_n     ~ prod_l Bernoulli(y_nl | y_hat_nl)        observed, its log-density weighted by alpha
        z_n     ~ Normal(0, I_D)
        x_n     ~ likelihood(G([z_n, l_n]))                decoder: D + L -> decoder_hidden -> X

    with l_n = y_hat_n (in evaluation always, and in training with ``decoder_labels = "predicted"``)
    or the true y_n (training with ``"true"``). The guide draws z from q(z | h_n) on the same H. The
    objective is E_q[log p(x | z, l)] - KL(q(z | x) || p(z)) + alpha log p(y | y_hat): a conditional
    ELBO on x given l plus the classifier's weighted log-likelihood, not a bound on log p(x) (y_hat
    is a function of x). ``label_scores`` is y_hat; :meth:`generate` decodes z ~ N(0, I) with the y
    it is given.
    """

    Config = JointClassifierVAEConfig
    conditions_on_label = True  # through generate(y): forward decodes with its own y_hat in evaluation

    def __init__(self, config: JointClassifierVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        label_spec(data, "joint_multilabel")
        options = {"scale": config.observation_scale} if config.likelihood == "gaussian" else {}
        self.likelihood = build_likelihood(config.likelihood, data, **options)
        self.encoder = MLP(data.x_features, config.encoder_hidden, config.representation_dim, activation=config.activation)
        self.classifier = MLP(config.representation_dim, config.classifier_hidden, data.num_classes, activation=config.activation)
        self.decoder = MLP(
            config.latent_dim + data.num_classes, config.decoder_hidden, self.likelihood.out_features, activation=config.activation
        )

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def check_batch(self, batch) -> None:
        check_label_batch(self.data, batch, type(self).__name__)
        self.likelihood.check_data(batch["x"])

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """h = E(x), shape (B, H): what the classifier and the guide read."""
        return self.encoder(x.reshape(x.shape[0], -1))

    def label_scores(self, x: torch.Tensor, **batch) -> torch.Tensor:
        """y_hat = sigmoid(C(E(x))), shape (B, L)."""
        return torch.sigmoid(self.classifier(self.representation(x)))

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> dist.Distribution:
        """p(x | z, l) for a latent z (..., B, D) and label vectors l (B, L) (y_hat or multi-hot y)."""
        labels = labels.to(z.dtype).expand(z.shape[:-1] + labels.shape[-1:])
        return self.likelihood(self.decoder(torch.cat([z, labels], -1)))

    def generate(self, y: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Features for the multi-hot label rows ``y`` (B, L): z ~ N(0, I), then the mean (or a draw) of p(x | z, y)."""
        z = torch.randn(y.shape[0], self.config.latent_dim, device=y.device)
        fn = self.decode(z, y)
        return fn.mean if mean else fn.sample()

    def forward(self, x: torch.Tensor, y: torch.Tensor, **batch):
        logits = self.classifier(self.representation(x))
        decoder_labels = y if self.training and self.config.decoder_labels == "true" else torch.sigmoid(logits)
        with pyro.plate("data", x.shape[0], device=x.device):
            with poutine.scale(scale=self.config.classification_weight):
                pyro.sample("y", BernoulliLogits(logits), obs=y.to(logits.dtype))
            z = pyro.sample("z", StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device))
            pyro.sample("x", self.decode(z, decoder_labels), obs=x)
