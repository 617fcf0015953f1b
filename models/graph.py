"""A model declared as a graph of sample sites (``[model] name = "graph"``), with no Python.

Each ``[[model.site]]`` table of an experiment declares one Pyro sample site; :class:`GraphModel`
compiles them into an ordinary :class:`~pyrovae.pair.Model` whose ``forward`` is the generative
story. :data:`SITE_KEYS` lists what a site table may say.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import biject_to, constraints
from torch.nn import functional as F

from pyrovae.distributions import BernoulliLogits, DiagonalNormal, StandardNormal
from pyrovae.errors import DataError
from pyrovae.nn import MLP, activation_layer
from pyrovae.pair import DataSpec, LatentSite, Model, describe_support, first_offender
from pyrovae.registry import MODELS

# What a [[model.site]] table may say; any other key is refused, naming the site and the key.
SITE_KEYS = {
    "name": "the sample site's name",
    "distribution": "a pyro.distributions class by name, e.g. 'Normal'",
    "shape": "the event shape of one example's value, e.g. [20] ([] for one number)",
    "parents": "sites or batch keys whose values the site's parameters are computed from",
    "params": "fixed parameters: a table of numbers (or lists), e.g. { loc = 0.0, scale = 1.0 }",
    "learn": "true: a root site's params are learned, starting at the given values",
    "hidden": "hidden layer sizes of the network from the parents to the parameters",
    "activation": "the network's activation",
    "batch_norm": "batch normalization after each hidden layer",
    "dropout": "dropout after each hidden layer",
    "min_scale": "positive parameters from the network are softplus(.) + min_scale",
    "categories": "how many values a Categorical site takes",
    "observed": "the batch key the site observes",
    "mask": "a bool batch key (one value per example): which examples are observed (obs_mask)",
    "enumerate": "true: a discrete latent is summed out (infer={'enumerate': 'parallel'})",
}
_NETWORK_KEYS = ("hidden", "activation", "batch_norm", "dropout")
_RESERVED_NAMES = ("data", "particles")  # the plates' own sites
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# The parameters a network predicts, per distribution; the others (total_count, temperature) come
# from params. A distribution not listed predicts its arg_constraints (logits rather than probs).
NETWORK_PARAMETERS = {
    "Normal": ("loc", "scale"),
    "LogNormal": ("loc", "scale"),
    "Laplace": ("loc", "scale"),
    "Cauchy": ("loc", "scale"),
    "Gumbel": ("loc", "scale"),
    "StudentT": ("df", "loc", "scale"),
    "HalfNormal": ("scale",),
    "HalfCauchy": ("scale",),
    "Bernoulli": ("logits",),
    "ContinuousBernoulli": ("logits",),
    "Categorical": ("logits",),
    "OneHotCategorical": ("logits",),
    "Geometric": ("logits",),
    "Binomial": ("total_count", "logits"),
    "NegativeBinomial": ("total_count", "logits"),
    "RelaxedBernoulli": ("temperature", "logits"),
    "RelaxedBernoulliStraightThrough": ("temperature", "logits"),
    "RelaxedOneHotCategorical": ("temperature", "logits"),
    "RelaxedOneHotCategoricalStraightThrough": ("temperature", "logits"),
    "Beta": ("concentration1", "concentration0"),
    "Kumaraswamy": ("concentration1", "concentration0"),
    "Gamma": ("concentration", "rate"),
    "InverseGamma": ("concentration", "rate"),
    "Exponential": ("rate",),
    "Poisson": ("rate",),
    "Dirichlet": ("concentration",),
    "VonMises": ("loc", "concentration"),
    "Weibull": ("scale", "concentration"),
    "MultivariateNormal": ("loc", "scale_tril"),
}
_NOT_SITE_DISTRIBUTIONS = {
    "Distribution", "TorchDistribution", "TorchDistributionMixin", "ExponentialFamily", "TransformedDistribution",
    "Independent", "MaskedDistribution", "ExpandedDistribution",
}  # fmt: skip


# --- what pyro.distributions offers ------------------------------------------------------------


def distribution_names() -> list[str]:
    """Every pyro.distributions class a site may name."""
    return [
        name
        for name in dir(dist)
        if not name.startswith("_")
        and name not in _NOT_SITE_DISTRIBUTIONS
        and isinstance(getattr(dist, name), type)
        and issubclass(getattr(dist, name), torch.distributions.Distribution)
    ]


def _distribution_class(site: str, name: str) -> type:
    value = None if name in _NOT_SITE_DISTRIBUTIONS else getattr(dist, name, None)
    if isinstance(value, type) and issubclass(value, torch.distributions.Distribution):
        return value
    lower = {known.lower(): known for known in distribution_names()}
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.5)]
    hint = f"closest: {', '.join(close)}" if close else "any class of pyro.distributions, e.g. Normal, Bernoulli, Categorical, Beta"
    raise ValueError(f"site {site!r}: unknown distribution {name!r}; {hint}")


def _arg_constraints(cls: type) -> dict:
    value = getattr(cls, "arg_constraints", {})
    return value if isinstance(value, dict) else {}  # some (Uniform) compute theirs per instance


def _constructor_parameters(cls: type) -> set[str]:
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return set()
    return {p for p in parameters if p not in ("self", "validate_args", "args", "kwargs")}


def _support(cls: type):
    support = getattr(cls, "support", None)
    return support if isinstance(support, constraints.Constraint) else None


def _event_dim(constraint) -> int:
    return int(getattr(constraint, "event_dim", 0) or 0)


def _is_discrete(cls: type) -> bool:
    return bool(getattr(_support(cls), "is_discrete", False))


def _base_constraint(constraint):
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint


def _is_positive(constraint) -> bool:
    """(0, inf) or [0, inf): network outputs go through softplus(.) + min_scale."""
    base = _base_constraint(constraint)
    if isinstance(base, (constraints._GreaterThan, constraints._GreaterThanEq)) and not base.is_discrete:
        return not torch.is_tensor(base.lower_bound) and base.lower_bound == 0
    return False


def _predictable(constraint) -> bool:
    return constraint is not None and not constraint.is_discrete and not isinstance(constraint, constraints._Dependent)


def _network_parameterization(cls: type, name: str) -> tuple[str, ...]:
    if name in NETWORK_PARAMETERS:
        return NETWORK_PARAMETERS[name]
    names = list(_arg_constraints(cls))
    if "logits" in names and "probs" in names:
        names.remove("probs")
    if "scale_tril" in names:
        names = [n for n in names if n not in ("covariance_matrix", "precision_matrix")]
    return tuple(names)


# --- one site ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """One checked [[model.site]] table (an observed site's shape may still come from the data)."""

    name: str
    distribution: str
    cls: type
    shape: tuple[int, ...] | None
    parents: tuple[str, ...] = ()
    params: tuple[tuple[str, object], ...] = ()
    learn: bool = False
    hidden: tuple[int, ...] = ()
    activation: str = "tanh"
    batch_norm: bool = False
    dropout: float = 0.0
    min_scale: float = 1e-3
    categories: int | None = None
    observed: str | None = None
    mask: str | None = None
    enumerate: bool = False

    @property
    def fixed(self) -> dict:
        return dict(self.params)

    @property
    def latent_name(self) -> str | None:
        """The latent sample site this site creates: itself, its unobserved half, or none."""
        if self.observed is None:
            return self.name
        return f"{self.name}_unobserved" if self.mask is not None else None

    @property
    def pyro_names(self) -> tuple[str, ...]:
        """The sample sites it creates (Pyro's obs_mask makes three)."""
        if self.mask is not None:
            return (self.name, f"{self.name}_observed", f"{self.name}_unobserved")
        return (self.name,)

    @property
    def one_hot(self) -> int | None:
        """How many values a child reads one-hot (a Categorical's categories), else None."""
        return self.categories if self.distribution == "Categorical" else None


def _sizes(value, low: int = 1) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= low for n in value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_tree(value) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_number_tree(v) for v in value)
    return _number(value)


def _check_type(site: str, key: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"site {site!r}: {key} = {value!r}: expected {expected}")


def parse_site(index: int, table) -> SiteSpec:
    """One [[model.site]] table with its keys and types checked, refused in one line naming the
    site and the key."""
    if not isinstance(table, dict):
        raise ValueError(f"model.site[{index}] must be a table ([[model.site]]), got {type(table).__name__}")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"model.site[{index}]: name = {name!r}: every site needs a name of letters, digits and '_' (e.g. name = \"z\")")
    for key in table:
        if key not in SITE_KEYS:
            close = difflib.get_close_matches(key, list(SITE_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"site {name!r}: unknown key {key!r}{hint}; a site takes: {', '.join(SITE_KEYS)}")
    if name in _RESERVED_NAMES:
        raise ValueError(f"site {name!r}: the name {name!r} belongs to a Pyro plate; choose another")
    if "distribution" not in table:
        raise ValueError(f"site {name!r}: missing key 'distribution' (a pyro.distributions class, e.g. \"Normal\")")
    get = table.get
    checks = (
        ("distribution", lambda v: isinstance(v, str), "a string naming a pyro.distributions class"),
        ("shape", lambda v: v is None or _sizes(v), "a list of integers >= 1 ([] for one number per example)"),
        ("parents", lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) and p for p in v), "a list of site names or batch keys"),
        ("params", lambda v: isinstance(v, dict), "a table of numbers, e.g. { loc = 0.0, scale = 1.0 }"),
        ("learn", lambda v: isinstance(v, bool), "true or false"),
        ("hidden", _sizes, "a list of integers >= 1 ([] for one linear map)"),
        ("activation", lambda v: isinstance(v, str), "a string"),
        ("batch_norm", lambda v: isinstance(v, bool), "true or false"),
        ("dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("min_scale", lambda v: _number(v) and v > 0, "a number > 0"),
        ("categories", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2), "an integer >= 2"),
        ("observed", lambda v: v is None or (isinstance(v, str) and v), "a batch key (a string)"),
        ("mask", lambda v: v is None or (isinstance(v, str) and v), "a bool batch key (a string)"),
        ("enumerate", lambda v: isinstance(v, bool), "true or false"),
    )
    defaults = {f.name: f.default for f in dataclasses.fields(SiteSpec) if f.default is not dataclasses.MISSING}
    defaults.update(parents=[], params={}, hidden=[])
    values = {}
    for key, ok, expected in checks:
        value = get(key, defaults.get(key))
        _check_type(name, key, value, ok(value), expected)
        values[key] = value
    for key, value in values["params"].items():
        _check_type(name, f"params.{key}", value, _number_tree(value), "a number or a list of numbers")
    if len(set(values["parents"])) != len(values["parents"]):
        raise ValueError(f"site {name!r}: parents = {list(values['parents'])!r} names a parent twice")
    try:
        activation_layer(values["activation"])
    except ValueError as error:
        raise ValueError(f"site {name!r}: {error}") from None
    spec = SiteSpec(
        name=name,
        cls=_distribution_class(name, values["distribution"]),
        **{
            **values,
            "shape": None if values["shape"] is None else tuple(values["shape"]),
            "parents": tuple(values["parents"]),
            "params": tuple(values["params"].items()),
            "hidden": tuple(values["hidden"]),
            "dropout": float(values["dropout"]),
            "min_scale": float(values["min_scale"]),
        },
    )
    _check_site_structure(spec, table)
    return spec


def _check_site_structure(spec: SiteSpec, table: dict) -> None:
    """What one site says must hang together, before any data is known."""
    name, cls = spec.name, spec.cls
    if spec.mask is not None and spec.observed is None:
        raise ValueError(f"site {name!r}: mask = {spec.mask!r} needs observed = KEY (the mask says which examples of it are observed)")
    if spec.observed is None and spec.shape is None:
        raise ValueError(f"site {name!r}: missing key 'shape' (the event shape of one example's value, e.g. [20]; [] for one number)")
    if not spec.parents:
        given = [key for key in _NETWORK_KEYS if key in table]
        if given:
            raise ValueError(f"site {name!r} has no parents, so {', '.join(given)} has no network to shape; give parents = [...] or leave it out")
        if not spec.params:
            needed = " = ..., ".join(_network_parameterization(cls, spec.distribution)) or "..."
            raise ValueError(
                f"site {name!r} ({spec.distribution}) is a root site (no parents), so it needs fixed params, e.g. params = {{ {needed} = ... }}"
            )
    elif spec.learn:
        raise ValueError(f"site {name!r}: learn = true applies to a root site's params; this site's parameters come from its parents' network")
    if spec.categories is not None and spec.distribution != "Categorical":
        raise ValueError(f"site {name!r}: categories applies to a Categorical site; a {spec.distribution} takes its size from shape")
    if spec.enumerate:
        if not _is_discrete(cls) or not getattr(cls, "has_enumerate_support", False):
            raise ValueError(
                f"site {name!r}: enumerate = true needs a discrete distribution with finite support (Categorical, Bernoulli, ...), "
                f"not {spec.distribution}"
            )
        if spec.observed is not None and spec.mask is None:
            raise ValueError(f"site {name!r} is observed: enumerate = true applies to latent sites (or the unobserved half of a masked one)")
    if spec.shape is not None:
        check_site_shape(spec)


def check_site_shape(spec: SiteSpec) -> None:
    """What a site's shape must be for its distribution (and for enumeration)."""
    if spec.enumerate and spec.shape != ():
        raise ValueError(f"site {spec.name!r}: enumerate = true needs shape = [] (one value per example), got {list(spec.shape)}")
    support = _support(spec.cls)
    dims = _event_dim(support)
    if support is not None and len(spec.shape) < dims:
        raise ValueError(
            f"site {spec.name!r}: a {spec.distribution} value has {dims} dim(s) of its own (support {describe_support(support)}), "
            f"so shape needs at least {dims}, got {list(spec.shape)}"
        )


# --- the graph --------------------------------------------------------------------------------------


def topological_order(sites: list[SiteSpec]) -> list[SiteSpec]:
    """The sites ordered parents first (declaration order where free); a cycle is refused by name."""
    by_name = {site.name: site for site in sites}
    state: dict[str, str] = {}
    order: list[SiteSpec] = []
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = "on the path"
        path.append(name)
        for parent in by_name[name].parents:
            if parent not in by_name:
                continue  # a batch key
            if state.get(parent) == "on the path":
                cycle = path[path.index(parent) :] + [parent]
                raise ValueError(f"the sites form a cycle: {' -> '.join(reversed(cycle))} (parent -> child); a graph model must be acyclic")
            if parent not in state:
                visit(parent)
        path.pop()
        state[name] = "done"
        order.append(by_name[name])

    for site in sites:
        if site.name not in state:
            visit(site.name)
    return order


def parse_graph(tables) -> list[SiteSpec]:
    """Check every [[model.site]] table and the graph they make; return the sites parents first."""
    if not isinstance(tables, (list, tuple)):
        raise ValueError(f"site must be a list of tables ([[model.site]] ...), got {type(tables).__name__}")
    sites: list[SiteSpec] = []
    taken: dict[str, str] = {}  # sample site name -> the declared site that creates it
    for index, table in enumerate(tables):
        spec = parse_site(index, table)
        if spec.name in {site.name for site in sites}:
            raise ValueError(f"site {spec.name!r} is declared twice; site names must be unique")
        for pyro_name in spec.pyro_names:
            if pyro_name in taken:
                raise ValueError(
                    f"site {spec.name!r}: the sample site name {pyro_name!r} is already taken by site {taken[pyro_name]!r}; "
                    "site names must be unique"
                )
            taken[pyro_name] = spec.name
        sites.append(spec)
    observers: dict[str, str] = {}
    for site in sites:
        if site.observed is None:
            continue
        if site.observed in observers:
            raise ValueError(f"sites {observers[site.observed]!r} and {site.name!r} both observe batch[{site.observed!r}]; each key is observed once")
        observers[site.observed] = site.name
    if not observers:
        names = ", ".join(site.name for site in sites) or "none"
        raise ValueError(f"no site is observed: give the site of the data observed = \"x\" (sites: {names})")
    return topological_order(sites)


@dataclass(frozen=True)
class _Input:
    """A value sites may read (a batch key or a site), per example; ``categories``: read one-hot."""

    shape: tuple[int, ...]
    categories: int | None = None

    @property
    def features(self) -> int:
        return math.prod(self.shape) * (self.categories or 1)


def _parse_batch_key(key: str, value) -> _Input:
    if not isinstance(key, str) or not _NAME.match(key):
        raise ValueError(f"batch_keys: {key!r} is not a batch key name (letters, digits and '_')")
    shape, categories = value, None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"shape", "categories"})
        if unknown:
            raise ValueError(f"batch_keys.{key}: unknown key {unknown[0]!r}; give {{ shape = [...], categories = N }}")
        shape, categories = value.get("shape", []), value.get("categories")
    if not _sizes(shape):
        raise ValueError(f"batch_keys.{key} = {value!r}: expected the shape of one example's value, e.g. [392] ([] for one number)")
    if categories is not None and (not isinstance(categories, int) or isinstance(categories, bool) or categories < 2):
        raise ValueError(f"batch_keys.{key}: categories = {categories!r}: expected an integer >= 2")
    return _Input(tuple(shape), categories)


def _data_inputs(data: DataSpec) -> dict[str, _Input]:
    """The batch keys a data set's spec describes: x, and y and y_mask with labels."""
    inputs = {"x": _Input(tuple(data.x_shape), data.num_categories if data.support == "categorical" else None)}
    if data.num_classes:
        inputs["y"] = _Input((), data.num_classes) if data.label_format == "integer" else _Input((data.num_classes,))
        inputs["y_mask"] = _Input(())
    return inputs


@dataclass
class GraphModelConfig:
    # One table per sample site, [[model.site]], in any order (keys: pyrovae.models.graph.SITE_KEYS).
    site: list[dict]
    # Batch keys other than those the data set describes (x; y and y_mask with labels) that sites may
    # read as parents, observe or use as masks, with the shape of one example's value:
    # { c = [392] }, or { d = { shape = [], categories = 4 } } for an integer key read one-hot.
    batch_keys: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.batch_keys, dict):
            raise ValueError(f"batch_keys = {self.batch_keys!r}: expected a table, e.g. {{ c = [392] }}")
        # Plain attributes, not fields: the run folder's config holds only what the user wrote.
        self.sites = parse_graph(self.site)
        self.declared_inputs = {key: _parse_batch_key(key, value) for key, value in self.batch_keys.items()}


class _SiteParameters(nn.Module):
    """A site's params: fixed ones as buffers; a root site's learned ones (learn = true) as
    unconstrained nn.Parameters u with value biject_to(constraint)(u)."""

    def __init__(self):
        super().__init__()
        self.transforms: dict[str, object] = {}

    def add(self, name: str, value: torch.Tensor, learned_constraint=None) -> None:
        if learned_constraint is None:
            self.register_buffer(name, value, persistent=False)
            return
        transform = biject_to(learned_constraint)
        self.transforms[name] = transform
        self.register_parameter(name, nn.Parameter(transform.inv(value).detach().clone()))

    def values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        values = {}
        for name, buffer in self.named_buffers(recurse=False):
            values[name] = buffer.to(dtype) if buffer.is_floating_point() and buffer.dtype != dtype else buffer
        for name, parameter in self.named_parameters(recurse=False):
            values[name] = self.transforms[name](parameter)
        return values


@MODELS.register("graph")
class GraphModel(Model):
    """A model declared as a directed acyclic graph of sample sites s (``[[model.site]]`` tables):

        p(x, z) = prod_s p(s | parents(s))                           for each example n in data
        p(s | parents(s)) = D_s(theta_s)                             D_s: a pyro.distributions class
        theta_s = biject_to(constraint)(network_s(concat(e(parents(s)))))       a site with parents
        theta_s = params_s                                           a root site (fixed, or learned)

    sampled parents first inside one ``pyro.plate("data", B)``, each site's value of event shape
    ``shape`` (its trailing dims made event dims with ``to_event``). ``network_s`` is an MLP from the
    concatenation of the parents' values, each flattened per example (e(v): integer values, of a
    Categorical site or integer labels ``y``, one-hot), to the unconstrained parameters the
    distribution needs (:data:`NETWORK_PARAMETERS`; ``params`` may fix some, e.g. a Normal's scale).
    Each output goes to its parameter's support by ``biject_to(arg_constraints[name])``, except
    positive ones, which are softplus(.) + ``min_scale`` (exp overflows, and lets a scale reach 0).
    Parents' leading dims (particles, enumerated values) are broadcast against each other before
    the concatenation.

    A site with ``observed = KEY`` scores ``batch[KEY]``; with ``mask = KEY2`` as well it is Pyro's
    ``obs_mask``: the examples where ``batch[KEY2]`` is False are imputed by the latent site
    ``<name>_unobserved``. ``enumerate = true`` marks a discrete latent for exact summation.
    Parents are sites or batch keys: ``x``; ``y`` and ``y_mask`` when the data have labels; and the
    keys declared in ``batch_keys`` with their shapes. A site named like a batch key shadows it.
    """

    Config = GraphModelConfig

    def __init__(self, config: GraphModelConfig, data: DataSpec):
        super().__init__(data)
        if data.variable_length:
            raise ValueError(f"graph models need x of one shape; data set {data.name!r} holds variable-length sequences")
        self.config = config
        self.batch_inputs = _data_inputs(data)
        for key, value in config.declared_inputs.items():
            if key in self.batch_inputs:
                raise ValueError(f"batch_keys.{key}: data set {data.name!r} already describes batch[{key!r}]; leave it out of batch_keys")
            self.batch_inputs[key] = value
        self.sites: list[SiteSpec] = []
        self.site_inputs: dict[str, _Input] = {}  # what a child reads from each site
        self.networks = nn.ModuleDict()  # per site with parents: parents -> unconstrained parameters
        self.site_params = nn.ModuleDict()  # per site: its fixed params, and a root's learned ones
        self.heads: dict[str, list[tuple]] = {}  # per site with parents: (param, raw shape, transform)
        self.standard_normal: set[str] = set()  # root sites drawn as the lean StandardNormal
        site_names = {site.name for site in config.sites}
        for spec in config.sites:
            spec = self._resolve_site(spec, site_names)
            self.sites.append(spec)
            self.site_inputs[spec.name] = _Input(spec.shape, spec.one_hot)
            if spec.parents:
                self._build_network(spec)
            else:
                self._build_root(spec)
            self._check_shape(spec)

    # --- building ---------------------------------------------------------------------------------

    def _resolve_site(self, spec: SiteSpec, site_names: set[str]) -> SiteSpec:
        """The site with its shape and categories filled in from the data, and checked against them."""
        name, data, batch_inputs = spec.name, self.data, self.batch_inputs
        keys = ", ".join(batch_inputs)
        for parent in spec.parents:
            if parent not in site_names and parent not in batch_inputs:
                close = difflib.get_close_matches(parent, sorted(site_names | set(batch_inputs)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"site {name!r}: unknown parent {parent!r}{hint}: not a site ({', '.join(sorted(site_names))}) nor a batch key of "
                    f"data set {data.name!r} ({keys}); declare other batch keys with [model] batch_keys = {{ {parent} = [shape] }}"
                )
        shape, categories = spec.shape, spec.categories
        if spec.observed is not None:
            key = spec.observed
            if key not in batch_inputs:
                raise ValueError(
                    f"site {name!r}: observed = {key!r} is not a batch key of data set {data.name!r} ({keys}); "
                    f"declare it with [model] batch_keys = {{ {key} = [shape] }}"
                )
            given = batch_inputs[key]
            if shape is None:
                shape = given.shape
            elif shape != given.shape:
                raise ValueError(
                    f"site {name!r} observes batch[{key!r}] of shape {list(given.shape)} per example (data set {data.name!r}), "
                    f"but declares shape = {list(shape)}"
                )
            if spec.distribution == "Categorical" and given.categories is not None:
                if categories is not None and categories != given.categories:
                    raise ValueError(f"site {name!r}: categories = {categories}, but batch[{key!r}] takes {given.categories} values")
                categories = given.categories
            if spec.mask is not None and (spec.mask not in batch_inputs or batch_inputs[spec.mask].shape != ()):
                raise ValueError(
                    f"site {name!r}: mask = {spec.mask!r} must be a bool batch key with one value per example "
                    f"(y_mask with labels, or one declared in batch_keys = {{ {spec.mask} = [] }})"
                )
        if spec.distribution == "Categorical" and categories is None:
            listed = [value for key, value in spec.params if key in ("logits", "probs") and isinstance(value, (list, tuple))]
            if not listed:
                raise ValueError(f"site {name!r} (Categorical): say how many values it takes: categories = N")
            categories = int(torch.as_tensor(listed[0]).shape[-1])
        spec = dataclasses.replace(spec, shape=tuple(shape), categories=categories)
        check_site_shape(spec)
        return spec

    def _parameter_shape(self, spec: SiteSpec, constraint) -> tuple[int, ...] | None:
        """A parameter's shape per example: the value's, or that and a categories dim (Categorical
        logits); None for others (a covariance)."""
        extra = _event_dim(constraint) - _event_dim(_support(spec.cls))
        if extra == 0:
            return spec.shape
        if extra == 1 and spec.categories is not None:
            return spec.shape + (spec.categories,)
        return None

    def _fixed_tensors(self, spec: SiteSpec) -> dict[str, torch.Tensor]:
        """The site's params as tensors, broadcast to their shapes per example."""
        arg_constraints = _arg_constraints(spec.cls)
        known = _constructor_parameters(spec.cls) | set(arg_constraints)
        values = {}
        for param, value in spec.params:
            if param not in known:
                raise ValueError(f"site {spec.name!r}: {spec.distribution} has no parameter {param!r}; its parameters: {', '.join(sorted(known))}")
            tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
            shape = self._parameter_shape(spec, arg_constraints[param]) if param in arg_constraints else None
            if shape is not None:
                try:
                    tensor = tensor.expand(shape).clone()
                except RuntimeError:
                    raise ValueError(
                        f"site {spec.name!r}: params.{param} has shape {list(tensor.shape)}, which does not broadcast to {list(shape)}"
                    ) from None
            values[param] = tensor
        return values

    def _build_network(self, spec: SiteSpec) -> None:
        name, fixed, arg_constraints = spec.name, spec.fixed, _arg_constraints(spec.cls)
        heads = []
        for param in _network_parameterization(spec.cls, spec.distribution):
            if param in fixed:
                continue
            constraint = arg_constraints.get(param)
            if not _predictable(constraint):
                why = "an integer" if constraint is not None and constraint.is_discrete else "not something a network can predict"
                raise ValueError(
                    f"site {name!r}: {spec.distribution} parameter {param!r} is {why}; fix it in params, e.g. params = {{ {param} = ... }}"
                )
            shape = self._parameter_shape(spec, constraint)
            if shape is None:
                raise ValueError(
                    f"site {name!r}: {spec.distribution} parameter {param!r} is not shaped like the value (event dim "
                    f"{_event_dim(constraint)}); a network predicts parameters of the value's shape: fix it in params"
                )
            if _is_positive(constraint):
                heads.append((param, shape, "softplus"))
                continue
            transform = biject_to(_base_constraint(constraint))
            raw_shape = tuple(transform.inverse_shape(torch.Size(shape)))  # a simplex needs one number fewer
            heads.append((param, raw_shape, None if isinstance(_base_constraint(constraint), constraints._Real) else transform))
        if not heads:
            raise ValueError(
                f"site {name!r} has parents, but params fixes every parameter of its {spec.distribution}: nothing for a network to predict"
            )
        self.heads[name] = heads
        in_features = sum(
            self.site_inputs[parent].features if parent in self.site_inputs else self.batch_inputs[parent].features for parent in spec.parents
        )
        out_features = sum(math.prod(raw_shape) for _, raw_shape, _ in heads)
        layers = {"activation": spec.activation, "batch_norm": spec.batch_norm, "dropout": spec.dropout}
        self.networks[name] = MLP(in_features, list(spec.hidden), out_features, **layers)
        holder = _SiteParameters()
        for param, value in self._fixed_tensors(spec).items():
            holder.add(param, value)
        self.site_params[name] = holder

    def _build_root(self, spec: SiteSpec) -> None:
        values = self._fixed_tensors(spec)
        arg_constraints = _arg_constraints(spec.cls)
        holder = _SiteParameters()
        for param, value in values.items():
            constraint = arg_constraints.get(param)
            learned = spec.learn and _predictable(constraint)  # integers (total_count) stay fixed
            if learned and not bool(constraint.check(value).all()):
                raise ValueError(f"site {spec.name!r}: params.{param} = {value.tolist()} lies outside its support {describe_support(constraint)}")
            holder.add(param, value, constraint if learned else None)
        self.site_params[spec.name] = holder
        if spec.distribution == "Normal" and not spec.learn and len(spec.shape) >= 1 and set(values) == {"loc", "scale"}:
            if bool((values["loc"] == 0).all()) and bool((values["scale"] == 1).all()):
                self.standard_normal.add(spec.name)

    def _check_shape(self, spec: SiteSpec) -> None:
        """Build the site's distribution for two examples now, so a clash is refused before training."""
        rows = 2
        try:
            with torch.no_grad():
                if spec.parents:
                    fn = self._network_distribution(spec, torch.zeros(rows, self.networks[spec.name].out_features))
                else:
                    fn = self._root_distribution(spec, rows, torch.get_default_dtype(), None)
        except (ValueError, TypeError, RuntimeError) as error:
            message = (str(error).splitlines() or [type(error).__name__])[0]
            raise ValueError(f"site {spec.name!r} ({spec.distribution}) cannot be built with shape = {list(spec.shape)}: {message}") from None
        if tuple(fn.batch_shape) != (rows,) or tuple(fn.event_shape) != spec.shape:
            value_shape = list(fn.batch_shape[1:] + fn.event_shape)
            raise ValueError(
                f"site {spec.name!r} ({spec.distribution}): its parameters give values of shape {value_shape} per example, "
                f"but shape = {list(spec.shape)}"
            )

    # --- the declaration --------------------------------------------------------------------------

    @property
    def latent_sites(self):
        return tuple(
            LatentSite(site.latent_name, site.shape, discrete=_is_discrete(site.cls), enumerated=site.enumerate)
            for site in self.sites
            if site.latent_name is not None
        )

    @property
    def observed_site(self) -> str:
        """The site that scores ``x`` (plots draw its mean), else the first observed site."""
        observed = [site for site in self.sites if site.observed is not None]
        return next((site.name for site in observed if site.observed == "x"), observed[0].name)

    def check_batch(self, batch) -> None:
        """The batch contract; then every key the sites read, with its shape; no hidden label read as
        given; and every observed value inside its site's support."""
        super().check_batch(batch)
        rows, owner = int(batch["x"].shape[0]), type(self).__name__
        site_names = {site.name for site in self.sites}
        needed = {key for site in self.sites for key in site.parents if key not in site_names}
        needed |= {key for site in self.sites for key in (site.observed, site.mask) if key is not None}
        for key in sorted(needed):
            value = batch.get(key)
            if not torch.is_tensor(value):
                raise DataError(f"{owner} reads batch[{key!r}], but the batch has no such tensor (keys: {sorted(batch)})")
            expected = (rows,) + self.batch_inputs[key].shape
            if tuple(value.shape) != expected:
                raise DataError(f"batch[{key!r}] has shape {tuple(value.shape)}, but {owner} expects {expected}")
        for site in self.sites:
            if site.mask is not None and batch[site.mask].dtype != torch.bool:
                raise DataError(f"batch[{site.mask!r}] has dtype {batch[site.mask].dtype}; as site {site.name!r}'s mask it must be bool")
        self._check_hidden_labels(batch, site_names)
        for site in self.sites:
            if site.observed is not None:
                self._check_support(site, batch[site.observed], batch[site.mask] if site.mask else None)

    def _check_hidden_labels(self, batch, site_names: set[str]) -> None:
        """A label hidden by ``y_mask`` holds a placeholder (0): only a site masked by y_mask may read it."""
        y_mask = batch.get("y_mask")
        if not torch.is_tensor(y_mask) or bool(y_mask.all()):
            return
        readers = [
            site.name
            for site in self.sites
            if (site.observed == "y" and site.mask != "y_mask") or ("y" in site.parents and "y" not in site_names)
        ]
        if readers:
            row = int((~y_mask).nonzero()[0])
            raise DataError(
                f"batch['y_mask'] row {row} is False, but site {readers[0]!r} reads batch['y'] as given and would read a hidden "
                "label as class 0; declare a site that observes y with mask = \"y_mask\" and read that site, or use all labels"
            )

    def _check_support(self, site: SiteSpec, value: torch.Tensor, mask: torch.Tensor | None) -> None:
        support = _support(site.cls)
        if site.distribution == "Categorical":
            bad = (value < 0) | (value >= site.categories)
            if value.dtype.is_floating_point:
                bad = bad | (value != value.round())
            text = f"integers in [0, {site.categories - 1}]"
        elif support is None or isinstance(support, constraints._Dependent):
            return  # a support that depends on the parameters: the distribution checks it
        else:
            inside = support.check(value)  # one answer per event for supports of vectors (simplex)
            bad = ~inside.reshape(inside.shape + (1,) * (value.dim() - inside.dim())).expand(value.shape)
            text = describe_support(support)
        if mask is not None:
            bad = bad & mask.reshape(mask.shape + (1,) * (bad.dim() - 1))
        if bool(bad.any()):
            where, offender = first_offender(bad, value)
            raise DataError(
                f"site {site.name!r} ({site.distribution}) needs batch[{site.observed!r}] in its support {text}, but {where} holds {offender}"
            )

    # --- the generative story ---------------------------------------------------------------------

    def _features(self, spec: SiteSpec, values: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """concat(e(parents)), each flattened per example, with the parents' leading dims broadcast."""
        parts = []
        for parent in spec.parents:
            value = values[parent]
            read = self.site_inputs[parent] if parent in self.site_inputs else self.batch_inputs[parent]
            dims = len(read.shape)
            if read.categories is not None:
                value, dims = F.one_hot(value.long(), read.categories), dims + 1
            parts.append(value.to(dtype).reshape(value.shape[: value.dim() - dims] + (-1,)))
        if len(parts) == 1:
            return parts[0]
        lead = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return torch.cat([part.expand(lead + part.shape[-1:]) for part in parts], -1)

    def _network_distribution(self, spec: SiteSpec, raw: torch.Tensor):
        lead, heads = raw.shape[:-1], self.heads[spec.name]
        params = {}
        for (param, raw_shape, transform), chunk in zip(heads, raw.split([math.prod(head[1]) for head in heads], -1)):
            chunk = chunk.reshape(lead + raw_shape)
            if transform == "softplus":
                chunk = F.softplus(chunk) + spec.min_scale
            elif transform is not None:
                chunk = transform(chunk)
            params[param] = chunk
        params.update(self.site_params[spec.name].values(raw.dtype))
        event_dims = len(spec.shape)
        if not spec.enumerate and event_dims >= 1:
            # The lean equivalents of Normal(loc, scale).to_event(n) and Bernoulli(logits=...).to_event(n).
            if spec.distribution == "Normal" and set(params) == {"loc", "scale"}:
                return DiagonalNormal(params["loc"], params["scale"], event_dims)
            if spec.distribution == "Bernoulli" and set(params) == {"logits"}:
                return BernoulliLogits(params["logits"], event_dims)
        return self._reinterpreted(spec.cls(**params), len(lead))

    @staticmethod
    def _reinterpreted(fn, batch_dims: int):
        extra = len(fn.batch_shape) - batch_dims
        return fn.to_event(extra) if extra > 0 else fn

    def _root_distribution(self, spec: SiteSpec, rows: int, dtype: torch.dtype, device):
        if spec.name in self.standard_normal:
            return StandardNormal((rows,), spec.shape, dtype=dtype, device=device)
        fn = spec.cls(**self.site_params[spec.name].values(dtype))
        return self._reinterpreted(fn, 0).expand((rows,))  # at the plate's batch shape

    @staticmethod
    def _enumerate_unobserved(message) -> dict:
        return {"enumerate": "parallel"} if message["name"].endswith("_unobserved") else {}

    def forward(self, x: torch.Tensor, **batch):
        rows = x.shape[0]
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        given = {"x": x, **{key: value for key, value in batch.items() if torch.is_tensor(value)}}
        values = dict(given)  # a site's value shadows a batch key of its name
        with pyro.plate("data", rows, device=x.device):
            for spec in self.sites:
                if spec.parents:
                    fn = self._network_distribution(spec, self.networks[spec.name](self._features(spec, values, dtype)))
                else:
                    fn = self._root_distribution(spec, rows, dtype, x.device)
                if spec.observed is None:
                    infer = {"enumerate": "parallel"} if spec.enumerate else None
                    values[spec.name] = pyro.sample(spec.name, fn, infer=infer)
                elif spec.mask is None:
                    values[spec.name] = pyro.sample(spec.name, fn, obs=given[spec.observed])
                elif not spec.enumerate:
                    values[spec.name] = pyro.sample(spec.name, fn, obs=given[spec.observed], obs_mask=given[spec.mask])
                else:
                    # pyro.sample drops ``infer`` when it is given obs_mask (Pyro 1.9): mark the latent half here.
                    with poutine.infer_config(config_fn=self._enumerate_unobserved):
                        values[spec.name] = pyro.sample(spec.name, fn, obs=given[spec.observed], obs_mask=given[spec.mask])
