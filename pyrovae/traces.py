"""Running a model/guide pair once and reading per-datapoint terms off its traces.

Shared by the objectives (ELBO metrics, IWAE) and the analysis (importance-sampled
log-likelihood), so every number is computed from the same traces the loss uses.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"


def latent_sites(trace):
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def observed_sites(trace):
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]]


def preserved_rng():
    """Run a look-ahead (a check, a plate-depth guess) without moving the random streams, so a
    resumed run draws exactly what an unbroken one would have."""
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else [])


def guess_max_plate_nesting(model, guide, batch: Mapping[str, torch.Tensor]) -> int:
    """Deepest stack of vectorized plates over the sample sites of one run of the pair."""
    with torch.no_grad(), poutine.block(), preserved_rng():
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    depth = 0
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                depth = max(depth, sum(1 for frame in site["cond_indep_stack"] if frame.vectorized))
    return depth


def trace_pair(
    model,
    guide,
    batch: Mapping[str, torch.Tensor],
    *,
    max_plate_nesting: int,
    particles: int | None = None,
    before_model: Callable | None = None,
):
    """Guide trace, then the model replayed on it, with scaled and unscaled log-densities.

    With ``particles=K`` both run inside ``pyro.plate("particles", K)`` at dim
    ``-(max_plate_nesting + 1)``, so every latent gets K vectorized samples per datapoint.
    ``before_model(guide_trace)`` may edit guide values or distributions before the replay.
    """
    if particles is not None:
        device = next(iter(batch.values())).device if batch else None
        plate = pyro.plate(PARTICLE_PLATE, particles, dim=-(max_plate_nesting + 1), device=device)
        model, guide = plate(model), plate(guide)
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
    """Sum a site's log-density over every batch dim except the particle dim and the
    ``"data"`` plate dim: shape ``(K, B)`` with particles, else ``(B,)``."""
    data_frames = [frame for frame in site["cond_indep_stack"] if frame.name == DATA_PLATE]
    if not data_frames:
        raise ValueError(
            f"site {site['name']!r} is outside the 'data' plate, so it has no per-datapoint term; "
            "per-datapoint objectives (IWAE, importance-sampled log-likelihood) need every site inside it"
        )
    rank = max_plate_nesting + (1 if with_particles else 0)
    values = values.reshape((1,) * (rank - values.dim()) + values.shape)
    keep = {rank + data_frames[0].dim}
    if with_particles:
        keep.add(0)
    drop = [dim for dim in range(rank) if dim not in keep]
    if drop:
        values = values.sum(drop, keepdim=True)
    return values.reshape(values.shape[0], -1) if with_particles else values.reshape(-1)


def log_weight_terms(model_trace, guide_trace, max_plate_nesting: int, with_particles: bool, scaled: bool):
    """Per-datapoint terms of log w = log p(x, z) - log q(z | x).

    Returns ``(reconstruction, {site: log p(z_site) - log q(z_site)})``, each shaped
    ``(K, B)`` or ``(B,)``. ``scaled=True`` uses the handler-scaled log-densities
    (KL annealing), ``scaled=False`` the plain ones for reporting.
    """
    key = "log_prob" if scaled else "unscaled_log_prob"
    reconstruction = 0.0
    for _, site in observed_sites(model_trace):
        reconstruction = reconstruction + per_datapoint(site, site[key], max_plate_nesting, with_particles)
    latent_terms = {}
    for name, site in latent_sites(model_trace):
        term = per_datapoint(site, site[key], max_plate_nesting, with_particles)
        if name in guide_trace.nodes:
            guide_site = guide_trace.nodes[name]
            term = term - per_datapoint(guide_site, guide_site[key], max_plate_nesting, with_particles)
        latent_terms[name] = term
    return reconstruction, latent_terms


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])
