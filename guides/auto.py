"""``guide.name = "auto"``: the amortized guide built from the model's own trace.

The model is traced once on the first batch (:meth:`pyrovae.pair.Model.describe`); the guide
reads what the trace shows and needs no code of its own:

    u_n = [features of every batch tensor the model observes or conditions on]   one-hot labels,
          masked labels times their mask (and the mask), flattened x, contexts
    h_n = trunk(u_n)                                   MLP: hidden layers shared by every site
    for each latent site s, in the order of the model's inverted graph:
        theta_{n,s} = head_s(h_n)                                        structure = "mean_field"
        theta_{n,s} = head_s([h_n, v(z_{n,pa(s)})])                      structure = "dependent"
        z_{n,s} ~ q_s(theta_{n,s})

where pa(s) are the latent sites a faithful inverse of the model conditions s on (Webb et al.
2018; Pyro's ``get_dependencies``), v(.) their sampled values (one-hot for categories), and q_s
maps the head's outputs to the site's support (``torch.distributions.biject_to``):

    real                  Normal(mu, softplus(r) + min_scale)
    positive              LogNormal(mu, softplus(r) + min_scale)
    unit interval (Beta)  Beta(softplus(a) + min_scale, softplus(b) + min_scale), or "logit_normal"
    simplex (Dirichlet)   Dirichlet(softplus(a) + min_scale), or "logistic_normal" (stick breaking)
    any other support     Normal on the unconstrained space pushed through biject_to(support)
    discrete              Categorical / OneHotCategorical / Bernoulli(logits): score function,
                          or a straight-through relaxed draw (``discrete = "relaxed"``)

A site the model marks for enumeration (``infer={"enumerate": ...}``, or a ``LatentSite``
declared ``enumerated``) is enumerated by the guide, from q(s | x), masked to the rows whose label
is hidden where the model observes it with ``obs_mask``, and summed out exactly by ``enum_elbo``.
It comes first; under ``dependent`` the continuous sites read its value: M2's q(y | x) q(z | x, y).

Every site is drawn inside the model's own data plate (its name, e.g. ``"images"``, its dim and its
size), so the pair also runs under Pyro's ``Trace_ELBO``, ``TraceGraph_ELBO`` and ``TraceEnum_ELBO``
as one plate, without a "plate statements in guide but not model" warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to
from torch.distributions import constraints as c
from torch.nn import functional as F

from pyrovae.distributions import DiagonalNormal
from pyrovae.errors import PairMismatchError
from pyrovae.nn import MLP, activation_layer, check_sizes
from pyrovae.pair import DataSpec, Guide, Model, describe_support
from pyrovae.registry import GUIDES

STRUCTURES = ("mean_field", "dependent")
CONTINUOUS_FAMILIES = ("normal", "lognormal", "beta", "logit_normal", "dirichlet", "logistic_normal", "transformed_normal")
# The families that can draw a site of each support (keyed by the default family of the support).
FAMILIES_FOR = {
    "normal": ("normal", "transformed_normal"),
    "lognormal": ("lognormal", "transformed_normal"),
    "beta": ("beta", "logit_normal", "transformed_normal"),
    "dirichlet": ("dirichlet", "logistic_normal", "transformed_normal"),
    "transformed_normal": ("transformed_normal",),
}
DISCRETE_ESTIMATORS = ("score_function", "relaxed")
# One-hot inputs wider than this are refused (token sequences want a sequence encoder).
MAX_ONE_HOT_FEATURES = 100_000


@dataclass
class AutoGuideConfig:
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    activation: str = "tanh"
    # "mean_field": every site from the data alone; "dependent": each site also reads the sampled
    # values of the sites the model's inverted dependency graph conditions it on.
    structure: str = "mean_field"
    # Hidden layers of a dependent site's head on [h, parents' values] (None: the same as hidden).
    dependent_hidden: list[int] | None = None
    # Scales and concentrations are softplus(raw) + min_scale: q never collapses to a point.
    min_scale: float = 1e-4
    # Per-site family where there is a choice, e.g. {theta = "logistic_normal"}.
    family: dict = field(default_factory=dict)
    # Discrete sites the model does not enumerate: "score_function" or "relaxed" (straight-through).
    discrete: str = "score_function"
    temperature: float = 0.5
    batch_norm: bool = False
    dropout: float = 0.0
    # The batch keys the encoder reads (None: every key the model observes or conditions on).
    inputs: list[str] | None = None

    def __post_init__(self):
        check_sizes(hidden=self.hidden)
        if self.dependent_hidden:
            check_sizes(dependent_hidden=self.dependent_hidden)
        activation_layer(self.activation)
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure = {self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if self.discrete not in DISCRETE_ESTIMATORS:
            raise ValueError(f"discrete = {self.discrete!r}: expected one of {', '.join(DISCRETE_ESTIMATORS)}")
        for site, family in self.family.items():
            if family not in CONTINUOUS_FAMILIES:
                raise ValueError(f"family.{site} = {family!r}: expected one of {', '.join(CONTINUOUS_FAMILIES)}")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale = {self.min_scale!r} is not allowed: it must be > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature!r} is not allowed: it must be > 0")


def _numel(shape) -> int:
    return int(math.prod(shape))


def _default_family(support) -> str:
    base = support
    while isinstance(base, c.independent):
        base = base.base_constraint
    if isinstance(base, c._Real):
        return "normal"
    if isinstance(base, (c._GreaterThan, c._GreaterThanEq)) and float(base.lower_bound) == 0.0:
        return "lognormal"
    if base is c.unit_interval or (
        isinstance(base, c._Interval) and float(base.lower_bound) == 0.0 and float(base.upper_bound) == 1.0
    ):
        return "beta"
    if isinstance(base, c._Simplex):
        return "dirichlet"
    return "transformed_normal"


class _SiteHead:
    """How one latent site's parameters are laid out, and the distribution they make."""

    def __init__(self, site, family: str | None, config: AutoGuideConfig, model_name: str):
        self.site, self.name, self.event_shape = site, site.name, tuple(site.event_shape)
        self.min_scale, self.temperature = config.min_scale, config.temperature
        self.discrete = site.discrete
        if site.discrete:
            self.kind = site.distribution
            if self.kind not in ("Categorical", "OneHotCategorical", "Bernoulli"):
                raise PairMismatchError(
                    f"auto guide: {model_name}'s discrete site {site.name!r} is a {self.kind}; the auto guide drafts "
                    "Categorical, OneHotCategorical and Bernoulli sites only: write a guide for it"
                )
            self.relaxed = config.discrete == "relaxed" and not site.enumerated
            if self.relaxed and self.kind == "Categorical":
                raise PairMismatchError(
                    f"auto guide: discrete = 'relaxed' needs one-hot values, but {model_name}'s site {site.name!r} is a "
                    "Categorical over integers: use OneHotCategorical in the model, or discrete = 'score_function'"
                )
            categories = site.categories or 2
            self.size = _numel(self.event_shape) * (categories if self.kind == "Categorical" else 1)
            self.categories = categories
            return
        natural = _default_family(site.support)
        self.family = family or natural
        if self.family not in FAMILIES_FOR[natural]:
            raise PairMismatchError(
                f"auto guide: family {self.family!r} does not fit {model_name}'s site {site.name!r} (support "
                f"{describe_support(site.support)}); choose one of {', '.join(FAMILIES_FOR[natural])}"
            )
        if self.family in ("dirichlet", "logistic_normal") and not self.event_shape:
            raise PairMismatchError(f"auto guide: family {self.family!r} needs a vector site, but {site.name!r} is scalar")
        if self.family == "dirichlet":
            self.size = _numel(self.event_shape)
        elif self.family == "logistic_normal":
            self.size = 2 * _numel(self.event_shape[:-1] + (self.event_shape[-1] - 1,))
        elif self.family == "transformed_normal":
            self.transform = biject_to(site.support)
            self.unconstrained = tuple(self.transform.inverse_shape(torch.Size(self.event_shape)))
            self.size = 2 * _numel(self.unconstrained)
        else:
            self.size = 2 * _numel(self.event_shape)

    def value_features(self) -> int:
        """Width of this site's sampled value as a child head reads it."""
        if self.discrete and self.kind == "Categorical":
            return _numel(self.event_shape) * self.categories
        return _numel(self.event_shape)

    def encode_value(self, value: torch.Tensor) -> torch.Tensor:
        """The value (leading dims kept) flattened per example, one-hot for integer categories."""
        event = len(self.event_shape)
        if self.discrete and self.kind == "Categorical":
            value = F.one_hot(value.long(), self.categories)
            event += 1
        lead = value.shape[: value.dim() - event]
        return value.reshape(lead + (-1,)).to(torch.get_default_dtype())

    def distribution(self, raw: torch.Tensor):
        lead, shape = raw.shape[:-1], self.event_shape
        softplus = lambda t: F.softplus(t) + self.min_scale  # noqa: E731
        if self.discrete:
            if self.kind == "Categorical":
                logits = raw.reshape(lead + shape + (self.categories,))
                return dist.Categorical(logits=logits).to_event(len(shape))
            logits = raw.reshape(lead + shape)
            if self.kind == "OneHotCategorical":
                one_hot = (
                    _StraightThroughOneHot(torch.tensor(self.temperature, device=raw.device), logits=logits, validate_args=False)
                    if self.relaxed
                    else dist.OneHotCategorical(logits=logits)
                )
                return one_hot.to_event(len(shape) - 1)
            bernoulli = (
                _StraightThroughBernoulli(torch.tensor(self.temperature, device=raw.device), logits=logits, validate_args=False)
                if self.relaxed
                else dist.Bernoulli(logits=logits)
            )
            return bernoulli.to_event(len(shape))
        if self.family == "dirichlet":
            return dist.Dirichlet(softplus(raw.reshape(lead + shape))).to_event(len(shape) - 1)
        first, second = raw.chunk(2, -1)
        if self.family == "normal":
            return DiagonalNormal(first.reshape(lead + shape), softplus(second).reshape(lead + shape), len(shape))
        if self.family == "lognormal":
            return dist.LogNormal(first.reshape(lead + shape), softplus(second).reshape(lead + shape)).to_event(len(shape))
        if self.family == "beta":
            return dist.Beta(softplus(first).reshape(lead + shape), softplus(second).reshape(lead + shape)).to_event(len(shape))
        if self.family == "logit_normal":
            base = dist.Normal(first.reshape(lead + shape), softplus(second).reshape(lead + shape))
            return dist.TransformedDistribution(base, [torch.distributions.SigmoidTransform()]).to_event(len(shape))
        if self.family == "logistic_normal":
            inner = shape[:-1] + (shape[-1] - 1,)
            base = dist.Normal(first.reshape(lead + inner), softplus(second).reshape(lead + inner)).to_event(1)
            return dist.TransformedDistribution(base, [torch.distributions.StickBreakingTransform()]).to_event(len(shape) - 1)
        # Any other support: a Normal on the unconstrained space, pushed through biject_to.
        unconstrained = self.unconstrained
        base = dist.Normal(first.reshape(lead + unconstrained), softplus(second).reshape(lead + unconstrained)).to_event(len(unconstrained))
        return _PushedForward(base, self.transform, self.site.support)


class _StraightThroughOneHot(dist.RelaxedOneHotCategoricalStraightThrough):
    """Gumbel-softmax straight-through draws are one-hot (the relaxed value carries the gradient);
    the support says so, so the pair check compares it with a OneHotCategorical prior. Built with
    validate_args=False: its log-density is read at the relaxed value behind the one-hot draw."""

    support = c.one_hot


class _StraightThroughBernoulli(dist.RelaxedBernoulliStraightThrough):
    """Straight-through relaxed Bernoulli: draws are 0 or 1."""

    support = c.boolean


class _PushedForward(dist.TransformedDistribution):
    """A TransformedDistribution that reports the support it was pushed onto (torch reports the
    last transform's codomain, ``real`` for an affine map)."""

    def __init__(self, base, transform, support, validate_args=None):
        self._target_support = support
        super().__init__(base, [transform], validate_args=validate_args)

    @property
    def support(self):
        return self._target_support

    def expand(self, batch_shape, _instance=None):
        base = self.base_dist.expand(torch.Size(batch_shape) + self.base_dist.batch_shape[len(self.batch_shape) :])
        return _PushedForward(base, self.transforms[0], self._target_support)


@GUIDES.register("auto")
class AutoGuide(Guide):
    """The amortized guide drafted from the model's trace (see the module docstring for the
    equations). Options: ``hidden``, ``activation``, ``structure``, ``dependent_hidden``,
    ``min_scale``, ``family`` (per site), ``discrete``, ``temperature``, ``batch_norm``, ``dropout``,
    ``inputs`` (the batch keys the encoder reads)."""

    Config = AutoGuideConfig

    def __init__(self, config: AutoGuideConfig, data: DataSpec, model: Model):
        super().__init__(data)
        self.config = config
        description = getattr(model, "description", None)
        model_name = type(model).__name__
        if description is None:
            raise PairMismatchError(
                f"auto guide: {model_name} has not been traced: call model.describe(batch) on a batch first "
                "(pyrovae's Experiment does it on the first training rows)"
            )
        # The guide opens the model's own data plate (its name and dim), so plain Pyro objectives
        # (Trace_ELBO, TraceGraph_ELBO, TraceEnum_ELBO) see one plate in model and guide; pyrovae's
        # calls rename its frames to "data" in both halves alike.
        self.plate_name = description.data_plate
        self.use_data_plate(self.plate_name)
        # A model may put its data plate left of dim -1 (other plates to its right): the guide's
        # values then carry singleton dims there, as the model's do.
        self.plate_dim = description.data_plate_dim
        self.extra_dims = -self.plate_dim - 1
        for site in description.latent:
            if site.sequential or site.nested_plates:
                where = f"plate(s) {list(site.nested_plates)}" if site.nested_plates else "a pyro.markov scope"
                raise PairMismatchError(
                    f"auto guide: {model_name}'s latent site {site.name!r} sits in {where}; the auto guide builds no "
                    "per-step (recurrent) encoder: write a guide for this model"
                )
        dependent = config.structure == "dependent"
        observed = {site.name: site for site in description.observed}
        # Latent halves of obs_mask sites: their label key and mask key, from the observed half.
        self.revealed = {}
        for site in description.latent:
            if site.name.endswith("_unobserved"):
                twin = observed.get(site.name[: -len("_unobserved")] + "_observed")
                if twin is not None and twin.observed_key and twin.mask_key:
                    self.revealed[site.name] = (twin.observed_key, twin.mask_key)
        enumerated = [site.name for site in description.latent if site.enumerated]
        sampled = list(description.guide_order)
        # Enumerated sites first: the continuous sites that a faithful inverse would let them
        # read read them instead (M2's q(y | x) q(z | x, y)).
        order = [name for name in sampled if name in enumerated] + [name for name in sampled if name not in enumerated]
        parents = {name: [] for name in order}
        if dependent:
            for name in order:
                for parent in description.posterior_parents.get(name, ()):
                    if parent in parents and order.index(parent) < order.index(name):
                        parents[name].append(parent)
            for name in enumerated:  # the inverse's edge from a continuous site, turned round
                for child in description.posterior_parents.get(name, ()):
                    if child in parents and child not in enumerated and name not in parents[child]:
                        parents[child].append(name)
        sites = {site.name: site for site in description.latent}
        self.heads = {
            name: _SiteHead(sites[name], config.family.get(name), config, model_name) for name in order
        }
        unknown = sorted(set(config.family) - set(self.heads))
        if unknown:
            raise PairMismatchError(f"auto guide: family names site {unknown[0]!r}, which {model_name} does not sample (sites: {order})")
        self.order, self.parents, self.enumerated = order, parents, [name for name in order if name in enumerated]
        self.inputs = self._input_layout(description, data, model_name)
        self.categories = {"y": data.num_classes, "x": data.num_categories}
        # A label read where its mask is true only (the rows whose label is observed).
        self.masks = {key: mask for key, mask in self.revealed.values()}
        width = sum(size for _, size in self.inputs)
        self.trunk = _trunk(width, config)
        features = config.hidden[-1] if config.hidden else width
        # Sites that read the data alone share one linear layer; dependent sites get an MLP each.
        self.root = [name for name in order if not parents[name]]
        self.root_sizes = [self.heads[name].size for name in self.root]
        self.root_head = nn.Linear(features, sum(self.root_sizes)) if self.root else None
        hidden = config.hidden if config.dependent_hidden is None else config.dependent_hidden
        self.dependent_heads = nn.ModuleDict(
            {
                name: MLP(
                    features + sum(self.heads[p].value_features() for p in parents[name]),
                    hidden,
                    self.heads[name].size,
                    activation=config.activation,
                )
                for name in order
                if parents[name]
            }
        )
        labels = [name for name in self.enumerated if name in self.revealed and self.heads[name].kind == "Categorical"]
        if len(labels) == 1 and not self.heads[labels[0]].event_shape:
            # q(y | x) of an enumerated, partly observed label: accuracy in final.json.
            self.label_site = labels[0]
            self.classify = self._classify

    def _input_layout(self, description, data: DataSpec, model_name: str) -> list[tuple[str, int]]:
        """(batch key, feature width) for every key the model reads; integer keys are one-hot."""
        layout = []
        keys = description.inputs
        if self.config.inputs is not None:
            unknown = [key for key in self.config.inputs if key not in description.input_shapes]
            if unknown or not self.config.inputs:
                raise PairMismatchError(
                    f"auto guide: inputs = {self.config.inputs!r}: name batch keys the encoder reads, "
                    f"of {sorted(description.input_shapes)}"
                )
            keys = tuple(self.config.inputs)
        for key in keys:
            shape, kind = description.input_shapes[key]
            if kind == "integer":
                categories = data.num_classes if key == "y" else data.num_categories if key == "x" else None
                if key == "x" and data.variable_length:
                    raise PairMismatchError(
                        f"auto guide: batch key 'x' holds variable-length token sequences; the auto guide has no "
                        f"sequence encoder: write a guide for {model_name} (e.g. guide.name = 'sentence_lstm')"
                    )
                if categories is None:
                    raise PairMismatchError(
                        f"auto guide: batch key {key!r} holds integers of unknown range; give it as float features, "
                        "or write a guide"
                    )
                size = _numel(shape) * categories
                if size > MAX_ONE_HOT_FEATURES:
                    raise PairMismatchError(f"auto guide: one-hot batch key {key!r} would be {size} features wide; write a guide")
            else:
                size = _numel(shape)
            layout.append((key, size))
        return layout

    def _features(self, batch: dict) -> torch.Tensor:
        parts = []
        for key, _ in self.inputs:
            value = batch[key]
            rows = value.shape[0]
            if value.dtype == torch.bool:
                value = value.to(torch.get_default_dtype())
            elif not value.dtype.is_floating_point:
                value = F.one_hot(value.long(), self.categories[key]).to(torch.get_default_dtype())
            value = value.reshape(rows, -1)
            mask = self.masks.get(key)
            if mask is not None:  # a label hidden by its mask is not read (loaders write 0 there)
                value = value * batch[mask].reshape(rows, 1).to(value.dtype)
            parts.append(value)
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def _hidden(self, batch: dict) -> torch.Tensor:
        return self.trunk(self._features(batch))

    def _classify(self, **batch) -> torch.Tensor:
        """Class logits of q(y | x) for every row (the enumerated label's head)."""
        return self.root_head(self._hidden(batch)).split(self.root_sizes, -1)[self.root.index(self.label_site)]

    def _per_row(self, tensor: torch.Tensor, trailing: int = 0) -> torch.Tensor:
        """A (B, ...) tensor with singleton dims right of the rows, where the model's data plate
        sits left of dim -1 (``trailing`` dims stay at the end)."""
        if not self.extra_dims:
            return tensor
        rows, rest = tensor.shape[:1], tensor.shape[tensor.dim() - trailing :] if trailing else ()
        return tensor.reshape(tuple(rows) + (1,) * self.extra_dims + tuple(rest))

    def forward(self, **batch):
        x = batch["x"]
        hidden = self._per_row(self._hidden(batch), trailing=1)
        raw_roots = dict(zip(self.root, self.root_head(hidden).split(self.root_sizes, -1))) if self.root else {}
        values = {}
        with pyro.plate(self.plate_name, x.shape[0], dim=self.plate_dim, device=x.device):
            for name in self.order:
                head = self.heads[name]
                if name in raw_roots:
                    raw = raw_roots[name]
                else:
                    read = [self.heads[p].encode_value(values[p]) for p in self.parents[name]]
                    lead = torch.broadcast_shapes(hidden.shape[:-1], *(v.shape[:-1] for v in read))
                    inputs = torch.cat([hidden.expand(lead + hidden.shape[-1:])] + [v.expand(lead + v.shape[-1:]) for v in read], -1)
                    raw = self.dependent_heads[name](inputs)
                q = head.distribution(raw)
                infer = {}
                if name in self.enumerated:
                    infer = {"enumerate": "parallel"}
                if name in self.revealed:
                    label_key, mask_key = self.revealed[name]
                    q = q.mask(self._per_row(~batch[mask_key]))
                value = pyro.sample(name, q, infer=infer)
                if name in self.revealed:
                    # Children read the label where it is observed, the guess where it is hidden.
                    observed = self._per_row(batch[label_key], trailing=batch[label_key].dim() - 1)
                    mask = self._per_row(batch[mask_key]).reshape(self._per_row(batch[mask_key]).shape + (1,) * len(head.event_shape))
                    value = torch.where(mask, observed, value)
                values[name] = value


def _trunk(width: int, config: AutoGuideConfig) -> nn.Module:
    """x features -> hidden layers (each followed by its activation): the shared representation h."""
    if not config.hidden:
        return nn.Identity()
    return nn.Sequential(
        MLP(width, config.hidden[:-1], config.hidden[-1], activation=config.activation, batch_norm=config.batch_norm, dropout=config.dropout),
        activation_layer(config.activation),
    )
