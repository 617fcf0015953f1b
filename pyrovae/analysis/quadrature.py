"""The posterior of a model's scalar latent by quadrature on a grid: where z is one number per row,
p(z | x) and log p(x) can be computed to any accuracy without a guide, which is what an amortized
posterior or an importance-sampled likelihood is checked against (He et al. 2019's synthetic
posterior-collapse picture, ``experiments/synthetic_collapse.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.traces import is_auxiliary_term, latent_sites, per_datapoint, reported_log_prob


@dataclass
class GridPosterior:
    """Moments of p(z | x) per row, (N,) each, from :func:`grid_posterior`."""

    mean: torch.Tensor
    std: torch.Tensor
    # KL(p(z | x) || p(z)) per row: averaged over x ~ p(x) it is I(x; z) of the model.
    kl_from_prior: torch.Tensor
    # log p(x) = log integral p(x, z) dz per row.
    log_marginal: torch.Tensor
    # The largest weight on either end point of the grid: near 0 when the grid covers the posterior.
    edge_weight: float


def grid_posterior(
    model, batch: Mapping[str, torch.Tensor], grid: torch.Tensor, site: str = "z", max_rows: int = 20000
) -> GridPosterior:
    """The posterior of a model's scalar latent ``site`` by quadrature on an evenly spaced ``grid``
    z_1 < ... < z_G (G points, spacing dz):

        w_g(x) = p(x, z_g) / sum_h p(x, z_h)          (p(x, z) = p(z) p(x | z), all of the model's sites)
        E[z | x] ~= sum_g w_g z_g,    Var[z | x] ~= sum_g w_g z_g^2 - E[z | x]^2
        KL(p(z | x) || p(z)) ~= sum_g w_g log(w_g / (p(z_g) dz))
        log p(x) ~= log sum_g p(x, z_g) dz

    The model runs once per chunk of grid points, inside a ``"grid"`` plate left of its own plates
    with ``site`` conditioned on the grid values (vectorized, like importance particles), and
    log p(x, z_g) is read per datapoint with masks honoured. The grid must cover the posterior's
    mass and be fine against its width; the sums are then Riemann sums of the integrals.
    """
    tensors = dict(batch)
    count = int(tensors["x"].shape[0])
    grid = grid.to(tensors["x"].device, torch.float32)
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training is not None:
        model.eval()
    try:
        with torch.no_grad(), poutine.block():
            shape_trace = poutine.trace(model).get_trace(**tensors)
            sites = dict(latent_sites(shape_trace))
            if set(sites) != {site}:
                raise ValueError(f"grid_posterior needs a model whose only latent is {site!r}; it has {sorted(sites)}")
            prior_value = sites[site]["value"]
            if prior_value.numel() != count:
                raise ValueError(f"grid_posterior needs a scalar {site!r} per row; one row's value has shape {tuple(prior_value.shape[1:])}")
            nesting = max(len(node["cond_indep_stack"]) for node in shape_trace.nodes.values() if node["type"] == "sample")
            chunk = max(1, max_rows // count)
            log_joint, log_prior = [], []
            for begin in range(0, len(grid), chunk):
                points = grid[begin : begin + chunk]
                values = points.view((-1,) + (1,) * prior_value.dim()).expand((len(points),) + prior_value.shape)
                plate = pyro.plate("grid", len(points), dim=-(nesting + 1))
                trace = poutine.trace(plate(poutine.condition(model, data={site: values}))).get_trace(**tensors)
                trace.compute_log_prob()
                terms = {
                    name: per_datapoint(node, reported_log_prob(node), nesting, True)  # (chunk, N)
                    for name, node in trace.nodes.items()
                    if node["type"] == "sample" and not site_is_subsample(node) and not is_auxiliary_term(node)
                }
                log_joint.append(sum(terms.values()))
                log_prior.append(terms[site])
    finally:
        if was_training is not None:
            model.train(was_training)
    log_joint, log_prior = torch.cat(log_joint).double(), torch.cat(log_prior).double()  # (G, N)
    log_weights = log_joint - torch.logsumexp(log_joint, 0)
    weights = log_weights.exp()
    points = grid.double().unsqueeze(-1)
    mean = (weights * points).sum(0)
    variance = (weights * points**2).sum(0) - mean**2
    spacing = float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    kl = (weights * (log_weights - log_prior - math.log(spacing))).sum(0)
    log_marginal = torch.logsumexp(log_joint, 0) + math.log(spacing)
    edge_weight = float(torch.maximum(weights[0], weights[-1]).max())
    return GridPosterior(
        mean.float().cpu(), variance.clamp(min=0).sqrt().float().cpu(), kl.float().cpu(), log_marginal.float().cpu(), edge_weight
    )
