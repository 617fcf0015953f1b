"""Observation heads: decoder output -> Pyro distribution over one x.

A head says how many decoder outputs it needs for data of a given shape
(``out_features``), turns those outputs into a distribution whose event shape is
the data's shape (``forward``), and checks that data lies in its support
(``check_data``) so a mismatch is an error, never a silent NaN.

Heads: ``bernoulli``, ``gaussian``, ``categorical`` and ``multinomial`` (counts over a vector of
categories, with N = the row's total; :class:`MultinomialLogits`). :class:`WordCategorical` is the
per-position categorical over a vocabulary that the sentence models observe words with.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from pyrovae.distributions import BernoulliLogits, DiagonalNormal
from pyrovae.errors import DataError
from pyrovae.nn.sequence import word_log_probs
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


class WordCategorical(TorchDistribution):
    """One categorical per position, over the vocabulary, parameterized by unnormalized logits:

        log p(w) = logits_w - log sum_v exp(logits_v)

    the same values and gradients as ``pyro.distributions.Categorical(logits=logits)``
    (``tests/test_sentence_vae.py`` checks), computed by one fused ``cross_entropy`` instead of
    normalizing the whole (..., T, V) logits tensor first: at a 10,000-word vocabulary that
    normalization is a sizeable part of a training step. The sentence models' word site.
    """

    arg_constraints = {"logits": constraints.real_vector}

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self._vocabulary_size() - 1)

    def _vocabulary_size(self) -> int:
        return self.logits.shape[-1]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        per_position = self._per_position()
        return self._with(per_position.expand(batch_shape + per_position.shape[-1:]))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        per_position = self._per_position()
        rows = per_position.expand(shape + per_position.shape[-1:]).reshape(-1, per_position.shape[-1])
        return self._score(rows, value.long().expand(shape).reshape(-1)).view(shape)

    def _per_position(self) -> torch.Tensor:
        """What the distribution holds per position (..., width): here the logits."""
        return self.logits

    def _with(self, per_position: torch.Tensor) -> "WordCategorical":
        return WordCategorical(per_position, validate_args=False)

    def _score(self, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """log p of ``words`` (P,) at positions whose rows (P, width) are given."""
        return -F.cross_entropy(rows, words, reduction="none")

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return dist.Categorical(logits=self.logits, validate_args=False).sample(sample_shape)


class ProjectedWordCategorical(WordCategorical):
    """:class:`WordCategorical` with logits = W h + b of features h (..., F), never held whole:

        log p(w) = (W h + b)_w - log sum_v exp((W h + b)_v)

    :meth:`log_prob` runs the output layer and the fused ``cross_entropy`` on slices of rows
    (:func:`pyrovae.nn.sequence.word_log_probs`, 8 MB of logits each) and joins the scores: the same values and gradients
    as ``WordCategorical(F.linear(h, W, b))`` (``tests/test_sentence_vae.py`` checks), without
    the whole (..., V) logits tensor and its gradient. ``logits`` builds them on demand (for
    sampling). The sentence models' word site."""

    arg_constraints = {"features": constraints.real_vector}

    def __init__(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, validate_args=None):
        self.features, self.weight, self.bias = features, weight, bias
        TorchDistribution.__init__(self, features.shape[:-1], validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        flat = self.features.reshape(-1, self.features.shape[-1])
        return torch.addmm(self.bias, flat, self.weight.t()).view(self.batch_shape + self.weight.shape[:1])

    def _per_position(self) -> torch.Tensor:
        return self.features

    def _with(self, per_position: torch.Tensor) -> "ProjectedWordCategorical":
        return ProjectedWordCategorical(per_position, self.weight, self.bias, validate_args=False)

    def _score(self, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        return word_log_probs(rows, self.weight, self.bias, words)

    def _vocabulary_size(self) -> int:
        return self.weight.shape[0]


class MultinomialLogits(TorchDistribution):
    """Multinomial counts over the last dim, one row per batch element (Liang et al. 2018):

        pi = softmax(logits),   N = sum_i x_i,
        log p(x) = log N! - sum_i log x_i! + sum_i x_i log pi_i.

    N is read from the value scored, so one distribution scores rows of any total. With
    ``include_constant = False`` the log-density is sum_i x_i log pi_i only, as in the paper's
    loss: the dropped term does not depend on the logits (same gradients), but the number is then
    not a log-likelihood. ``total_count`` (per row, broadcast to the batch shape) is needed only
    to draw counts and for the mean N pi.
    """

    arg_constraints = {"logits": constraints.independent(constraints.real, 1)}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, logits: torch.Tensor, total_count=None, include_constant: bool = True, validate_args=None):
        if logits.dim() < 1:
            raise ValueError("MultinomialLogits needs logits with the categories on the last dim")
        # Normalised once; clamped so that 0 * log pi stays 0 where a logit is -inf.
        self.logits = (logits - logits.logsumexp(-1, keepdim=True)).clamp(min=torch.finfo(logits.dtype).min)
        batch_shape, event_shape = logits.shape[:-1], logits.shape[-1:]
        self.total_count = None if total_count is None else torch.as_tensor(total_count, dtype=logits.dtype, device=logits.device).expand(batch_shape)
        self.include_constant = include_constant
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:  # a plate asks for the shape it has at every site
            return self
        new = self._get_checked_instance(MultinomialLogits, _instance)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        new.total_count = None if self.total_count is None else self.total_count.expand(batch_shape)
        new.include_constant = self.include_constant
        super(MultinomialLogits, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def _counts(self) -> torch.Tensor:
        if self.total_count is None:
            raise ValueError(
                "MultinomialLogits has no total_count (draws per row), so it cannot be sampled or give a mean; "
                "build it with total_count, e.g. the data's row sums"
            )
        return self.total_count

    @property
    def mean(self) -> torch.Tensor:
        return self._counts().unsqueeze(-1) * self.probs

    @property
    def variance(self) -> torch.Tensor:
        probs = self.probs
        return self._counts().unsqueeze(-1) * probs * (1 - probs)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """N_n draws of a category per row n, counted: (*sample_shape, *batch_shape, categories)."""
        sample_shape = torch.Size(sample_shape)
        counts = self._counts().round().long().expand(sample_shape + self.batch_shape)
        result = torch.zeros(self._extended_shape(sample_shape), dtype=self.logits.dtype, device=self.logits.device)
        most = int(counts.max()) if counts.numel() else 0
        if most == 0:
            return result
        with torch.no_grad():
            # `most` draws for every row; a row keeps its first N_n of them.
            draws = dist.Categorical(logits=self.logits, validate_args=False).sample((most,) + sample_shape).movedim(0, -1)
            kept = torch.arange(most, device=counts.device) < counts.unsqueeze(-1)
            return result.scatter_add_(-1, draws, kept.to(result.dtype))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_prob = (value * self.logits).sum(-1)
        if self.include_constant:
            log_prob = log_prob + torch.lgamma(value.sum(-1) + 1) - torch.lgamma(value + 1).sum(-1)
        return log_prob


@LIKELIHOODS.register("multinomial")
class MultinomialLikelihood(Likelihood):
    """p(x | z) = Multinomial(x | N = sum_i x_i, pi = softmax(logits(z))) over a vector of counts x
    (items a user clicked, words of a document, labels of an example):

        log p(x | z) = log N! - sum_i log x_i! + sum_i x_i log pi_i(z).

    ``include_constant = False`` reports sum_i x_i log pi_i only (Liang et al. 2018's loss; same
    gradients, but not a log-likelihood). Pass the rows' totals as ``total_count`` to draw from it
    or take its mean (the models do: ``likelihood(logits, total_count=x.sum(-1))``)."""

    def __init__(self, data: DataSpec, include_constant: bool = True):
        super().__init__(data)
        if len(self.x_shape) != 1 or self.x_shape[0] < 2:
            raise ValueError(f"multinomial likelihood needs x of shape (categories,) with >= 2 categories, got {self.x_shape}")
        self.include_constant = include_constant

    def forward(self, logits: torch.Tensor, total_count=None) -> dist.Distribution:
        return MultinomialLogits(logits, total_count, include_constant=self.include_constant)

    def mean(self, logits: torch.Tensor, total_count=None) -> torch.Tensor:
        return self(logits, total_count).mean

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        bad = (x < 0) | (x != x.round())
        if bad.any():
            raise DataError(
                f"multinomial likelihood needs counts (integers >= 0), but x has values in "
                f"[{float(x.min()):g}, {float(x.max()):g}] ({_first_offender(bad, x)})"
            )


def build_likelihood(name: str, data: DataSpec, **options) -> Likelihood:
    return LIKELIHOODS.resolve(name, "model.likelihood")(data, **options)
