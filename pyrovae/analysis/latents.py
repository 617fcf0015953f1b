"""What the latents hold: KL per dimension, mutual information I(x; z), the aggregate
posterior's moments, and summaries of chosen datapoints' posteriors (active units are
:func:`pyrovae.analysis.active_units`)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
import xarray as xr
from pyro import poutine
from pyro.poutine.enum_messenger import EnumMessenger
from tqdm.auto import tqdm

from pyrovae.analysis.arviz_compat import group, has_group
from pyrovae.analysis.posterior import GUIDE_GROUP, PosteriorDraws, draw_posterior, evaluation_mode, seeded, whole_batch
from pyrovae.traces import (
    DATA_PLATE,
    PARTICLE_PLATE,
    batch_device,
    enumeration_mass,
    inspect_pair,
    is_enumerated,
    latent_sites,
    per_datapoint,
    reported_log_prob,
    sum_out_enumeration,
)

def kl_per_dimension(
    model=None,
    guide=None,
    data=None,
    num_samples: int = 100,
    *,
    draws: PosteriorDraws | None = None,
    inputs: Mapping[str, float] | None = None,
    batch_size: int = 100,
    seed: int | None = None,
    progress: bool = False,
) -> dict[str, xr.DataArray]:
    """KL_d = E_x E_{q(z | x)} [log q(z_d | x) - log p(z_d | parents)] per latent site and
    factorized dimension d, the Monte Carlo average over the datapoints of ``data`` and
    ``num_samples`` guide draws each (or over ``draws`` from :func:`draw_posterior`).

    For a factorized guide and prior the KL_d add up to the site's KL; a site whose densities do
    not factorize (``MultivariateNormal``, a single ``OneHotCategorical``) gets one number
    (dims ``()``). Dimensions with KL_d near 0 carry no information about x (posterior
    collapse). Each result holds ``attrs["total"]``, the site's KL summed over its dimensions."""
    if draws is None:
        draws = draw_posterior(model, guide, data, num_samples, inputs=inputs, batch_size=batch_size, seed=seed, progress=progress)
    result = {}
    for site, per_point in draws.kl.items():
        mean = per_point.double().mean(0).numpy()
        names = draws.kl_dims[site]
        array = xr.DataArray(mean, dims=names, coords={name: np.arange(size) for name, size in zip(names, mean.shape)}, name=site)
        array.attrs["total"] = float(mean.sum())
        result[site] = array
    return result


def continuous_sites(idata, name: str = GUIDE_GROUP) -> list[str]:
    """Floating-point latent sites of the group ``name`` (enumerated sites and the weights left
    out; none for a pair without latents)."""
    if not has_group(idata, name):
        return []
    draws = group(idata, name)
    enumerated = set(str(draws.attrs.get("enumerated_sites", "")).split(",")) - {""}
    skip = enumerated | {"log_weight", "psis_log_weight"}
    return [site for site, var in draws.data_vars.items() if var.dtype.kind == "f" and site not in skip]


def aggregate_posterior_moments(idata) -> dict[str, xr.Dataset]:
    """Moments of the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) of each continuous site,
    from all N x S guide draws pooled (``guide_draws``; the law of total variance is built in):

        mean_d = E_q(z)[z_d],   cov_{d,e} = E_q(z)[(z_d - mean_d)(z_e - mean_e)].

    A well-fitted VAE's q(z) is close to the prior (mean 0 and identity covariance for a
    standard-normal prior). Each Dataset holds ``mean`` and ``std`` over the site's dims and,
    for vector sites, ``covariance`` over (dim, dim_)."""
    result = {}
    guide_draws = group(idata, GUIDE_GROUP) if has_group(idata, GUIDE_GROUP) else None
    for name in continuous_sites(idata):
        draws = guide_draws[name].astype("float64")
        pooled = draws.stack(__pool__=("chain", "draw", "obs"))
        moments = {"mean": pooled.mean("__pool__"), "std": pooled.std("__pool__")}
        event = [dim for dim in draws.dims if dim not in ("chain", "draw", "obs")]
        if len(event) == 1:
            values = pooled.transpose("__pool__", event[0]).values
            covariance = np.atleast_2d(np.cov(values, rowvar=False))
            moments["covariance"] = xr.DataArray(covariance, dims=(event[0], f"{event[0]}_"))
        result[name] = xr.Dataset(moments)
    return result


def latent_summary(idata, points: Sequence, var_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The chosen datapoints' continuous latents, one row per datapoint and dimension: ``mean``,
    ``sd`` and the equal-tailed 94% interval (``q3%``, ``q97%``) of the PSIS-weighted posterior
    (the ``posterior`` group, approximately p(z | x)), beside ``guide_mean`` and ``guide_sd``, the
    guide's q(z | x). Where ``mean`` and ``guide_mean`` differ by more than ``sd`` the guide's
    mean is off; the weighted columns are as good as the point's k-hat."""
    names = list(var_names or continuous_sites(idata))
    weighted = group(idata, "posterior")[names].sel(obs=list(points))
    guide = group(idata, GUIDE_GROUP)[names].sel(obs=list(points))
    rows, index = [], []
    for name in names:
        var, proposal = weighted[name], guide[name]
        event = [dim for dim in var.dims if dim not in ("chain", "draw")]
        flat = var.stack(__row__=event).stack(__sample__=("chain", "draw")).transpose("__row__", "__sample__")
        flat_guide = proposal.stack(__row__=event).stack(__sample__=("chain", "draw")).transpose("__row__", "__sample__")
        values, guide_values = flat.values.astype(np.float64), flat_guide.values.astype(np.float64)
        low, high = np.quantile(values, [0.03, 0.97], axis=1)
        for row in range(values.shape[0]):
            item = flat.isel(__row__=row)
            labels = ", ".join(str(item.coords[dim].item()) for dim in event)
            index.append(f"{name}[{labels}]")
            rows.append((values[row].mean(), values[row].std(), low[row], high[row], guide_values[row].mean(), guide_values[row].std()))
    return pd.DataFrame(rows, index=index, columns=["mean", "sd", "q3%", "q97%", "guide_mean", "guide_sd"]).round(3)


def mutual_information(
    model,
    guide,
    data,
    *,
    inputs: Mapping[str, float] | None = None,
    batch_size: int = 100,
    max_rows: int = 20000,
    seed: int | None = None,
    progress: bool = False,
) -> float:
    """I(x; z) under q(x, z) = (1/N) sum_n delta(x - x_n) q(z | x_n), He et al. 2019's estimator
    (``calc_mi`` of vae-lagging-encoder) with one draw z_i ~ q(z | x_i) per datapoint:

        I ~= (1/N) sum_i [ log q(z_i | x_i) - log (1/N) sum_j q(z_i | x_j) ],

    the second term being log q(z_i) under the aggregate posterior of the N datapoints. z is
    every latent the guide samples; sites the guide enumerates are summed out of q(z | x_j)
    with their own probabilities (log q(z | x) = log sum_e q(e | x) q(z | x, e)). The estimate
    lies in [0, log N] up to Monte Carlo error (it is biased low for small N: log N caps it).
    Log-densities are :func:`pyrovae.traces.reported_log_prob` (masks honoured)."""
    tensors, extra = whole_batch(data, inputs)
    count = int(tensors["x"].shape[0])
    with torch.no_grad(), evaluation_mode(model, guide), seeded(seed):
        info = inspect_pair(model, guide, {**{k: v[:2] for k, v in tensors.items()}, **extra})
        nesting = info.max_plate_nesting
        drawn = _draw_guide_values(guide, tensors, extra, info, batch_size)
        if not drawn:
            return 0.0
        mixture = torch.full((count,), -math.inf, dtype=torch.float64)
        own = torch.zeros(count, dtype=torch.float64)
        chunk = max(1, max_rows // max(1, min(batch_size, count)))
        steps = [(i, j) for i in range(0, count, chunk) for j in range(0, count, batch_size)]
        for i, j in tqdm(steps, disable=not progress, desc="mutual information", unit="block"):
            batch = {**{k: v[j : j + batch_size] for k, v in tensors.items()}, **extra}
            values = {name: value[i : i + chunk] for name, value in drawn.items()}
            block = _guide_log_density(guide, batch, values, nesting, bool(info.guide_enumerated)).double().cpu()  # (M, B)
            mixture[i : i + block.shape[0]] = torch.logaddexp(mixture[i : i + block.shape[0]], torch.logsumexp(block, 1))
            rows = torch.arange(block.shape[0])
            columns = rows + i - j
            inside = (columns >= 0) & (columns < block.shape[1])
            own[i + rows[inside]] = block[rows[inside], columns[inside]]
    return float((own - (mixture - math.log(count))).mean())


def _draw_guide_values(guide, tensors, extra, info, batch_size) -> dict[str, torch.Tensor]:
    """One draw z_i ~ q(z | x_i) of every site the guide samples, shaped for conditioning a
    particle plate: (N, *plates with the data dim of size 1, *event). Enumerated guide sites are
    sampled (from q(e | x)) to draw the sites that depend on them, and not kept."""
    nesting = info.max_plate_nesting
    parts: dict[str, list] = {}
    count = int(tensors["x"].shape[0])
    for start in range(0, count, batch_size):
        batch = {**{k: v[start : start + batch_size] for k, v in tensors.items()}, **extra}
        trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(**batch)
        for name, site in latent_sites(trace):
            if is_enumerated(site):
                continue
            value = site["value"]
            event_dim = site["fn"].event_dim
            batch_rank = value.dim() - event_dim
            if batch_rank < nesting:
                value = value.reshape((1,) * (nesting - batch_rank) + value.shape)
            data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE)
            # (1, *plates, *event) -> the data dim to the front, a size-1 dim in its place
            value = value.unsqueeze(0).transpose(0, 1 + nesting + data_dim)
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values, 0) for name, values in parts.items()}


def _guide_log_density(guide, batch, values, nesting, enumerate) -> torch.Tensor:
    """log q(z_i | x_j) for every drawn z_i (particle dim, M) and datapoint x_j of ``batch``:
    shape (M, B), enumerated guide sites summed out with their probabilities."""
    particles = next(iter(values.values())).shape[0]
    plate = pyro.plate(PARTICLE_PLATE, particles, dim=-(nesting + 1), device=batch_device(batch))
    conditioned = plate(poutine.condition(guide, data=values))
    if enumerate:
        conditioned = EnumMessenger(first_available_dim=-(nesting + 2))(conditioned)
    trace = poutine.trace(poutine.block(conditioned, hide_types=["param"])).get_trace(**batch)
    wanted = set(values)
    trace.compute_log_prob(site_filter=lambda name, site: name in wanted or is_enumerated(site))
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or (name not in wanted and not is_enumerated(site)):
            continue
        log_prob = reported_log_prob(site)
        total = total + per_datapoint(site, log_prob, nesting, True)
        if is_enumerated(site):
            total = total - per_datapoint(site, enumeration_mass(site, reported_log_prob), nesting, True)
    return sum_out_enumeration(total, True)
