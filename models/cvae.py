"""Conditional VAEs, generative halves.

Structured output prediction (Sohn et al. 2015), on data with a context ``c`` and a ``target`` mask
(the quadrant loader, :mod:`pyrovae.data.quadrants`): the input is the given part of an image, the
output the rest, and only target pixels are data. Because the model scores ``x`` at the target
pixels only, the engine's importance-sampled log-likelihood with the recognition network as proposal
is the conditional log-likelihood (CLL) log p(y | x) of the paper.

- :class:`CVAEBaseline` (``cvae_baseline``): the deterministic network y_hat = f(x), no latents;
- :class:`StructuredOutputCVAE` (``cvae``): prior network p(z | x), generation network p(y | x, z),
  optionally built on a trained baseline: the model is given the baseline (``baseline=``); from a
  TOML experiment, ``baseline_run`` names the run folder the experiment loads it from
  (:func:`pyrovae.experiment.load_trained_model`, through the class's ``trained_parts``);

and the label-conditioned generator :class:`LabelConditionedVAE` (``label_cvae``): encoder (x, y) -> z,
decoder (z, y) -> x, for one-hot or multi-hot labels y.

Notation in the docstrings is the paper's: x the input (the batch's ``c``), y the output (the batch's
``x`` at ``target`` pixels). Guides are in ``guides/cvae.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import BernoulliLogits, DiagonalNormal, StandardNormal
from pyrovae.errors import DataError
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS

# A given pixel's logit in the completed image: +-30 puts all but 1e-13 of the mass on its value. It
# only shapes the observation's mean (plots show the given pixels); the mask keeps it out of every number.
KNOWN_LOGIT = 30.0


def normal_head(output: torch.Tensor, min_scale: float = 1e-4) -> DiagonalNormal:
    """Normal(mu, diag(sigma^2)) from one network output: [mu, raw sigma], sigma = softplus(raw) + min_scale."""
    loc, raw_scale = output.chunk(2, -1)
    return DiagonalNormal(loc, F.softplus(raw_scale) + min_scale)


def expand_leading(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor`` (B, F) broadcast to ``shape + (F,)`` (particle and enumeration dims on the left)."""
    return tensor.expand(tuple(shape) + tensor.shape[-1:])


def target_bernoulli(logits: torch.Tensor, c: torch.Tensor, target: torch.Tensor) -> pyro.distributions.Distribution:
    """prod_{d: target_d} Bernoulli(y_d | sigmoid(logits_d)): one site over the whole image whose given
    pixels are masked out (``Distribution.mask``), so they add nothing to any log-density. Their logits
    are set to +-KNOWN_LOGIT from ``c``, so the mean is the completed image."""
    known = (2.0 * c - 1.0) * KNOWN_LOGIT
    completed = torch.where(target, logits, known)
    return BernoulliLogits(completed, event_dim=0).mask(target).to_event(1)


def check_completion_batch(data: DataSpec, batch, owner: str) -> None:
    """The keys a completion model reads: binary ``x``, ``c`` (the given pixels, -1 at targets) and a bool
    ``target`` mask, both shaped like ``x``, with every row predicting something."""
    x = batch["x"]
    for key in ("c", "target"):
        if key not in batch:
            raise DataError(
                f"{owner} needs batch[{key!r}] (the context c and the target mask of pyrovae.data.quadrants); "
                f"got keys {sorted(batch)}"
            )
        if tuple(batch[key].shape) != tuple(x.shape):
            raise DataError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}; {owner} needs the shape of x, {tuple(x.shape)}")
    c, target = batch["c"], batch["target"]
    if target.dtype != torch.bool:
        raise DataError(f"batch['target'] has dtype {target.dtype}; it must be a bool mask of the pixels to predict")
    if not c.dtype.is_floating_point:
        raise DataError(f"batch['c'] has dtype {c.dtype}; it must be a float tensor")
    empty = ~target.any(-1)
    if empty.any():
        raise DataError(f"batch['target'] row {int(empty.nonzero()[0])} marks no pixel: every row must predict something")
    bad = ~torch.where(target, c == -1, (c == 0) | (c == 1))
    if bad.any():
        row, pixel = (int(i) for i in bad.nonzero()[0])
        raise DataError(
            f"batch['c'] row {row}, feature {pixel} holds {c[row, pixel].item():g}; c holds the given binary pixels "
            "and -1 at target pixels"
        )
    binary = (x == 0) | (x == 1)
    if not binary.all():
        row, pixel = (int(i) for i in (~binary).nonzero()[0])
        raise DataError(f"batch['x'] row {row}, feature {pixel} holds {x[row, pixel].item():g}: a Bernoulli output needs 0/1 pixels")


# --- the deterministic baseline ----------------------------------------------------------------


@dataclass
class CVAEBaselineConfig:
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"

    def __post_init__(self):
        check_sizes(hidden=self.hidden)


@MODELS.register("cvae_baseline")
class CVAEBaseline(Model):
    """Deterministic baseline network of Sohn et al. 2015 (Fig. 1a), no latent variables:

        y_hat = sigmoid(f(x))                              f = MLP: D -> hidden -> D
        y_d ~ Bernoulli(y_hat_d)    for each target pixel d  (given pixels masked out)

    so log p(y | x) = sum_{d in target} log Bernoulli(y_d | y_hat_d) is exact: its negative is the
    baseline's NLL. Pair it with the ``no_latents`` guide. Its trained network is what ``cvae`` is
    given as ``baseline``.
    """

    Config = CVAEBaselineConfig

    def __init__(self, config: CVAEBaselineConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.network = MLP(data.x_features, config.hidden, data.x_features, activation=config.activation)

    @property
    def latent_sites(self):
        return ()

    def check_batch(self, batch) -> None:
        super().check_batch(batch)
        check_completion_batch(self.data, batch, type(self).__name__)

    def logits(self, c: torch.Tensor) -> torch.Tensor:
        """logit y_hat: the baseline's guess for every pixel."""
        return self.network(c)

    def get_extra_state(self):
        # Saved in checkpoints, so a CVAE built on this baseline can check it was trained on the same data.
        return {"data": self.data.name}

    def set_extra_state(self, state):
        self.trained_on = state.get("data") if isinstance(state, dict) else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("x", target_bernoulli(self.logits(c), c, target), obs=x)


def check_baseline(baseline, data: DataSpec, run: Path | None = None) -> None:
    """Refuse a baseline that is not a trained :class:`CVAEBaseline` of the same data."""
    where = f"baseline_run = {str(run)!r}" if run is not None else "the baseline"
    if not isinstance(baseline, CVAEBaseline):
        raise ValueError(f"{where} is a {type(baseline).__name__}, not a trained 'cvae_baseline'")
    trained_on = getattr(baseline, "trained_on", data.name)  # known once trained parameters were loaded
    if trained_on != data.name:
        raise ValueError(
            f"{where} was trained on data {trained_on!r}, but this experiment's data are {data.name!r}: "
            "train the baseline on the same quadrants"
        )


# --- the CVAE for structured output prediction -------------------------------------------------


@dataclass
class StructuredOutputCVAEConfig:
    latent_dim: int = 50
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    # A cvae_baseline run folder: build on its trained network (Sohn et al.'s baseline-initialised CVAE).
    # The experiment loads it and gives the model the trained baseline; the model opens no folder.
    baseline_run: Path | None = None
    # Keep training the baseline's network inside the CVAE (false: frozen, as in Pyro's example).
    train_baseline: bool = False
    # With a baseline: also add its logits to the generation network's (whose last layer starts at 0),
    # so training starts at the baseline's prediction. Off by default: on MNIST quadrants this start
    # collapsed the posterior (KL ~ 0; experiments/README.md), while the guess as an input did not.
    start_at_baseline: bool = False

    def __post_init__(self):
        check_sizes(latent_dim=self.latent_dim, hidden=self.hidden)
        if self.train_baseline and self.baseline_run is None:
            raise ValueError("train_baseline = true needs a baseline_run to train on from")


@MODELS.register("cvae")
class StructuredOutputCVAE(Model):
    """Conditional VAE for structured output prediction (Sohn et al. 2015, Fig. 1b-d), generative half:

        z_n ~ Normal(mu_p(h_n), diag sigma_p(h_n)^2)              (conditional) prior network p(z | x)
        y_nd ~ Bernoulli(sigmoid(l_nd)),  l_n = g([h_n, z_n])      generation network p(y | x, z),
                                                                    for target pixels d only

    with h_n = x_n, the input image with -1 at the pixels to predict. Built on a trained baseline
    (``baseline``, which an experiment loads from the run folder ``baseline_run``; Fig. 1d and Pyro's
    example) the baseline's guess y_hat = sigmoid(f(x)) fills the pixels to predict in the input of
    the prior and generation networks:

        h_n = x_n at given pixels, y_hat_n at target pixels

    and f is frozen unless ``train_baseline``. With ``start_at_baseline`` the generation network also
    starts at the baseline's prediction, l_n = logit(y_hat_n) + g([h_n, z_n]) with g's last layer
    initialised to 0. The recognition network q(z | x, y) is the ``cvae_recognition`` guide.
    """

    Config = StructuredOutputCVAEConfig
    # Trained models of other runs this model is built on: constructor keyword -> the config option
    # naming the run folder. The experiment loads them (pyrovae.experiment.build_model).
    trained_parts = {"baseline": "baseline_run"}

    def __init__(self, config: StructuredOutputCVAEConfig, data: DataSpec, baseline: CVAEBaseline | None = None):
        super().__init__(data)
        self.config = config
        features = data.x_features
        if baseline is None and config.baseline_run is not None:
            raise ValueError(
                f"baseline_run = {str(config.baseline_run)!r}: give the trained baseline itself (baseline=...); "
                "an experiment loads it from the run folder (pyrovae.experiment.load_trained_model)"
            )
        if baseline is not None:
            check_baseline(baseline, data, config.baseline_run)
            baseline.requires_grad_(config.train_baseline)
        self.baseline = baseline
        self.prior_net = MLP(features, config.hidden, 2 * config.latent_dim, activation=config.activation)
        self.generation_net = MLP(features + config.latent_dim, config.hidden, features, activation=config.activation)
        if self.baseline is not None and config.start_at_baseline:
            nn.init.zeros_(self.generation_net[-1].weight)
            nn.init.zeros_(self.generation_net[-1].bias)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def check_batch(self, batch) -> None:
        super().check_batch(batch)
        check_completion_batch(self.data, batch, type(self).__name__)

    def network_input(self, c: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (the input the prior and generation networks read) and logit y_hat (None without a baseline)."""
        if self.baseline is None:
            return c, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_baseline):
            guess = self.baseline.logits(c)
        return torch.where(target, torch.sigmoid(guess), c), guess

    def forward(self, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor, **batch):
        h, guess = self.network_input(c, target)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", normal_head(self.prior_net(h)))
            logits = self.generation_net(torch.cat([expand_leading(h, z.shape[:-1]), z], -1))
            if guess is not None and self.config.start_at_baseline:
                logits = logits + guess
            pyro.sample("x", target_bernoulli(logits, c, target), obs=x)


# --- the label-conditioned generator -----------------------------------------------------------


@dataclass
class LabelConditionedVAEConfig:
    latent_dim: int = 20
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "relu"
    likelihood: str = "bernoulli"

    def __post_init__(self):
        check_sizes(latent_dim=self.latent_dim, hidden=self.hidden)


def label_features(y: torch.Tensor, data: DataSpec, dtype: torch.dtype) -> torch.Tensor:
    """e(y): one-hot of an integer label, or the multi-hot vector itself (``DataSpec.label_format``)."""
    if data.label_format == "multi_hot":
        return y.to(dtype)
    return F.one_hot(y.long(), data.num_classes).to(dtype)


@MODELS.register("label_cvae")
class LabelConditionedVAE(Model):
    """Label-conditioned generator (the CVAE of Sohn et al. 2015 with x = the label, as in Kingma et
    al. 2014's conditional generation), generative half:

        z_n ~ Normal(0, I)
        x_n ~ likelihood(decoder([z_n, e(y_n)]))        decoder = MLP: D_z + C -> hidden -> out

    where e(y) is the one-hot vector of an integer label or the multi-hot label vector itself
    (``label_format = "multi_hot"``, any subset of the C labels). Generating for a label y: draw z from
    the prior and decode it with e(y). The encoder q(z | x, y) is the ``label_cvae_encoder`` guide.
    """

    Config = LabelConditionedVAEConfig

    def __init__(self, config: LabelConditionedVAEConfig, data: DataSpec):
        super().__init__(data)
        if not data.num_classes:
            raise ValueError(f"label_cvae needs labelled data (num_classes); data set {data.name!r} has no labels")
        self.config = config
        self.likelihood = build_likelihood(config.likelihood, data)
        self.decoder = MLP(
            config.latent_dim + data.num_classes, config.hidden, self.likelihood.out_features, activation=config.activation
        )

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def check_batch(self, batch) -> None:
        if "y" not in batch:
            raise DataError(f"{type(self).__name__} needs labels: batch['y'] (got keys {sorted(batch)})")
        y_mask = batch.get("y_mask")
        if torch.is_tensor(y_mask) and not bool(y_mask.all()):
            row = int((~y_mask).nonzero()[0])
            raise DataError(
                f"batch['y_mask'] row {row} is False: {type(self).__name__} conditions on every label and would read a "
                "hidden label as class 0; use all labels (labels_per_class = 0) or a semi-supervised model"
            )
        super().check_batch(batch)

    def forward(self, x: torch.Tensor, y: torch.Tensor, **batch):
        label = label_features(y, self.data, x.dtype)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device))
            features = torch.cat([z, expand_leading(label, z.shape[:-1])], -1)
            pyro.sample("x", self.likelihood(self.decoder(features)), obs=x)
