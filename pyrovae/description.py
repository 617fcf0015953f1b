"""The trace is the declaration: what one traced call of a model shows.

:func:`describe_model` runs a model once on a batch (without moving the random streams) and reads
off what Pyro's autoguides read, plus what an amortized guide needs:

- its **latent sites**: name, event shape, support, distribution, whether discrete, enumerated
  (``infer={"enumerate": ...}``) or reparameterizable, and the plates they sit in;
- its **observed sites**, and the batch key each observes (``obs=batch["x"]`` -> ``"x"``);
- its **data plate**: the plate over the batch's rows, whatever its name (``"data"``,
  ``"documents"``, ``"z_minibatch"``), found at the observed sites as the vectorized plate whose
  size is the batch's row count;
- the **batch keys it reads**: every key whose tensor reaches a site's log-density (observed,
  conditioned on, or used as a mask). Each batch tensor is given a provenance
  (:mod:`pyro.ops.provenance`, the machinery of :func:`pyro.infer.inspect.get_dependencies`) so
  the log-density of each site says which keys and which upstream sites it read;
- **dependencies**: for each site, the upstream latent sites its log-density read (the model's
  graph), and for each latent site the sites that a faithful inverse of that graph conditions on
  (Webb et al. 2018; Pyro's ``posterior_dependencies``, ordered so that a guide can sample them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer.inspect import TrackProvenance, get_dependencies
from pyro.ops.provenance import ProvenanceTensor, get_provenance
from pyro.poutine.util import prune_subsample_sites

from pyrovae.errors import PairMismatchError
from pyrovae.traces import preserved_rng

BATCH_PREFIX = "batch:"


@dataclass(frozen=True)
class TracedSite:
    """One sample site as the model's trace shows it, for one example (the data plate removed)."""

    name: str
    event_shape: tuple[int, ...]
    support: object
    distribution: str
    discrete: bool = False
    enumerated: bool = False
    reparameterized: bool = True
    # Vectorized plates other than the data plate, and whether the site sits in a pyro.markov scope.
    nested_plates: tuple[str, ...] = ()
    sequential: bool = False
    # Upstream latent sites and batch keys the site's log-density read.
    parents: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    # Observed sites: the batch key of the observed value, and of its mask (obs_mask, .mask()).
    observed_key: str | None = None
    mask_key: str | None = None
    # Categories of a discrete site with a finite support (Categorical, Bernoulli), else None.
    categories: int | None = None


@dataclass(frozen=True)
class ModelDescription:
    """What :func:`describe_model` found. ``latent`` and ``observed`` are in the model's order."""

    model_name: str
    data_plate: str
    rows: int
    latent: tuple[TracedSite, ...]
    observed: tuple[TracedSite, ...]
    inputs: tuple[str, ...]
    # latent site -> the latent sites a faithful inverse conditions it on (Pyro's posterior
    # dependencies), each of which comes earlier in ``guide_order``.
    posterior_parents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    guide_order: tuple[str, ...] = ()
    # False when provenance tracking could not run through the model: then every site is taken to
    # read every batch key and every earlier latent site (still a correct, if larger, guide).
    tracked: bool = True
    # The data plate's dim (-1 unless the model puts other plates to its right).
    data_plate_dim: int = -1
    # batch key -> (shape of one row, "float" | "integer" | "bool"), for every tensor of the batch.
    input_shapes: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def site(self, name: str) -> TracedSite:
        for site in self.latent + self.observed:
            if site.name == name:
                return site
        raise KeyError(name)

    @property
    def observed_site(self) -> str:
        """The observed site of the data ``x`` (the first observed site when none observes ``x``)."""
        for site in self.observed:
            if site.observed_key == "x":
                return site.name
        return self.observed[0].name if self.observed else "x"


def _with_provenance(batch: Mapping) -> dict:
    return {
        key: ProvenanceTensor(value, frozenset({BATCH_PREFIX + key})) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def _provenance(value) -> frozenset:
    try:
        return frozenset(get_provenance(value)) if torch.is_tensor(value) else frozenset()
    except Exception:  # noqa: BLE001 - a value provenance cannot read: nothing known
        return frozenset()


def _keys(provenance: frozenset) -> tuple[str, ...]:
    return tuple(sorted(p[len(BATCH_PREFIX):] for p in provenance if isinstance(p, str) and p.startswith(BATCH_PREFIX)))


def _innermost(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _categories(fn) -> int | None:
    inner = _innermost(fn)
    if not fn.support.is_discrete:
        return None
    if isinstance(inner, torch.distributions.OneHotCategorical):
        return int(inner.event_shape[-1])
    if isinstance(inner, torch.distributions.Categorical):
        return int(inner.logits.shape[-1])
    if isinstance(inner, torch.distributions.Bernoulli):
        return 2
    return None


def _is_deterministic(site) -> bool:
    return site["infer"].get("_deterministic", False) or type(_innermost(site["fn"])).__name__ == "Delta" and site["is_observed"]


class _BatchKeysOfObservations(pyro.poutine.messenger.Messenger):
    """Records, before provenance tracking relabels them, which batch keys each observed value and
    each site's mask came from."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, frozenset] = {}
        self.masks: dict[str, frozenset] = {}

    def _pyro_sample(self, msg):
        if msg["is_observed"]:
            self.values[msg["name"]] = _provenance(msg["value"])
        if torch.is_tensor(msg["mask"]):
            self.masks[msg["name"]] = _provenance(msg["mask"])


def _data_plate(observed: list, latent: list, rows: int, model_name: str) -> str:
    """The vectorized plate of size ``rows`` at the observed sites (at the latent ones for a model
    that observes nothing); ``"data"`` where several qualify."""
    for sites in (observed, latent):
        names = []
        for site in sites:
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.size == rows and frame.name not in names:
                    names.append(frame.name)
        if names:
            if "data" in names:
                return "data"
            taken = sorted({f.name for s in observed + latent for f in s["cond_indep_stack"] if f.name == "data"})
            if taken:
                raise PairMismatchError(
                    f"{model_name}'s plate over the rows is {names[0]!r}, but another of its plates is named 'data', "
                    "the name pyrovae gives the rows' plate: rename that plate"
                )
            return names[0]
    raise PairMismatchError(
        f"{model_name} has no plate over the batch's {rows} rows: wrap the story in "
        f"pyro.plate(NAME, x.shape[0]) (any name) so that every example gets its own terms"
    )


def _check_batch_dims(sites: list, model_name: str) -> None:
    """Every batch dim of a site with more than one value must be a plate's: a dim no plate declares
    (a parameter's singleton that broadcast against a plate, say) would be summed into every
    per-example term without a word."""
    for site in sites:
        shape = tuple(site["fn"].batch_shape)
        plates = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
        for index, size in enumerate(shape):
            dim = index - len(shape)
            if size > 1 and dim not in plates:
                declared = ", ".join(f"{name!r} at dim {d}" for d, name in sorted(plates.items())) or "none"
                raise PairMismatchError(
                    f"{model_name}'s site {site['name']!r} has batch shape {shape}, but dim {dim} ({size} values) is no "
                    f"plate's (plates: {declared}): a parameter shaped to broadcast there repeats the site; "
                    "reshape it to the plates' dims, or move event dims right with .to_event(n)"
                )


def _plate_dim(sites: list, plate: str) -> int:
    return next((f.dim for s in sites for f in s["cond_indep_stack"] if f.name == plate and f.vectorized), -1)


def error_summary(error: BaseException) -> str:
    """An error's message on one line: its first line, and the next where the first only
    introduces it (Pyro's "Error while computing log_prob at site 'x':")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _run(model, batch: Mapping, tracked: bool):
    keys = _BatchKeysOfObservations()
    with torch.no_grad(), poutine.block(), preserved_rng(), pyro.validation_enabled(False):
        if not tracked:
            return poutine.trace(model).get_trace(**batch), keys
        with TrackProvenance():
            return poutine.trace(keys(model)).get_trace(**_with_provenance(batch)), keys


def _inverse(model, batch: Mapping, latent_names: list[str]) -> tuple[dict, tuple[str, ...]]:
    """Pyro's faithful inverse of the model graph, and an order in which a guide can sample it."""
    with preserved_rng(), poutine.block():
        dependencies = get_dependencies(model, (), dict(batch))["posterior_dependencies"]
    parents = {
        name: tuple(d for d in latent_names if d != name and d in dependencies.get(name, {})) for name in latent_names
    }
    return parents, _order(latent_names, parents)


def _order(names: list[str], parents: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A topological order of the inverse graph (a site after the sites it conditions on): the
    model's order reversed, which Pyro's inverse respects, with ties kept in reverse model order."""
    placed: list[str] = []
    remaining = list(reversed(names))
    while remaining:
        ready = next((n for n in remaining if all(p in placed for p in parents[n] if p != n)), remaining[0])
        placed.append(ready)
        remaining.remove(ready)
    return tuple(placed)


def describe_model(model, batch: Mapping, declares_latent_sites: bool = False) -> ModelDescription:
    """Run ``model(**batch)`` once (no gradient, random streams restored) and describe it. A model
    that observes nothing is refused unless it declares its latent sites itself."""
    model_name = getattr(model, "__name__", None) or type(model).__name__
    rows = int(batch["x"].shape[0]) if torch.is_tensor(batch.get("x")) else int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
    tracked = True
    try:
        trace, keys = _run(model, batch, tracked=True)
    except Exception:  # noqa: BLE001 - an op provenance tracking cannot pass: describe without it
        tracked = False
        try:
            trace, keys = _run(model, batch, tracked=False)
        except Exception as error:  # noqa: BLE001 - the model's own mistake, in one line
            raise PairMismatchError(
                f"{model_name} failed when traced on the first {rows} rows ({type(error).__name__}: {error_summary(error)})"
            ) from None
    trace = prune_subsample_sites(trace)
    sites = [
        s for s in trace.nodes.values() if s["type"] == "sample" and not s["infer"].get("is_auxiliary") and not _is_deterministic(s)
    ]
    observed = [s for s in sites if s["is_observed"]]
    if not observed and not declares_latent_sites:
        raise PairMismatchError(
            f"{model_name} observes nothing: give the data's site obs=x (e.g. pyro.sample('x', ..., obs=x)); "
            f"its trace samples {[s['name'] for s in sites]}"
        )
    _check_batch_dims(sites, model_name)
    plate = _data_plate(observed, [s for s in sites if not s["is_observed"]], rows, model_name)
    latent_names = [s["name"] for s in sites if not s["is_observed"]]
    all_keys = tuple(sorted(key for key, value in batch.items() if torch.is_tensor(value)))
    described: list[TracedSite] = []
    read_keys: set[str] = set()
    for index, site in enumerate(sites):
        fn = site["fn"]
        earlier = [s["name"] for s in sites[:index] if not s["is_observed"]]
        if tracked:
            try:
                provenance = _provenance(fn.log_prob(site["value"]))
            except Exception:  # noqa: BLE001
                provenance = frozenset()
            mask_provenance = keys.masks.get(site["name"], frozenset())
            parents = tuple(n for n in earlier if n in provenance)
            inputs = tuple(sorted(set(_keys(provenance)) | set(_keys(mask_provenance))))
            value_keys = _keys(keys.values.get(site["name"], frozenset()))
            mask_keys = _keys(mask_provenance)
        else:
            parents, inputs = tuple(earlier), all_keys
            value_keys = tuple(k for k in all_keys if batch[k] is site["value"])
            mask_keys = ()
        read_keys.update(inputs)
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        described.append(
            TracedSite(
                name=site["name"],
                event_shape=tuple(fn.event_shape),
                support=fn.support,
                distribution=type(_innermost(fn)).__name__,
                discrete=bool(fn.support.is_discrete),
                enumerated=site["infer"].get("enumerate") is not None,
                reparameterized=bool(getattr(fn, "has_rsample", False)),
                nested_plates=tuple(f.name for f in frames if f.name != plate),
                sequential="_markov_scope" in site["infer"],
                parents=parents,
                inputs=inputs,
                observed_key=value_keys[0] if len(value_keys) == 1 else None,
                mask_key=mask_keys[0] if len(mask_keys) == 1 else None,
                categories=_categories(fn),
            )
        )
        read_keys.update(value_keys)
    latent = tuple(s for s in described if s.name in latent_names)
    inverted = tracked
    if tracked:
        try:
            posterior, order = _inverse(model, batch, latent_names)
        except Exception:  # noqa: BLE001 - fall back to the full chain below
            inverted = False
    if not inverted:
        order = tuple(reversed(latent_names))
        posterior = {name: tuple(order[: order.index(name)]) for name in latent_names}
    return ModelDescription(
        model_name=model_name,
        data_plate=plate,
        data_plate_dim=_plate_dim(sites, plate),
        rows=rows,
        latent=latent,
        observed=tuple(s for s in described if s.name not in latent_names),
        inputs=tuple(sorted(read_keys)) if tracked else all_keys,
        posterior_parents=posterior,
        guide_order=order,
        tracked=tracked,
        input_shapes={key: (tuple(batch[key].shape[1:]), _kind(batch[key])) for key in all_keys},
    )


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    return "float" if tensor.dtype.is_floating_point else "integer"


