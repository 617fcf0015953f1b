"""Running a model/guide pair once and reading per-datapoint terms off its traces.

Shared by the objectives (ELBO metrics, IWAE) and the analysis (importance-sampled
log-likelihood), so every number is computed from the same traces the loss uses.

Two rules hold for every number read here:

- **Reported numbers honour masks and undo only beta.** :func:`reported_log_prob` is the
  site's log-density after ``poutine.mask``, ``obs_mask``, ``Distribution.mask`` and every
  scale (plate subsampling, ``poutine.scale``) except the KL weight that
  :class:`~pyrovae.handlers.kl_scale` multiplied in. Pyro's ``unscaled_log_prob`` is *not*
  that: it is recorded before masks apply.
- **Enumerated sites are summed out, never sampled.** :func:`inspect_pair` lists the
  sites a pair enumerates (``infer={"enumerate": "parallel"}``, or a ``LatentSite`` declared
  ``enumerated``); objectives that cannot sum them out refuse the pair by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.util import site_is_subsample

from pyrovae.handlers import AUXILIARY_TERM, UNANNEALED_SCALE

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"


def latent_sites(trace):
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def observed_sites(trace, auxiliary: bool = True):
    """The observed sites, as the loss scores them; ``auxiliary=False`` leaves out auxiliary training
    terms (:func:`pyrovae.pair.auxiliary_term`), which are not part of p(x, z): what every reported
    number reads."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and (auxiliary or not is_auxiliary_term(site))
    ]


def is_auxiliary_term(site) -> bool:
    return bool(site["infer"].get(AUXILIARY_TERM))


def auxiliary_sites(trace):
    """The auxiliary training terms of a model trace (:func:`pyrovae.pair.auxiliary_term`), as (name, site)."""
    return [(name, site) for name, site in observed_sites(trace) if is_auxiliary_term(site)]


def reported_log_prob(site) -> torch.Tensor:
    """The site's log-density as reported: masked and scaled as Pyro scores it, but without
    ``kl_scale``'s beta. Equal to ``site["log_prob"]`` (the same tensor) when beta did not touch it."""
    unannealed = site["infer"].get(UNANNEALED_SCALE)
    if unannealed is None:
        return site["log_prob"]
    return scale_and_mask(site["unscaled_log_prob"], unannealed, site["mask"])


def reported_log_prob_sum(site) -> torch.Tensor:
    if site["infer"].get(UNANNEALED_SCALE) is None:
        return site["log_prob_sum"]
    return reported_log_prob(site).sum()


def is_annealed(site) -> bool:
    return site["infer"].get(UNANNEALED_SCALE) is not None


def is_enumerated(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate") is not None


def preserved_rng():
    """Run a look-ahead (a check, a plate-depth guess) without moving the random streams, so a
    resumed run draws exactly what an unbroken one would have."""
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class PairInfo:
    """What one look-ahead run of a pair shows, for objectives to check and cache.

    ``model_enumerated``: latent sites the model marks for enumeration (or declares
    ``enumerated``) and the guide does not sample; ``guide_enumerated``: guide sites marked
    ``infer={"enumerate": ...}``; ``score_function_sites``: sampled guide sites without
    ``rsample`` (their gradient needs a score-function estimator).
    """

    max_plate_nesting: int
    model_enumerated: tuple[str, ...] = ()
    guide_enumerated: tuple[str, ...] = ()
    score_function_sites: tuple[str, ...] = ()
    model_name: str = "model"

    @property
    def enumerated(self) -> tuple[str, ...]:
        return self.guide_enumerated + self.model_enumerated


def _name(part) -> str:
    return getattr(part, "__name__", None) or type(part).__name__


def inspect_pair(model, guide, batch: Mapping, max_plate_nesting: int | None = None) -> PairInfo:
    """Run the pair once (without moving the RNG) and describe its sites."""
    with torch.no_grad(), poutine.block(), preserved_rng():
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    depth = 0
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                depth = max(depth, sum(1 for frame in site["cond_indep_stack"] if frame.vectorized))
    declared = {site.name for site in getattr(model, "latent_sites", ()) if getattr(site, "enumerated", False)}
    guide_latents = dict(latent_sites(guide_trace))
    model_enumerated = tuple(
        name for name, site in latent_sites(model_trace) if name not in guide_latents and (is_enumerated(site) or name in declared)
    )
    guide_enumerated = tuple(name for name, site in guide_latents.items() if is_enumerated(site))
    score_function = tuple(
        name for name, site in guide_latents.items() if not site["fn"].has_rsample and not is_enumerated(site)
    )
    return PairInfo(
        max_plate_nesting=depth if max_plate_nesting is None else max_plate_nesting,
        model_enumerated=model_enumerated,
        guide_enumerated=guide_enumerated,
        score_function_sites=score_function,
        model_name=_name(model),
    )


def guess_max_plate_nesting(model, guide, batch: Mapping) -> int:
    """Deepest stack of vectorized plates over the sample sites of one run of the pair."""
    return inspect_pair(model, guide, batch).max_plate_nesting


def batch_device(batch: Mapping):
    x = batch.get("x")
    if torch.is_tensor(x):
        return x.device
    return next((value.device for value in batch.values() if torch.is_tensor(value)), None)


def trace_pair(
    model,
    guide,
    batch: Mapping,
    *,
    max_plate_nesting: int,
    particles: int | None = None,
    before_model: Callable | None = None,
    enumerate: bool = False,
):
    """Guide trace, then the model replayed on it, with scaled and unscaled log-densities.

    With ``particles=K`` both run inside ``pyro.plate("particles", K)`` at dim
    ``-(max_plate_nesting + 1)``, so every latent gets K vectorized samples per datapoint.
    With ``enumerate=True`` sites marked ``infer={"enumerate": "parallel"}`` take every value
    of their support along new dims to the left of those (guide first, then model, as in
    Pyro's ``TraceEnum_ELBO``).
    ``before_model(guide_trace)`` may edit guide values or distributions before the replay.
    """
    first_enum_dim = -(max_plate_nesting + 1)
    if particles is not None:
        plate = pyro.plate(PARTICLE_PLATE, particles, dim=-(max_plate_nesting + 1), device=batch_device(batch))
        model, guide = plate(model), plate(guide)
        first_enum_dim -= 1
    if enumerate:
        guide = EnumMessenger(first_available_dim=first_enum_dim)(guide)
        model = EnumMessenger()(model)  # keeps allocating to the left of the guide's dims
    guide_trace = poutine.trace(guide).get_trace(**batch)
    if before_model is not None:
        before_model(guide_trace)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    for trace in (guide_trace, model_trace):  # in place: these traces are ours, no need to copy
        for name in [name for name, site in trace.nodes.items() if site_is_subsample(site)]:
            trace.remove_node(name)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()  # sets log_prob too; the score parts serve non-reparameterized sites
    return model_trace, guide_trace


def per_datapoint(site, values: torch.Tensor, max_plate_nesting: int, with_particles: bool) -> torch.Tensor:
    """Sum a site's log-density over every plate dim except the particle dim and the
    ``"data"`` plate dim: shape ``(K, B)`` with particles, else ``(B,)``. Enumeration dims
    (left of the plates) are kept, so the result is ``(*enum, K, B)`` where a site depends on
    enumerated values."""
    data_frames = [frame for frame in site["cond_indep_stack"] if frame.name == DATA_PLATE]
    if not data_frames:
        raise ValueError(
            f"site {site['name']!r} is outside the 'data' plate, so it has no per-datapoint term; "
            "per-datapoint objectives (IWAE, importance-sampled log-likelihood) need every site inside it"
        )
    rank = max_plate_nesting + (1 if with_particles else 0)
    if values.dim() < rank:
        values = values.reshape((1,) * (rank - values.dim()) + values.shape)
    enum_shape = values.shape[: values.dim() - rank]
    offset = len(enum_shape)
    keep = {offset + rank + data_frames[0].dim}
    if with_particles:
        keep.add(offset)
    drop = [offset + dim for dim in range(rank) if offset + dim not in keep]
    if drop:
        values = values.sum(drop, keepdim=True)
    tail = (values.shape[offset], -1) if with_particles else (-1,)
    return values.reshape(enum_shape + tail)


def log_weight_terms(model_trace, guide_trace, max_plate_nesting: int, with_particles: bool, scaled: bool):
    """Per-datapoint terms of log w = log p(x, z) - log q(z | x).

    Returns ``(reconstruction, {site: log p(z_site) - log q(z_site)})``, each shaped
    ``(K, B)`` or ``(B,)`` (with enumeration dims on the left where present). ``scaled=True``
    uses the log-densities as scored (KL annealing included), ``scaled=False`` the reported
    ones (:func:`reported_log_prob`: masks honoured, beta undone). Auxiliary training terms are
    not part of log w (:func:`auxiliary_terms` reads them). The guide term of an
    enumerated guide site is left out: summing the weights over its values (see
    :func:`log_weights`) is the exact sum that replaces sampling it (for elements a mask
    hides from the site, the sum becomes an average: see ``enumeration_mass``).
    """
    read = (lambda site: site["log_prob"]) if scaled else reported_log_prob
    reconstruction = 0.0
    for _, site in observed_sites(model_trace, auxiliary=False):
        reconstruction = reconstruction + per_datapoint(site, read(site), max_plate_nesting, with_particles)
    latent_terms = {}
    for name, site in latent_sites(model_trace):
        term = per_datapoint(site, read(site), max_plate_nesting, with_particles)
        guide_site = guide_trace.nodes.get(name)
        if guide_site is not None and not is_enumerated(guide_site):
            term = term - per_datapoint(guide_site, read(guide_site), max_plate_nesting, with_particles)
        enumerated = guide_site if guide_site is not None else site  # where the values were drawn
        if is_enumerated(enumerated):
            term = term - per_datapoint(enumerated, enumeration_mass(enumerated, read), max_plate_nesting, with_particles)
        latent_terms[name] = term
    return reconstruction, latent_terms


def auxiliary_terms(model_trace, max_plate_nesting: int, with_particles: bool) -> dict[str, torch.Tensor]:
    """Each auxiliary training term (:func:`pyrovae.pair.auxiliary_term`) per datapoint, ``(K, B)``
    or ``(B,)`` as :func:`log_weight_terms`: what an objective adds to its bound, outside it."""
    return {name: per_datapoint(site, site["log_prob"], max_plate_nesting, with_particles) for name, site in auxiliary_sites(model_trace)}


def enumeration_mass(site, read) -> torch.Tensor:
    """log sum over an enumerated site's values of its (masked) density, per element: 0 where
    the density is normalized, log |support| where a mask zeroed it. Subtracting it turns the
    sum over values into the right average for masked elements (e.g. labelled rows of an
    ``obs_mask``-ed label), which is what Pyro's Dice expectation does."""
    log_prob = read(site)
    dim = site["infer"].get("_enumerate_dim")
    if dim is None or log_prob.dim() < -dim or log_prob.shape[dim] == 1:
        return torch.zeros_like(log_prob)
    return torch.logsumexp(log_prob, dim, keepdim=True)


def sum_out_enumeration(values: torch.Tensor, with_particles: bool) -> torch.Tensor:
    """log-sum-exp over the enumeration dims left of ``(K, B)`` / ``(B,)``."""
    rank = 2 if with_particles else 1
    if values.dim() <= rank:
        return values
    return torch.logsumexp(values.reshape((-1,) + values.shape[-rank:]), 0)


def log_weights(model_trace, guide_trace, max_plate_nesting: int, with_particles: bool, scaled: bool) -> torch.Tensor:
    """log w per particle and datapoint, with enumerated sites summed out exactly:
    log w = log sum_{enumerated values e} p(x, z, e) / q(z | e, x)."""
    reconstruction, latent_terms = log_weight_terms(model_trace, guide_trace, max_plate_nesting, with_particles, scaled)
    total = reconstruction + sum(latent_terms.values())
    return sum_out_enumeration(total, with_particles)


def check_enumeration_in_data_plate(model_trace, guide_trace) -> None:
    """Per-datapoint exact sums need every enumerated site directly in the "data" plate; an
    enumerated site inside a nested plate would need a sum per element (TraceEnum_ELBO's
    tensor contraction)."""
    for trace in (guide_trace, model_trace):
        for name, site in latent_sites(trace):
            if not is_enumerated(site):
                continue
            nested = [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name not in (DATA_PLATE, PARTICLE_PLATE)]
            if nested:
                raise NotImplementedError(
                    f"enumerated site {name!r} sits inside plate(s) {nested}: per-datapoint exact sums support "
                    "enumerated sites directly inside the 'data' plate only"
                )


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])
