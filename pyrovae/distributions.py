"""Lean Pyro distributions for the sites every VAE has.

Each is a :class:`pyro.distributions.TorchDistribution`, so Pyro's handlers, plates,
traces and ``kl_divergence`` treat it like any other; each gives the same values and
gradients as the Pyro spelling next to it (``tests/test_distributions.py`` checks this).
They exist because a small VAE's step is short enough that distribution bookkeeping
shows in its time (``benchmarks/overhead.py``):

- their trailing ``event_dim`` dims are event dims natively, so there is no
  ``Independent`` wrapper to build, expand and sum through;
- ``expand`` to the shape they already have (which a plate asks for at every site)
  returns the distribution itself instead of building two new objects;
- :class:`DiagonalNormal` keeps the noise of its last reparameterized draw, so
  log q of that draw needs no division by sigma:

      z = mu + sigma * eps   =>   log q(z) = -1/2 |eps|^2 - sum log sigma - (D/2) log 2 pi.

  This has the same value as the general formula and the same total gradient with
  respect to mu and sigma (eps is a constant of the draw); it also has fewer autograd
  nodes. Any other value (a replayed one, DReG's re-scored one) takes the general formula.

| here                                   | Pyro spelling                                       |
|----------------------------------------|-----------------------------------------------------|
| ``DiagonalNormal(loc, scale, n)``      | ``Normal(loc, scale).to_event(n)``                  |
| ``StandardNormal(batch, event)``       | ``Normal(0, 1).expand(batch + event).to_event(len(event))`` |
| ``BernoulliLogits(logits, n)``         | ``Bernoulli(logits=logits).to_event(n)``            |
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints, register_kl
from torch.nn import functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _sum_event(values: torch.Tensor, event_dim: int) -> torch.Tensor:
    if event_dim == 0:
        return values
    return values.sum(tuple(range(-event_dim, 0)))


def _split_shape(shape: torch.Size, event_dim: int) -> tuple[torch.Size, torch.Size]:
    if event_dim > len(shape):
        raise ValueError(f"event_dim={event_dim} is more than the {len(shape)} dims of parameters shaped {tuple(shape)}")
    cut = len(shape) - event_dim
    return shape[:cut], shape[cut:]


class _LeanDistribution(TorchDistribution):
    """Shared plumbing: support over the event dims, and an ``expand`` that is free when a plate
    asks for the batch shape the distribution already has (it does so at every site)."""

    base_support = constraints.real

    @property
    def support(self):
        return constraints.independent(self.base_support, self.event_dim)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return self._expanded(batch_shape)

    def _expanded(self, batch_shape: torch.Size) -> "_LeanDistribution":
        raise NotImplementedError


class DiagonalNormal(_LeanDistribution):
    """Normal with diagonal covariance over the last ``event_dim`` dims:

        log q(z) = sum_d [ -1/2 ((z_d - mu_d) / sigma_d)^2 - log sigma_d - 1/2 log 2 pi ].
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, event_dim: int = 1, validate_args=None):
        if loc.shape != scale.shape:
            loc, scale = torch.broadcast_tensors(loc, scale)
        self.loc, self.scale = loc, scale
        self._last_draw: tuple[torch.Tensor, torch.Tensor] | None = None  # (value, noise)
        super().__init__(*_split_shape(loc.shape, event_dim), validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2)

    def _expanded(self, batch_shape):
        shape = batch_shape + self.event_shape
        return DiagonalNormal(self.loc.expand(shape), self.scale.expand(shape), self.event_dim, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + self.scale * noise
        self._last_draw = (value, noise)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._last_draw is not None and value is self._last_draw[0]:
            noise = self._last_draw[1]
        else:
            if self._validate_args:
                self._validate_sample(value)
            noise = (value - self.loc) / self.scale
        size = math.prod(self.event_shape)
        return -0.5 * _sum_event(noise.pow(2), self.event_dim) - _sum_event(self.scale.log(), self.event_dim) - size * HALF_LOG_2PI

    def entropy(self) -> torch.Tensor:
        return _sum_event(self.scale.log() + 0.5 + HALF_LOG_2PI, self.event_dim)

    def detached(self) -> DiagonalNormal:
        """The same distribution with its parameters cut from the autograd graph (for DReG)."""
        return DiagonalNormal(self.loc.detach(), self.scale.detach(), self.event_dim, validate_args=False)


class StandardNormal(_LeanDistribution):
    """Normal(0, I) over ``event_shape``, batched over ``batch_shape``:

        log p(z) = -1/2 |z|^2 - (D/2) log 2 pi,   D = prod(event_shape).
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, batch_shape, event_shape, *, dtype=None, device=None, validate_args=None):
        self.dtype, self.device = dtype or torch.get_default_dtype(), device
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros(self.batch_shape + self.event_shape, dtype=self.dtype, device=self.device)

    @property
    def variance(self) -> torch.Tensor:
        return torch.ones(self.batch_shape + self.event_shape, dtype=self.dtype, device=self.device)

    def _expanded(self, batch_shape):
        return StandardNormal(batch_shape, self.event_shape, dtype=self.dtype, device=self.device, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return torch.randn(self._extended_shape(sample_shape), dtype=self.dtype, device=self.device)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        size = math.prod(self.event_shape)
        return -0.5 * _sum_event(value.pow(2), len(self.event_shape)) - size * HALF_LOG_2PI

    def entropy(self) -> torch.Tensor:
        size = math.prod(self.event_shape)
        return torch.full(self.batch_shape, size * (0.5 + HALF_LOG_2PI), dtype=self.dtype, device=self.device)


class BernoulliLogits(_LeanDistribution):
    """Independent Bernoullis over the last ``event_dim`` dims, parameterized by logits:

        log p(x) = sum_d [ x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d) ].
    """

    arg_constraints = {"logits": constraints.real}
    base_support = constraints.boolean

    def __init__(self, logits: torch.Tensor, event_dim: int = 1, validate_args=None):
        self.logits = logits
        super().__init__(*_split_shape(logits.shape, event_dim), validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        return self.probs * (1 - self.probs)

    def _expanded(self, batch_shape):
        return BernoulliLogits(self.logits.expand(batch_shape + self.event_shape), self.event_dim, validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(self._extended_shape(sample_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.shape != logits.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return -_sum_event(F.binary_cross_entropy_with_logits(logits, value, reduction="none"), self.event_dim)

    def entropy(self) -> torch.Tensor:
        return _sum_event(F.binary_cross_entropy_with_logits(self.logits, self.probs, reduction="none"), self.event_dim)


@register_kl(DiagonalNormal, DiagonalNormal)
def _kl_diagonal_diagonal(q: DiagonalNormal, p: DiagonalNormal) -> torch.Tensor:
    # KL = sum_d [ log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2 ]
    if q.event_dim != p.event_dim:
        raise NotImplementedError("KL between DiagonalNormals with different event dims")
    ratio = (q.scale / p.scale).pow(2)
    terms = 0.5 * (ratio + ((q.loc - p.loc) / p.scale).pow(2) - 1 - ratio.log())
    return _sum_event(terms, q.event_dim)


@register_kl(DiagonalNormal, StandardNormal)
def _kl_diagonal_standard(q: DiagonalNormal, p: StandardNormal) -> torch.Tensor:
    # KL = sum_d [ (sigma_q^2 + mu_q^2 - 1) / 2 - log sigma_q ]
    if q.event_dim != len(p.event_shape):
        raise NotImplementedError("KL between a DiagonalNormal and a StandardNormal with different event dims")
    return _sum_event(0.5 * (q.scale.pow(2) + q.loc.pow(2) - 1) - q.scale.log(), q.event_dim)
