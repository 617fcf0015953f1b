"""How good is the guide as an importance proposal? Pareto-smoothed importance sampling (PSIS,
Yao et al. 2018; Vehtari et al. 2024) on the log-weights of :func:`to_inference_data`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import xarray as xr
from scipy.special import logsumexp

from pyrovae.analysis.posterior import az

# Yao et al. 2018: k < 0.5 the importance-sampling estimate is reliable and converges fast;
# 0.5 < k < 0.7 usable; k > 0.7 the variance is too large for the estimate to be trusted.
PARETO_K_GOOD = 0.5
PARETO_K_BAD = 0.7
# psislw fits the tail to the largest ceil(min(S / 5, 3 sqrt(S))) weights and needs more than 4 of them.
MIN_PSIS_SAMPLES = 25


def psis_diagnostics(idata, threshold: float = PARETO_K_BAD, exact_tolerance: float = 1e-4) -> xr.Dataset:
    """Per datapoint n, with log w_{n,s} = log p(x_n, z_s) - log q(z_s | x_n) the S log-weights of
    ``idata.sample_stats.log_weight``:

    - ``pareto_k``: k_n, the shape of the generalized Pareto distribution fitted (by
      ``arviz.psislw``) to the largest weights. The weights' distribution has finite moments
      of order < 1/k, so k_n < 0.5 means q(z | x_n) covers the posterior well, and k_n > 0.7
      that log p(x_n) estimated from these draws cannot be trusted. Weights that are equal up
      to a factor exp(``exact_tolerance``) (q is the exact posterior, and the log-weights differ
      by rounding only) get k_n = -inf: there is no tail to fit, and the estimate cannot be off
      by more than ``exact_tolerance`` nats.
    - ``is_log_likelihood``: log (1/S) sum_s w_{n,s}, the plain importance-sampled log p(x_n);
    - ``psis_log_likelihood``: log (1/S) sum_s w~_{n,s}, the same with the Pareto-smoothed weights
      w~ (the largest raw weights replaced by the fitted tail's quantiles, truncated at the
      largest raw weight);
    - ``psis_log_weight``: log w~_{n,s} normalized to sum to 1 over s [obs, chain, draw], the
      weights that turn averages over the guide's draws into posterior expectations.

    ``attrs``: ``threshold``, ``share_above_threshold`` (the share of datapoints with
    k_n > threshold), ``num_samples``, and the means of both log-likelihoods.
    """
    if "sample_stats" not in idata.groups() or "log_weight" not in idata.sample_stats:
        raise ValueError("idata has no sample_stats.log_weight (make it with pyrovae.analysis.to_inference_data)")
    log_weight = idata.sample_stats["log_weight"].astype("float64")
    samples = log_weight.sizes["chain"] * log_weight.sizes["draw"]
    if samples < MIN_PSIS_SAMPLES:
        raise ValueError(f"PSIS needs at least {MIN_PSIS_SAMPLES} importance samples per datapoint to fit the tail, got {samples}")
    stacked = log_weight.stack(__sample__=("chain", "draw")).transpose("obs", "__sample__")
    with warnings.catch_warnings():
        # psislw warns once per run when some k > 0.7: we report k per datapoint instead.
        warnings.simplefilter("ignore", UserWarning)
        smoothed, pareto_k = az.psislw(stacked, reff=1.0, normalize=False)
    raw = stacked.values
    exact = np.ptp(raw, axis=1) <= exact_tolerance
    k = np.where(exact, -np.inf, pareto_k.values)
    smoothed_values = np.where(exact[:, None], raw, smoothed.values)
    is_ll = logsumexp(raw, axis=1) - math.log(samples)
    psis_ll = logsumexp(smoothed_values, axis=1) - math.log(samples)
    normalized = smoothed_values - logsumexp(smoothed_values, axis=1, keepdims=True)
    obs = log_weight.coords["obs"]
    coords = {"obs": obs}
    for name, coord in log_weight.coords.items():
        if name not in ("chain", "draw", "obs") and coord.dims == ("obs",):
            coords[name] = coord
    psis_log_weight = xr.DataArray(
        normalized.reshape(-1, log_weight.sizes["chain"], log_weight.sizes["draw"]),
        dims=("obs", "chain", "draw"),
        coords={**coords, "chain": log_weight.coords["chain"], "draw": log_weight.coords["draw"]},
    )
    share = float(np.mean(k > threshold))
    return xr.Dataset(
        {
            "pareto_k": ("obs", k),
            "is_log_likelihood": ("obs", is_ll),
            "psis_log_likelihood": ("obs", psis_ll),
            "psis_log_weight": psis_log_weight,
        },
        coords=coords,
        attrs={
            "threshold": threshold,
            "share_above_threshold": share,
            "num_samples": samples,
            "is_log_likelihood_mean": float(is_ll.mean()),
            "psis_log_likelihood_mean": float(psis_ll.mean()),
        },
    )
