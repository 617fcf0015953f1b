"""The relaxed one-hot categorical (Concrete / Gumbel-softmax) in log space, with an optional
straight-through sample.

Jang et al. 2017 and Maddison et al. 2017: with temperature tau > 0 and logits l over K classes,

    g_k ~ Gumbel(0, 1),   y_k = log softmax((l + g) / tau)_k,   z = exp(y)           (a point of the simplex)

    log p(z) = log (K-1)! + (K-1) log tau + sum_k (l_k - tau y_k) - K logsumexp_k (l_k - tau y_k) - sum_k y_k,

the last term being the Jacobian of z = exp(y). As tau -> 0 the draws tend to one-hot vectors
distributed as Categorical(softmax(l)).

:class:`RelaxedOneHot` has the density of ``pyro.distributions.RelaxedOneHotCategorical`` (tested
against it) but scores its own draws from their log-space value y, which it attaches to the drawn
tensor: ``torch.distributions`` recomputes y = log(exp(y)), which is -inf where a coordinate of z
underflowed to 0 (confident logits, low temperature), and then the loss is NaN. Any density of this
family (the prior of the model, too) reads the attached y of the value it scores, so the prior and the
guide score the same draw exactly; a value without it (a copy) takes log z, with z clamped to the
smallest positive float.

``straight_through=True`` (Jang et al.'s ST Gumbel-softmax) returns the one-hot vector of
argmax_k z_k in the forward pass, exactly, and passes the gradient to the relaxed z unchanged in
the backward pass. Its density is that of the relaxed draw z behind it (the draw carries it), as
in Pyro's ``RelaxedOneHotCategoricalStraightThrough``.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import clamp_probs

# The attribute of a drawn tensor holding the log-space value y of the relaxed draw behind it.
LOG_VALUE = "_relaxed_log_value"


class _StraightThrough(torch.autograd.Function):
    """Forward: one_hot(argmax_k z_k), exactly. Backward: the gradient goes to z unchanged."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        hard = torch.zeros_like(soft)
        return hard.scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """one_hot(argmax(soft)) in the forward pass, with the identity's gradient to ``soft``."""
    return _StraightThrough.apply(soft)


class RelaxedOneHot(TorchDistribution):
    """Concrete(tau, logits) over the last dim (one relaxed categorical per batch element; add
    ``.to_event(1)`` for a group of them). ``temperature`` is a python float or a tensor that
    broadcasts with the logits' batch shape."""

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.simplex
    has_rsample = True

    def __init__(self, temperature, logits: torch.Tensor, straight_through: bool = False, validate_args=None):
        if not torch.is_tensor(temperature):
            if not temperature > 0:
                raise ValueError(f"RelaxedOneHot needs a temperature > 0, got {temperature!r}")
            temperature = torch.tensor(float(temperature), dtype=logits.dtype, device=logits.device)
        self.temperature = temperature
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.straight_through = straight_through
        batch_shape = torch.broadcast_shapes(logits.shape[:-1], temperature.shape)
        super().__init__(batch_shape, logits.shape[-1:], validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        logits = self.logits.expand(batch_shape + self.event_shape)
        return RelaxedOneHot(self.temperature, logits, self.straight_through, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        uniform = clamp_probs(torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device))
        gumbel = -(-uniform.log()).log()
        log_value = torch.log_softmax((self.logits + gumbel) / self.temperature.unsqueeze(-1), -1)
        value = log_value.exp()
        if self.straight_through:
            value = straight_through(value)
        setattr(value, LOG_VALUE, log_value)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_value = getattr(value, LOG_VALUE, None)
        if log_value is None:
            if self._validate_args:
                self._validate_sample(value)
            log_value = value.clamp(min=torch.finfo(value.dtype).tiny).log()
        tau = self.temperature
        classes = self.event_shape[0]
        score = self.logits - tau.unsqueeze(-1) * log_value
        log_normalizer = math.lgamma(classes) + (classes - 1) * tau.log()
        return log_normalizer + score.sum(-1) - classes * score.logsumexp(-1) - log_value.sum(-1)
