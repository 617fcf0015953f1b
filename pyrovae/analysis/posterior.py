"""Posterior draws of a trained pair, per datapoint, as ArviZ's container (``posterior.nc``).

The draws are importance samples: the guide proposes, and the log-weights
log p(x, z) - log q(z | x) turn expectations under q(z | x) into expectations under p(z | x).
:func:`to_inference_data` keeps both posteriors, named as what they are: ``posterior`` (the
PSIS-weighted resample, approximately p(z | x)) and ``guide_draws`` (the raw q(z | x) draws with
their weights). Every log-density is read off the traces of :func:`pyrovae.traces.trace_pair`
with :func:`pyrovae.traces.reported_log_prob` (masks honoured, beta undone), as
:func:`pyrovae.analysis.importance_log_likelihood` does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from pyro.distributions import Independent, MaskedDistribution, Normal
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from tqdm.auto import tqdm

from pyrovae.memory import available_memory
from pyrovae.analysis.plots import evaluation_mode
from pyrovae.distributions import DiagonalNormal, StandardNormal
from pyrovae.handlers import UNANNEALED_SCALE
from pyrovae.traces import (
    DATA_PLATE,
    check_enumeration_in_data_plate,
    inspect_pair,
    is_enumerated,
    latent_sites,
    log_weight_terms,
    observed_sites,
    per_datapoint,
    preserved_rng,
    reported_log_prob,
    sum_out_enumeration,
    trace_pair,
)

from pyrovae.analysis.arviz_compat import dataset, inference_data
from pyrovae.analysis.diagnostics import importance_weights


def part_name(part) -> str:
    return getattr(part, "__name__", None) or type(part).__name__


@contextlib.contextmanager
def seeded(seed: int | None):
    """Draw from ``torch.manual_seed(seed)`` without moving the caller's random streams."""
    if seed is None:
        yield
        return
    with preserved_rng():
        torch.manual_seed(seed)
        yield


def whole_batch(data, inputs: Mapping[str, float] | None = None) -> tuple[dict, dict]:
    """(tensors, inputs): the batch-contract tensors (a tensor is taken as ``x``) and the
    scheduled inputs passed with every call."""
    tensors = {"x": data} if torch.is_tensor(data) else {k: v for k, v in dict(data).items() if torch.is_tensor(v)}
    if "x" not in tensors:
        raise ValueError("data needs an 'x' tensor (the batch contract)")
    return tensors, dict(inputs or {})


@dataclass
class PosteriorDraws:
    """What :func:`draw_posterior` returns, on the CPU, with draws on dim 0 and datapoints on dim 1.

    ``values[site]``: (S, N, *dims[site]); ``log_likelihood[site]``: (S, N) per observed site;
    ``log_weight``: (S, N); ``kl[site]``: (N, *kl_dims[site]), the mean over the draws of
    log q(z_d | x) - log p(z_d | parents) per factorized dimension d (the site's whole term
    where its densities do not factorize); ``hidden[site]``: (N,) bool, for an enumerated site,
    the datapoints a mask hides it from (its draws are -1 there)."""

    values: dict[str, torch.Tensor]
    dims: dict[str, tuple[str, ...]]
    log_likelihood: dict[str, torch.Tensor]
    log_weight: torch.Tensor
    kl: dict[str, torch.Tensor]
    kl_dims: dict[str, tuple[str, ...]]
    enumerated: tuple[str, ...] = ()
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.log_weight.shape[0])


def event_dim_names(site: str, event_shape) -> tuple[str, ...]:
    """``z_dim`` for a vector site, ``z_dim_0, z_dim_1`` for a matrix one, nothing for a scalar."""
    if len(event_shape) == 1:
        return (f"{site}_dim",)
    return tuple(f"{site}_dim_{i}" for i in range(len(event_shape)))


def draw_posterior(
    model,
    guide,
    data,
    num_samples: int = 1000,
    *,
    inputs: Mapping[str, float] | None = None,
    batch_size: int = 100,
    max_rows: int = 20000,
    seed: int | None = None,
    progress: bool = False,
) -> PosteriorDraws:
    """S = ``num_samples`` importance samples of every latent site per datapoint.

    For each datapoint x and particle s the guide draws z_s ~ q(z | x). Enumerated sites
    (in the model or the guide) take every value e, and the weight of each is

        w_{s,e} = p(x, z_{s,e}, e) / q(z_{s,e} | x, e)        (no q term for e itself).

    The draw reports e_s ~ Categorical(w_{s,.} / W_s), W_s = sum_e w_{s,e}: for a site the
    model enumerates this is its exact conditional posterior p(e | x, z_s); for one the guide
    enumerates, the exact posterior of e given the particle's draws. The pair (e_s, z_{s,e_s})
    has importance weight W_s against p(e, z | x) (in the space of all the particle's draws),
    so ``log_weight`` is log W_s = log p(x, z) - log q(z | x) with the enumerated sites summed
    out, the same quantity :func:`~pyrovae.analysis.importance_log_likelihood` averages:
    log p(x) ~= log (1/S) sum_s W_s. ``log_likelihood[site]`` is log p(x_site | z_s, e_s) per
    datapoint (each observed site, masks honoured). Where a mask hides an enumerated site
    from a datapoint (a labelled row of an ``obs_mask``-ed label), its draws are -1.

    ``kl[site]`` averages, per datapoint and factorized dimension d, the draws of
    log q(z_d | x, .) - log p(z_d | .), an estimate of KL(q(z_d | x) || p(z_d)); the
    dimensions are those a ``Normal``, :class:`~pyrovae.distributions.DiagonalNormal`,
    :class:`~pyrovae.distributions.StandardNormal` or ``.to_event(k)`` distribution factorizes
    over, and the per-dimension terms are checked to sum to the site's reported term.
    Enumerated sites have no KL entry (their KL is ``test_kl/<site>`` of ``enum_elbo``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    tensors, extra = whole_batch(data, inputs)
    count = int(tensors["x"].shape[0])
    chunk = max(1, min(num_samples, max_rows // max(1, min(batch_size, count))))
    collected: dict[str, list] = {}
    with torch.no_grad(), evaluation_mode(model, guide), seeded(seed):
        info = inspect_pair(model, guide, {**{k: v[:2] for k, v in tensors.items()}, **extra})
        nesting, enumerate = info.max_plate_nesting, bool(info.enumerated)
        reader = _DrawReader(nesting)
        batches = range(0, count, batch_size)
        for start in tqdm(batches, disable=not progress, desc=f"posterior draws, S={num_samples}", unit="batch"):
            batch = {**{key: value[start : start + batch_size] for key, value in tensors.items()}, **extra}
            parts = []
            for done in range(0, num_samples, chunk):
                drawn = min(chunk, num_samples - done)
                model_trace, guide_trace = trace_pair(
                    model, guide, batch, max_plate_nesting=nesting, particles=drawn, enumerate=enumerate
                )
                if enumerate:
                    check_enumeration_in_data_plate(model_trace, guide_trace)
                parts.append(reader.read(model_trace, guide_trace))
            for key, value in _join(parts).items():
                collected.setdefault(key, []).append(value)
    joined = {key: torch.cat(values, dim=_obs_dim(key)) for key, values in collected.items()}
    log_weight = joined.pop("log_weight")
    if not torch.isfinite(log_weight).all():
        bad = int((~torch.isfinite(log_weight).all(0)).sum())
        raise FloatingPointError(f"draw_posterior: {bad} of {count} examples have non-finite importance weights")
    kl = {key.removeprefix("kl:"): value / num_samples for key, value in joined.items() if key.startswith("kl:")}
    return PosteriorDraws(
        values={key.removeprefix("value:"): v for key, v in joined.items() if key.startswith("value:")},
        dims=dict(reader.dims),
        log_likelihood={key.removeprefix("ll:"): v for key, v in joined.items() if key.startswith("ll:")},
        log_weight=log_weight,
        kl=kl,
        kl_dims=dict(reader.kl_dims),
        enumerated=info.enumerated,
        hidden={key.removeprefix("hidden:"): v for key, v in joined.items() if key.startswith("hidden:")},
    )


def _obs_dim(key: str) -> int:
    """Datapoints are dim 1 of draws, dim 0 of per-datapoint means (``kl:``) and masks."""
    return 0 if key.startswith(("kl:", "hidden:")) else 1


def _join(parts: list[dict]) -> dict:
    """Chunks of particles of one batch: draws concatenated, KL sums added."""
    out = {}
    for key in parts[0]:
        if key.startswith("kl:"):
            out[key] = sum(part[key] for part in parts)
        elif key.startswith("hidden:"):
            out[key] = parts[0][key]
        else:
            out[key] = torch.cat([part[key] for part in parts], 0)
    return out


class _DrawReader:
    """Reads one chunk of traces into per-draw, per-datapoint tensors (see :func:`draw_posterior`)."""

    def __init__(self, nesting: int):
        self.nesting = nesting
        self.dims: dict[str, tuple[str, ...]] = {}
        self.kl_dims: dict[str, tuple[str, ...]] = {}
        self.checked: dict[str, bool] = {}

    def read(self, model_trace, guide_trace) -> dict:
        n = self.nesting
        reconstruction, latent_terms = log_weight_terms(model_trace, guide_trace, n, True, scaled=False)
        total = reconstruction + sum(latent_terms.values())  # (*E, S, B)
        particles, batch = total.shape[-2:]
        enum_shape = tuple(total.shape[:-2])
        choice = None
        if enum_shape:
            logits = total.reshape((-1, particles, batch)).movedim(0, -1)
            choice = torch.distributions.Categorical(logits=logits).sample()  # (S, B) flat index into E
        pick = _Picker(enum_shape, choice, particles, batch)
        out = {"log_weight": sum_out_enumeration(total, True).cpu()}
        for name, site in observed_sites(model_trace, auxiliary=False):
            if site["infer"].get("_deterministic"):
                continue
            out[f"ll:{name}"] = pick(per_datapoint(site, reported_log_prob(site), n, True), 0).cpu()
        # Sites the model sums out itself (a mixture prior's component y, no guide site): a latent whose
        # prior depends on them has the marginal p(z) = sum_y p(y) p(z | y) as its prior.
        summed_in_model = [n for n, site in latent_sites(model_trace) if is_enumerated(site) and guide_trace.nodes.get(n) is None]
        for name, model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes.get(name)
            drawn = guide_site if guide_site is not None else model_site
            value, names = self._value(drawn)
            value = pick(value, len(names))
            if is_enumerated(drawn):
                hidden = self._hidden(drawn, batch)
                mask = hidden.reshape(hidden.shape + (1,) * len(names)).expand(value.shape)
                value = torch.where(mask, torch.full_like(value, -1), value)
                out[f"hidden:{name}"] = hidden[0].cpu()
            out[f"value:{name}"] = value.cpu()
            self.dims[name] = names
            if guide_site is not None and not is_enumerated(guide_site):
                term = latent_terms[name]
                if summed_in_model and term.dim() > 2 and any(size > 1 for size in term.shape[:-2]):
                    # log q(z | x) - log sum_y p(y) p(z | y): one number per draw. Per dimension,
                    # log q(z_d | x) - log p(z_d | y) at a drawn y is no KL (it can be negative).
                    joint = (term + sum(latent_terms[e] for e in summed_in_model)).expand(total.shape)
                    self.kl_dims[name] = ()
                    out[f"kl:{name}"] = (-sum_out_enumeration(joint, True)).sum(0).cpu()
                else:
                    out[f"kl:{name}"] = self._kl(name, model_site, guide_site, term, pick).sum(0).cpu()
        return out

    def _value(self, site) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The site's value as (*enum, S, B, *other plates, *event) and the names of the dims after B."""
        value, n = site["value"], self.nesting
        event_dim = site["fn"].event_dim
        event_shape = value.shape[value.dim() - event_dim :]
        batch_rank = value.dim() - event_dim
        if batch_rank < n + 1:
            value = value.reshape((1,) * (n + 1 - batch_rank) + value.shape)
            batch_rank = n + 1
        lead = batch_rank - n - 1
        frames = {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized}
        data_dim = next(dim for dim, name in frames.items() if name == DATA_PLATE)
        plate_dims = [lead + 1 + n + dim for dim in range(-n, 0)]
        data_index = lead + 1 + n + data_dim
        others = [index for index in plate_dims if index != data_index]
        keep = [index for index in others if value.shape[index] > 1]
        squeeze = [index for index in others if value.shape[index] == 1]
        order = list(range(lead + 1)) + [data_index] + keep + squeeze + list(range(batch_rank, value.dim()))
        value = value.permute(order)
        if squeeze:
            value = value.reshape(value.shape[: lead + 2 + len(keep)] + tuple(event_shape))
        names = tuple(frames[index - lead - 1 - n] for index in keep) + event_dim_names(site["name"], event_shape)
        return value, names

    def _hidden(self, site, batch: int) -> torch.Tensor:
        """(1 or S, B): datapoints a mask hides the enumerated site from (its density is 0 for
        every value, so the data say nothing about it)."""
        log_prob = per_datapoint(site, reported_log_prob(site), self.nesting, True)
        dim = site["infer"].get("_enumerate_dim")
        enum_rank = log_prob.dim() - 2
        offset = None if dim is None else -(self.nesting + 2) - dim  # among the enumeration dims, from the right
        if offset is None or offset >= enum_rank or log_prob.shape[enum_rank - 1 - offset] < 2:
            return torch.zeros((1, batch), dtype=torch.bool, device=log_prob.device)
        hidden = (log_prob == 0).all(dim=enum_rank - 1 - offset)
        return hidden.reshape((-1,) + hidden.shape[-2:]).all(0).expand(-1, batch)

    def _kl(self, name, model_site, guide_site, term, pick) -> torch.Tensor:
        """(S, B, *factor dims): log q(z_d | x) - log p(z_d | .) at the draws."""
        n = self.nesting
        trusted = self.checked.get(name)  # decided on the first chunk, kept for the others
        if trusted is not False:
            q, p = _factor_log_prob(guide_site), _factor_log_prob(model_site)
            if q is not None and p is not None and q[1] == p[1]:
                factors = q[1]
                ratio = _broadcast_sub(q[0], p[0], factors)
                moved = ratio.movedim(tuple(range(ratio.dim() - factors, ratio.dim())), tuple(range(factors)))
                reduced = per_datapoint(guide_site, moved, n, True)  # (*factors, *enum, S, B)
                reduced = reduced.movedim(tuple(range(factors)), tuple(range(reduced.dim() - factors, reduced.dim())))
                # the factors must add up to the site's reported term, or the decomposition is not used
                summed = reduced.sum(tuple(range(-factors, 0)))
                if trusted or torch.allclose(summed, -term, rtol=1e-4, atol=1e-3 * (1 + factors)):
                    self.checked[name] = True
                    event_shape = guide_site["value"].shape[guide_site["value"].dim() - guide_site["fn"].event_dim :]
                    self.kl_dims[name] = event_dim_names(name, event_shape)[:factors]
                    return pick(reduced, factors)
            if trusted:
                raise RuntimeError(f"site {name!r}: its densities stopped factorizing between chunks")
            self.checked[name] = False
        self.kl_dims[name] = ()
        return pick(-term, 0)


class _Picker:
    """Selects, per particle and datapoint, the drawn enumeration index from a tensor shaped
    (*enum, S, B, *rest) (enumeration dims possibly fewer or of size 1, broadcast)."""

    def __init__(self, enum_shape, choice, particles, batch):
        self.enum_shape, self.choice, self.core = tuple(enum_shape), choice, (particles, batch)

    def __call__(self, tensor: torch.Tensor, rest: int) -> torch.Tensor:
        core_rank = 2 + rest
        lead = tensor.dim() - core_rank
        if lead < 0:
            tensor = tensor.reshape((1,) * -lead + tensor.shape)
            lead = 0
        if lead > len(self.enum_shape):
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} has more enumeration dims than the pair's {self.enum_shape}")
        rest_shape = tuple(tensor.shape[tensor.dim() - rest :]) if rest else ()
        tensor = tensor.reshape((1,) * (len(self.enum_shape) - lead) + tensor.shape)
        tensor = tensor.expand(self.enum_shape + self.core + rest_shape)
        if not self.enum_shape:
            return tensor
        flat = tensor.reshape((-1,) + self.core + rest_shape)
        index = self.choice.reshape((1,) + self.core + (1,) * rest).expand((1,) + self.core + rest_shape)
        return flat.gather(0, index).squeeze(0)


def _broadcast_sub(q: torch.Tensor, p: torch.Tensor, factors: int) -> torch.Tensor:
    """q - p where both are (*batch, *factors) with batch shapes that broadcast (right-aligned)."""
    qb, pb = q.dim() - factors, p.dim() - factors
    if qb < pb:
        q = q.reshape((1,) * (pb - qb) + q.shape)
    elif pb < qb:
        p = p.reshape((1,) * (qb - pb) + p.shape)
    return q - p


def _factor_log_prob(site) -> tuple[torch.Tensor, int] | None:
    """(log-density per factorized dimension, number of those dims): shaped (*batch, *factors),
    the factors being the leading event dims the site's distribution is a product over. Masks
    (``Distribution.mask``, ``poutine.mask``) and the reported scale (beta undone) apply as Pyro
    applies them, so the factors sum to :func:`pyrovae.traces.reported_log_prob`."""
    fn, value = site["fn"], site["value"]
    masks, factors = [], 0
    while True:
        if isinstance(fn, MaskedDistribution):
            masks.append((fn._mask, factors))
            fn = fn.base_dist
        elif isinstance(fn, Independent):
            factors += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):
            fn = fn.base_dist
        else:
            break
    if isinstance(fn, DiagonalNormal):
        factors += fn.event_dim
        fn = Normal(fn.loc, fn.scale)
    elif isinstance(fn, StandardNormal):
        factors += len(fn.event_shape)
        fn = Normal(torch.zeros((), dtype=value.dtype, device=value.device), 1.0)
    if factors == 0:
        return None
    try:
        log_prob = fn.log_prob(value)
    except (ValueError, RuntimeError):
        return None
    for mask, depth in masks:
        if mask is True or mask is None:
            continue
        mask = torch.as_tensor(mask, device=log_prob.device)
        log_prob = torch.where(mask.reshape(mask.shape + (1,) * (factors - depth)), log_prob, torch.zeros_like(log_prob))
    scale = site["infer"].get(UNANNEALED_SCALE, site["scale"])
    if torch.is_tensor(scale) and scale.dim():
        scale = scale.reshape(scale.shape + (1,) * factors)
    mask = site["mask"]
    if torch.is_tensor(mask) and mask.dim():
        mask = mask.reshape(mask.shape + (1,) * factors)
    return scale_and_mask(log_prob, scale, mask), factors


# The groups of posterior.nc that ArviZ's schema does not name.
GUIDE_GROUP = "guide_draws"
GUIDE_LIKELIHOOD_GROUP = "guide_log_likelihood"
# Posterior predictive draws stored per test point: at most this many values in all (at least one draw).
PREDICTIVE_VALUES = 4_000_000
PREDICTIVE_DRAWS = 20
NOT_FOR_LOO = (
    "posterior.nc has no log_likelihood group on purpose: every test point has its own latent draws and the "
    "decoder's parameters are point estimates, so az.loo / az.waic / az.compare of per-draw log p(x | z) mean "
    "nothing. log p(x_n) per point is sample_stats.log_marginal_likelihood; compare runs with `pyrovae compare "
    "RUN_A RUN_B` or az.compare({name: pyrovae.analysis.elpd_data(idata)})."
)


def systematic_resample(log_weight: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Indices (N, S) into each row's S draws, drawn with probabilities exp(``log_weight``)
    (rows normalized to sum to 1) by systematic resampling: u_s = (u + s) / S with one
    u ~ U(0, 1) per row, index_s = min{i: sum_{j <= i} w_j > u_s}. Each draw i is kept
    floor(S w_i) or ceil(S w_i) times, so the resample's averages are unbiased for the weighted
    averages with less noise than multinomial resampling."""
    weight = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    cumulative = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
    rows, samples = weight.shape
    positions = (generator.uniform(size=(rows, 1)) + np.arange(samples)) / samples
    index = np.empty((rows, samples), dtype=np.int64)
    for row in range(rows):
        index[row] = np.searchsorted(cumulative[row], positions[row], side="right")
    return np.minimum(index, samples - 1)


def predictive_draws(
    model, values: Mapping[str, torch.Tensor] | None, tensors, extra, draws: int, batch_size: int = 100
) -> np.ndarray | None:
    """x_rep ~ p(x | z) at the model's observed site for every test row, ``draws`` times: with z
    the given ``values`` (site -> (draws, N, *event), e.g. posterior draws) or, with
    ``values=None``, from the prior. Shape (draws, N, *x's row shape); None when the observed
    site's draws do not have x's shape (the model observes something else) or a site cannot be
    conditioned on (a plate beside the data plate)."""
    site = getattr(model, "observed_site", "x")
    count = int(tensors["x"].shape[0])
    out = []
    with torch.no_grad(), evaluation_mode(model):
        for draw in range(draws):
            parts = []
            for start in range(0, count, batch_size):
                batch = {**{k: v[start : start + batch_size] for k, v in tensors.items()}, **extra}
                run = model
                if values is not None:
                    chosen = {name: value[draw, start : start + batch_size] for name, value in values.items()}
                    run = poutine.condition(model, data=chosen)
                try:
                    trace = poutine.trace(run).get_trace(**batch)
                    sample = trace.nodes[site]["fn"].sample()
                except (ValueError, RuntimeError, KeyError):
                    return None
                if sample.shape != batch["x"].shape:
                    return None
                parts.append(sample.cpu())
            out.append(torch.cat(parts))
    return torch.stack(out).numpy()


def _predictive_dtype(observed: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Integer-valued draws of integer or 0/1 data are stored as small integers (they compress well)."""
    if np.all(np.mod(draws, 1) == 0) and (observed.dtype.kind in "iub" or np.all(np.mod(observed, 1) == 0)):
        low, high = draws.min(initial=0), draws.max(initial=0)
        for dtype in (np.int8, np.int16, np.int32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return draws.astype(dtype)
    return draws.astype(np.float32)


def to_inference_data(
    model,
    guide,
    data,
    num_samples: int = 1000,
    *,
    inputs: Mapping[str, float] | None = None,
    obs_index=None,
    batch_size: int = 100,
    max_rows: int = 20000,
    seed: int | None = None,
    progress: bool = False,
    attrs: Mapping[str, object] | None = None,
    draws: PosteriorDraws | None = None,
    predictive: bool = True,
):
    """The posterior of every datapoint of ``data`` as ArviZ's container (``InferenceData`` under
    ArviZ 0.x, ``xarray.DataTree`` under 1.x; read groups with
    :func:`pyrovae.analysis.arviz_compat.group`). Values are stored as float32.

    Groups (dims in brackets; S = ``num_samples`` importance samples per datapoint from the guide,
    one ``chain``; see :func:`draw_posterior` for the math):

    - ``posterior``: the PSIS-weighted posterior, an approximation of p(z | x): S draws per
      datapoint resampled (systematically) from the guide's draws with their Pareto-smoothed
      weights [chain, draw, obs, <site>_dim ...]. It is as good as ``sample_stats.pareto_k``
      says, and holds about ``sample_stats.importance_ess`` distinct draws.
    - ``guide_draws``: the guide's raw draws z_s ~ q(z | x) (enumerated sites from their exact
      conditional posterior), ``log_weight`` = log p(x, z_s) - log q(z_s | x) and
      ``psis_log_weight``, the smoothed log-weights normalized per datapoint [chain, draw, obs].
    - ``guide_log_likelihood``: log p(x_site | z_s) at the guide's draws, per observed site
      [chain, draw, obs]; a site no datapoint observes (a label masked on every row) is left out
      and named in the group's ``attrs["sites_without_observations"]``.
    - ``sample_stats`` [obs]: ``log_marginal_likelihood`` = log (1/S) sum_s w_s (the importance
      estimate of log p(x_n)), ``psis_log_marginal_likelihood``, ``pareto_k`` and
      ``importance_ess`` = (sum_s w_s)^2 / sum_s w_s^2 (Kish's effective sample size of the weights).
    - ``posterior_predictive`` / ``prior_predictive``: x_rep ~ p(x | z), z from ``posterior`` /
      from the prior, a few draws [chain, draw, obs, x_dim ...] (with ``predictive``).
    - ``observed_data``: ``x``; ``constant_data``: the batch's other tensors.

    There is no ``log_likelihood`` group, so ``az.loo``, ``az.waic`` and ``az.compare`` refuse the
    file (the per-draw log-likelihoods of per-datapoint draws give meaningless numbers; see
    ``NOT_FOR_LOO``): :func:`pyrovae.analysis.elpd_data` gives ArviZ's comparison object.

    ``obs`` is ``obs_index`` (default 0..N-1); integer labels ``y`` become the coordinate
    ``label`` along ``obs`` in every group. ``attrs`` are stored in every group beside the sample
    count, the seed and the scheduled inputs. Tensors may live on any device.
    """
    tensors, extra = whole_batch(data, inputs)
    if draws is None:
        draws = draw_posterior(
            model, guide, tensors, num_samples, inputs=extra, batch_size=batch_size, max_rows=max_rows, seed=seed, progress=progress
        )
    count = int(tensors["x"].shape[0])
    obs = np.arange(count) if obs_index is None else np.asarray(obs_index)
    if obs.shape != (count,):
        raise ValueError(f"obs_index has shape {obs.shape}, expected ({count},)")
    samples = draws.num_samples
    group_attrs = {
        "model": part_name(model),
        "guide": part_name(guide),
        "inference_library": "pyro",
        "num_samples": samples,
        **({"seed": int(seed)} if seed is not None else {}),
        **{f"input_{key}": float(value) for key, value in extra.items()},
        **{key: _attr(value) for key, value in dict(attrs or {}).items()},
    }
    if draws.enumerated:
        group_attrs["enumerated_sites"] = ",".join(draws.enumerated)
    coords: dict[str, np.ndarray] = {"obs": obs}
    dims: dict[str, list[str]] = {}

    def add(name: str, array: np.ndarray, names) -> np.ndarray:
        for dim, size in zip(names, array.shape[3:]):
            coords.setdefault(dim, np.arange(size))
        dims[name] = ["obs", *names]
        return array

    weights = importance_weights(draws.log_weight.double().numpy().T)  # rows: datapoints
    generator = np.random.default_rng(None if seed is None else seed + 1)
    index = systematic_resample(weights["psis_log_weight"], generator)  # (N, S)
    raw = {name: _stored(value.unsqueeze(0).numpy()) for name, value in draws.values.items()}
    resampled = {name: np.take_along_axis(array, index.T.reshape((1, samples, count) + (1,) * (array.ndim - 3)), axis=1) for name, array in raw.items()}
    about = {
        "posterior": "PSIS-weighted posterior, approximately p(z | x): the guide's draws resampled with their Pareto-smoothed importance weights",
        GUIDE_GROUP: "raw draws z ~ q(z | x) of the guide (the importance proposal), with their log-weights log p(x, z) - log q(z | x)",
    }
    groups = {}
    if raw:
        posterior = {name: add(name, array, draws.dims[name]) for name, array in resampled.items()}
        groups["posterior"] = _dataset(posterior, coords, dims, {**group_attrs, "draws": about["posterior"], "comparison": NOT_FOR_LOO})
    guide_vars = {name: add(name, array, draws.dims[name]) for name, array in raw.items()}
    guide_vars["log_weight"] = draws.log_weight.unsqueeze(0).numpy().astype(np.float32)
    guide_vars["psis_log_weight"] = weights["psis_log_weight"].T[None].astype(np.float32)
    dims["log_weight"] = dims["psis_log_weight"] = ["obs"]
    groups[GUIDE_GROUP] = _dataset(guide_vars, coords, dims, {**group_attrs, "draws": about[GUIDE_GROUP]})
    likelihoods, missing = {}, []
    for name, value in draws.log_likelihood.items():
        array = value.unsqueeze(0).numpy()
        if not np.any(array):  # masked on every row: the site observes nothing here
            missing.append(name)
            continue
        likelihoods[name] = array.astype(np.float32)
        dims[name] = ["obs"]
    groups[GUIDE_LIKELIHOOD_GROUP] = _dataset(
        likelihoods,
        coords,
        dims,
        {
            **group_attrs,
            "meaning": "log p(x_site | z) at the guide's draws of each point; not a log_likelihood group for az.loo",
            "sites_without_observations": ",".join(missing),
            "comparison": NOT_FOR_LOO,
        },
    )
    stats = {
        "log_marginal_likelihood": weights["is_log_likelihood"],
        "psis_log_marginal_likelihood": weights["psis_log_likelihood"],
        "pareto_k": weights["pareto_k"],
        "importance_ess": weights["importance_ess"],
    }
    stats_dims = {name: ["obs"] for name in stats}
    groups["sample_stats"] = _dataset(
        {name: value.astype(np.float32) for name, value in stats.items()},
        coords,
        stats_dims,
        {**group_attrs, "meaning": "per test point: the importance weights' log p(x), Pareto k-hat and Kish ESS", "comparison": NOT_FOR_LOO},
        sampled=False,
    )
    observed, constant = {}, {}
    observed_dims = {}
    for key, value in tensors.items():
        array = value.detach().cpu().numpy()
        names = [f"{key}_dim"] if array.ndim == 2 else [f"{key}_dim_{i}" for i in range(array.ndim - 1)]
        for dim, size in zip(names, array.shape[1:]):
            coords.setdefault(dim, np.arange(size))
        observed_dims[key] = ["obs", *names]
        (observed if key == "x" else constant)[key] = array
    groups["observed_data"] = _dataset(observed, coords, observed_dims, group_attrs, sampled=False)
    if constant:
        groups["constant_data"] = _dataset(constant, coords, observed_dims, group_attrs, sampled=False)
    if predictive:
        groups.update(_predictive_groups(model, draws, index, tensors, extra, observed_dims["x"], coords, group_attrs, batch_size, seed))
    labels = tensors.get("y")
    if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
        label_values = labels.detach().cpu().numpy()
        groups = {name: dataset.assign_coords(label=("obs", label_values)) for name, dataset in groups.items()}
    return inference_data(groups, attrs={"comparison": NOT_FOR_LOO})


def _predictive_groups(model, draws, index, tensors, extra, x_dims, coords, attrs, batch_size, seed) -> dict:
    """``posterior_predictive`` (z from the resampled posterior) and ``prior_predictive``: as many
    draws as fit in ``PREDICTIVE_VALUES`` values (1 to ``PREDICTIVE_DRAWS``)."""
    observed = tensors["x"].detach().cpu().numpy()
    count = draws.log_weight.shape[1]
    repeats = int(min(PREDICTIVE_DRAWS, draws.num_samples, max(1, PREDICTIVE_VALUES // max(1, observed.size))))
    device = tensors["x"].device
    chosen = index[:, :repeats].T  # (repeats, N): resampled draws, in order
    values = {}
    for name, value in draws.values.items():
        picked = value[torch.as_tensor(chosen), torch.arange(count)]  # (repeats, N, *dims)
        if name in draws.hidden:
            picked = picked.clamp(min=0)  # hidden by a mask: the model does not use the value
        values[name] = picked.to(device)
    if any(len(draws.dims[name]) != value.dim() - 2 or any(not d.startswith(f"{name}_dim") for d in draws.dims[name]) for name, value in values.items()):
        return {}  # a plate beside the data plate: its draws are not laid out as the model takes them
    groups = {}
    with seeded(None if seed is None else seed + 2):
        for name, given in (("posterior_predictive", values), ("prior_predictive", None)):
            replicated = predictive_draws(model, given, tensors, extra, repeats, batch_size)
            if replicated is None:
                return {}
            meaning = "x ~ p(x | z), z from the posterior group" if given is not None else "x ~ p(x), z from the prior"
            groups[name] = _dataset({"x": _predictive_dtype(observed, replicated)[None]}, coords, {"x": x_dims}, {**attrs, "draws": meaning})
    return groups


def _stored(array: np.ndarray) -> np.ndarray:
    """float32 for real values; integers as they are."""
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def _attr(value):
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    return str(value)


def _dataset(variables, coords, dims, attrs, sampled: bool = True):
    return dataset(variables, coords, dims, attrs, sampled=sampled)


def check_footprint(model, guide, tensors, extra, samples: int, out_dir, batch_size: int = 100) -> dict:
    """Estimate, before drawing, the peak memory and the size of ``posterior.nc`` for ``samples``
    draws of each of the N rows of ``tensors``, from one draw of two rows (L latent values and
    O observed sites per row): the draws in torch (float32, concatenated: twice), their float32
    copies in the two posterior groups and the float64 work arrays of PSIS,

        memory ~= S N [8 (L + O + 1) + 4 (2 L + O + 2) + 48] bytes,
        file   <= S N 4 (2 L + O + 2) bytes + the predictive draws and the data (before compression).

    Raises :class:`~pyrovae.errors.ConfigError` (one line) when the memory exceeds what the machine
    has available or the file exceeds the free disk space of ``out_dir``. Returns the estimates."""
    import shutil

    from pyrovae.errors import ConfigError

    count = int(tensors["x"].shape[0])
    probe = draw_posterior(model, guide, {k: v[: min(2, count)] for k, v in tensors.items()}, 1, inputs=extra, batch_size=batch_size, seed=0)
    rows = int(probe.log_weight.shape[1])
    latent = sum(int(value[0].numel()) // rows for value in probe.values.values())
    observed = len(probe.log_likelihood)
    draws = float(samples) * count
    data_bytes = sum(int(value.element_size() * value.numel()) for value in tensors.values())
    predictive = 2 * 4 * min(PREDICTIVE_VALUES, max(tensors["x"].numel(), 1) * PREDICTIVE_DRAWS)
    memory = draws * (8 * (latent + observed + 1) + 4 * (2 * latent + observed + 2) + 48) + data_bytes + predictive
    file = draws * 4 * (2 * latent + observed + 2) + data_bytes + predictive
    available = available_memory()
    free = shutil.disk_usage(out_dir).free
    affordable = int(samples * min(1.0, (available or math.inf) / memory, free / file))

    def size(value: float) -> str:
        for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
            if value >= scale:
                return f"{value / scale:.1f} {unit}"
        return f"{value / 1e3:.0f} kB"

    if available is not None and memory > available:
        raise ConfigError(
            f"--samples {samples}: {count} test points would need about {size(memory)} of memory ({size(available)} available) "
            f"and write about {size(file)}; use at most --samples {max(affordable, 1)} or fewer --test-examples"
        )
    if file > free:
        raise ConfigError(
            f"--samples {samples}: posterior.nc would take about {size(file)} ({size(free)} free in {out_dir}); "
            f"use at most --samples {max(affordable, 1)} or fewer --test-examples"
        )
    return {"memory": int(memory), "file": int(file), "available_memory": available, "free_disk": int(free)}
