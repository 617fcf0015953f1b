"""Observation heads: decoder output -> Pyro distribution over one x.

A head says how many decoder outputs it needs for data of a given shape
(``out_features``), turns those outputs into a distribution whose event shape is
the data's shape (``forward``), and checks that data lies in its support
(``check_data``) so a mismatch is an error, never a silent NaN.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.distributions import BernoulliLogits, DiagonalNormal
from pyrovae.errors import DataError
from pyrovae.pair import DataSpec, first_offender
from pyrovae.registry import LIKELIHOODS


class Likelihood(nn.Module):
    def __init__(self, data: DataSpec):
        super().__init__()
        self.x_shape = tuple(data.x_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.x_shape)

    def _unflatten(self, output: torch.Tensor, per_element: int = 1) -> torch.Tensor:
        shape = output.shape[:-1] + self.x_shape + ((per_element,) if per_element > 1 else ())
        return output.reshape(shape)

    def check_data(self, x: torch.Tensor) -> None:
        if x.dtype.is_floating_point and not torch.isfinite(x).all():
            offender = _first_offender(~torch.isfinite(x), x)
            raise DataError(f"{type(self).__name__}: data contains NaN or infinite values ({offender})")


def _first_offender(bad: torch.Tensor, x: torch.Tensor) -> str:
    """``row r, feature f is v`` for the first True of ``bad`` (x's batch dims on the left)."""
    where, value = first_offender(bad, x)
    return f"{where} is {value}"


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """p(x | z) = prod_d Bernoulli(x_d | sigmoid(logits_d(z))); x must be 0 or 1."""

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return BernoulliLogits(self._unflatten(logits), len(self.x_shape))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._unflatten(logits))

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        bad = (x != 0) & (x != 1)
        if bad.any():
            low, high = float(x.min()), float(x.max())
            raise DataError(
                f"Bernoulli likelihood needs binary data (0 or 1), but x has values in [{low:g}, {high:g}] "
                f"({_first_offender(bad, x)}); "
                "binarize it (data.binarize = 'dynamic' or 'static') or choose a Gaussian likelihood"
            )


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(Likelihood):
    """p(x | z) = prod_d Normal(x_d | mu_d(z), sigma_d), with sigma fixed (``scale``)
    or, when ``scale`` is None, a learned per-feature sigma_d = softplus(s_d) + 1e-3."""

    def __init__(self, data: DataSpec, scale: float | None = None):
        super().__init__(data)
        if scale is not None and not scale > 0:
            raise ValueError(f"Gaussian likelihood scale must be > 0, got {scale}")
        self.fixed_scale = scale
        if scale is None:
            # softplus(0.5413) = 1.0: start at unit variance.
            self.raw_scale = nn.Parameter(torch.full(self.x_shape, 0.5413))

    def scale(self) -> torch.Tensor | float:
        if self.fixed_scale is not None:
            return self.fixed_scale
        return F.softplus(self.raw_scale) + 1e-3

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        loc = self._unflatten(loc)
        scale = self.scale()
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device).expand_as(loc)
        return DiagonalNormal(loc, scale, len(self.x_shape))

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return self._unflatten(loc)


@LIKELIHOODS.register("categorical")
class CategoricalLikelihood(Likelihood):
    """p(x | z) = prod_d Categorical(x_d | softmax(logits_d(z))), x_d in {0, ..., C-1}."""

    def __init__(self, data: DataSpec, num_categories: int | None = None):
        super().__init__(data)
        num_categories = num_categories or data.num_categories
        if not num_categories or num_categories < 2:
            raise ValueError("Categorical likelihood needs num_categories >= 2 (from the data or the config)")
        self.num_categories = int(num_categories)

    @property
    def out_features(self) -> int:
        return math.prod(self.x_shape) * self.num_categories

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        logits = self._unflatten(logits, self.num_categories)
        return dist.Categorical(logits=logits, validate_args=False).to_event(len(self.x_shape))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self._unflatten(logits, self.num_categories), -1)
        values = torch.arange(self.num_categories, dtype=probs.dtype, device=probs.device)
        return (probs * values).sum(-1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        bad = (x < 0) | (x >= self.num_categories)
        if x.dtype.is_floating_point:
            bad = bad | (x != x.round())
        if bad.any():
            raise DataError(
                f"Categorical likelihood needs integer data in [0, {self.num_categories - 1}], "
                f"but x has values in [{float(x.min()):g}, {float(x.max()):g}] ({_first_offender(bad, x)})"
            )


def build_likelihood(name: str, data: DataSpec, **options) -> Likelihood:
    return LIKELIHOODS.resolve(name, "model.likelihood")(data, **options)
