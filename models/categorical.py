from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch

from pyrovae.errors import ConfigError
from pyrovae.likelihoods import build_likelihood
from pyrovae.nn import MLP, activation_layer, check_sizes
from pyrovae.pair import DataSpec, LatentSite, Model
from pyrovae.registry import MODELS
from pyrovae.relaxed import RelaxedOneHot

ESTIMATORS = ("relaxed", "straight_through", "score_function")


@dataclass
class CategoricalVAEConfig:
    groups: int = 30  # N categorical latents ...
    categories: int = 10  # ... of K classes each
    hidden: list[int] = field(default_factory=lambda: [256, 512])
    activation: str = "relu"
    likelihood: str = "bernoulli"
    # How training gets a gradient through the categorical draws (Jang et al. 2017, section 4.3):
    # "relaxed" (Gumbel-softmax), "straight_through" (ST Gumbel-softmax) or "score_function"
    # (exact OneHotCategorical draws: Trace_ELBO's estimator under 'elbo', VIMCO under 'iwae').
    estimator: str = "relaxed"
    # Whether evaluation (validation, `pyrovae evaluate`, the log-likelihood, samples) scores the
    # exact discrete model with the same parameters, rather than the relaxed one trained.
    discrete_eval: bool = True

    def __post_init__(self):
        check_sizes(groups=self.groups, hidden=self.hidden)
        if isinstance(self.categories, bool) or not isinstance(self.categories, int) or self.categories < 2:
            raise ValueError(f"categories = {self.categories!r} is not allowed: a categorical needs at least 2 classes")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator = {self.estimator!r} is not allowed: choose one of {', '.join(ESTIMATORS)}")
        activation_layer(self.activation)  # an unknown name fails here, naming the choices


def uses_relaxation(config: CategoricalVAEConfig, training: bool) -> bool:
    """Whether the pair draws relaxed (Concrete) latents now: when training with a relaxed or
    straight-through estimator, and in evaluation too unless ``discrete_eval``. The model and
    the guide ask this with their own ``training`` flag, which the loop sets for both at once."""
    return config.estimator != "score_function" and (training or not config.discrete_eval)


def categorical_latent(logits: torch.Tensor, temperature: float, config: CategoricalVAEConfig, training: bool):
    """The distribution of z (``groups`` one-hot vectors of ``categories`` classes) with these
    logits: Concrete(tau, logits), straight-through or not, while relaxing; else OneHotCategorical."""
    if uses_relaxation(config, training):
        if not torch.is_tensor(temperature) and not temperature > 0:
            raise ConfigError(
                f"the {config.estimator} estimator needs a temperature > 0, and [schedules.temperature] gives {temperature!r}: "
                "set its value, or its initial and minimum, above 0"
            )
        relaxed = RelaxedOneHot(temperature, logits, straight_through=config.estimator == "straight_through")
        return relaxed.to_event(1)
    return dist.OneHotCategorical(logits=logits).to_event(1)


@MODELS.register("categorical_vae")
class CategoricalVAE(Model):
    """VAE with N categorical latents of K classes each (Jang et al. 2017), generative half.

    The model is discrete:

        z_{n,g} ~ OneHotCategorical(1/K, ..., 1/K)            g = 1..N, for n in data
        x_n     ~ likelihood(decoder(flatten(z_n)))           decoder = MLP: N*K -> hidden -> out

    Training replaces it, by ``estimator``, with a surrogate that has a gradient:

    - ``relaxed``: z_{n,g} ~ Concrete(tau, uniform) in both the prior and the guide (Gumbel-softmax;
      the objective is the ELBO of the relaxed model, densities on the simplex), the decoder
      reading the relaxed z;
    - ``straight_through``: the same densities, but the decoder reads one_hot(argmax z) while the
      gradient flows through the relaxed z (biased);
    - ``score_function``: the discrete model itself, with score-function gradients from the
      objective (VIMCO under ``iwae``; Trace_ELBO's or TraceGraph_ELBO's under ``elbo`` and
      ``pyro:TraceGraph_ELBO``).

    The temperature tau is a scheduled input (``[schedules.temperature]``). In evaluation mode
    (``model.eval()``: validation, ``pyrovae evaluate``, the importance-sampled log-likelihood and
    ``pyrovae sample``), with ``discrete_eval`` the same parameters define the discrete model above
    and the guide proposes OneHotCategorical(softmax(logits)): every reported bound is then a bound
    on the discrete model's log p(x), whichever estimator trained it.
    """

    Config = CategoricalVAEConfig
    scheduled_inputs = {"temperature": 1.0}

    def __init__(self, config: CategoricalVAEConfig, data: DataSpec):
        super().__init__(data)
        self.config = config
        self.likelihood = build_likelihood(config.likelihood, data)
        self.decoder = MLP(config.groups * config.categories, config.hidden, self.likelihood.out_features, activation=config.activation)

    @property
    def latent_sites(self):
        discrete = self.config.estimator == "score_function"
        return (LatentSite("z", (self.config.groups, self.config.categories), discrete=discrete),)

    def forward(self, x: torch.Tensor, temperature: float = 1.0, **batch):
        c = self.config
        with pyro.plate("data", x.shape[0], device=x.device):
            uniform = x.new_zeros((x.shape[0], c.groups, c.categories))  # logits of 1/K
            z = pyro.sample("z", categorical_latent(uniform, temperature, c, self.training))
            pyro.sample("x", self.likelihood(self.decoder(z.flatten(-2))), obs=x)
