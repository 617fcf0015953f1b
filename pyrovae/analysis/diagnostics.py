"""How good is the guide as an importance proposal? Pareto-smoothed importance sampling (PSIS,
Yao et al. 2018; Vehtari et al. 2024) and Kish's effective sample size of the log-weights
log w = log p(x, z) - log q(z | x) of the guide's draws.

The draws of one datapoint are independent (each particle is a fresh draw from q(z | x)), so
the chain-based ESS and r-hat of ``az.ess`` / ``az.summary`` say nothing about them: they
report about S for S independent draws whatever the weights. What limits an importance estimate
is the weights' spread, measured here by k-hat and by Kish's ESS (sum w)^2 / sum w^2.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from scipy.special import logsumexp

from pyrovae.analysis.arviz_compat import group, has_group, psislw

# Yao et al. 2018: k < 0.5 the importance-sampling estimate is reliable and converges fast;
# 0.5 < k < 0.7 usable; k > 0.7 the variance is too large for the estimate to be trusted.
PARETO_K_GOOD = 0.5
PARETO_K_BAD = 0.7
# psislw fits the tail to the largest ceil(min(S / 5, 3 sqrt(S))) weights and needs more than 4 of them.
MIN_PSIS_SAMPLES = 25
# Weights equal up to this factor (log scale) are an exact guide: no tail to fit.
EXACT_TOLERANCE = 1e-4
# importance_weights' results as posterior.nc's sample_stats stores them.
STORED = {
    "pareto_k": "pareto_k",
    "is_log_likelihood": "log_marginal_likelihood",
    "psis_log_likelihood": "psis_log_marginal_likelihood",
    "importance_ess": "importance_ess",
}


def importance_weights(log_weight: np.ndarray, exact_tolerance: float = EXACT_TOLERANCE) -> dict[str, np.ndarray]:
    """For rows of S log-weights (N, S), per row n:

    - ``pareto_k``: k_n of the generalized Pareto tail ArviZ's ``psislw`` fits to the largest
      weights (relative efficiency 1: independent draws); -inf where the weights are equal up to
      exp(``exact_tolerance``) (an exact guide: no tail, the estimate is exact up to that);
    - ``is_log_likelihood`` = log (1/S) sum_s w_s; ``psis_log_likelihood``, the same with the
      smoothed weights w~;
    - ``psis_log_weight``: log w~_s normalized to sum to 1 over s (N, S);
    - ``importance_ess`` = (sum_s w_s)^2 / sum_s w_s^2, Kish's effective sample size of the raw
      weights, between 1 (one draw holds all the weight) and S (equal weights).
    """
    raw = np.asarray(log_weight, dtype=np.float64)
    rows, samples = raw.shape
    if samples < MIN_PSIS_SAMPLES:
        raise ValueError(f"PSIS needs at least {MIN_PSIS_SAMPLES} importance samples per datapoint to fit the tail, got {samples}")
    exact = np.ptp(raw, axis=1) <= exact_tolerance
    k = np.full(rows, -np.inf)
    smoothed = raw.copy()
    if not exact.all():  # equal weights have no tail to fit (ArviZ 1.x refuses them)
        smoothed[~exact], k[~exact] = psislw(raw[~exact])
    normalized_raw = raw - logsumexp(raw, axis=1, keepdims=True)
    return {
        "pareto_k": k,
        "is_log_likelihood": logsumexp(raw, axis=1) - math.log(samples),
        "psis_log_likelihood": logsumexp(smoothed, axis=1) - math.log(samples),
        "psis_log_weight": smoothed - logsumexp(smoothed, axis=1, keepdims=True),
        "importance_ess": np.exp(-logsumexp(2 * normalized_raw, axis=1)),
    }


def psis_diagnostics(idata, threshold: float = PARETO_K_BAD) -> xr.Dataset:
    """Per datapoint n, from the S log-weights log w_{n,s} = log p(x_n, z_s) - log q(z_s | x_n)
    of ``guide_draws.log_weight`` (see :func:`importance_weights`): ``pareto_k``,
    ``is_log_likelihood``, ``psis_log_likelihood``, ``importance_ess`` [obs] and
    ``psis_log_weight`` [obs, chain, draw], the weights that turn averages over the guide's draws
    into posterior expectations.

    ``attrs``: ``threshold``, ``share_above_threshold`` (the share of datapoints with
    k_n > threshold), ``num_samples``, the means of both log-likelihoods and the median ESS.
    """
    if not has_group(idata, "guide_draws") or "log_weight" not in group(idata, "guide_draws"):
        raise ValueError("idata has no guide_draws.log_weight (make it with pyrovae.analysis.to_inference_data)")
    log_weight = group(idata, "guide_draws")["log_weight"].astype("float64")
    samples = log_weight.sizes["chain"] * log_weight.sizes["draw"]
    stacked = log_weight.stack(__sample__=("chain", "draw")).transpose("obs", "__sample__")
    stored = group(idata, "sample_stats") if has_group(idata, "sample_stats") else {}
    if "psis_log_weight" in group(idata, "guide_draws") and all(name in stored for name in STORED):
        # written by to_inference_data from these weights: read, not recomputed
        smoothed = group(idata, "guide_draws")["psis_log_weight"].astype("float64").stack(__sample__=("chain", "draw")).transpose("obs", "__sample__")
        weights = {key: stored[name].values.astype(np.float64) for key, name in STORED.items()}
        weights["psis_log_weight"] = smoothed.values
    else:
        weights = importance_weights(stacked.values)
    coords = {"obs": log_weight.coords["obs"]}
    for name, coord in log_weight.coords.items():
        if name not in ("chain", "draw", "obs") and coord.dims == ("obs",):
            coords[name] = coord
    psis_log_weight = xr.DataArray(
        weights["psis_log_weight"].reshape(-1, log_weight.sizes["chain"], log_weight.sizes["draw"]),
        dims=("obs", "chain", "draw"),
        coords={**coords, "chain": log_weight.coords["chain"], "draw": log_weight.coords["draw"]},
    )
    k = weights["pareto_k"]
    return xr.Dataset(
        {
            "pareto_k": ("obs", k),
            "is_log_likelihood": ("obs", weights["is_log_likelihood"]),
            "psis_log_likelihood": ("obs", weights["psis_log_likelihood"]),
            "importance_ess": ("obs", weights["importance_ess"]),
            "psis_log_weight": psis_log_weight,
        },
        coords=coords,
        attrs={
            "threshold": threshold,
            "share_above_threshold": float(np.mean(k > threshold)),
            "num_samples": samples,
            "is_log_likelihood_mean": float(weights["is_log_likelihood"].mean()),
            "psis_log_likelihood_mean": float(weights["psis_log_likelihood"].mean()),
            "importance_ess_median": float(np.median(weights["importance_ess"])),
        },
    )


def weak_estimate_warnings(share_above: float, mutual_information: float | None, count: int) -> list[str]:
    """One-line warnings where a number is weak: most points with k-hat > 0.7 (their log p(x) is
    unreliable), and I(x; z) at its ceiling log N (the estimator saturates: it says only that the
    N posteriors barely overlap)."""
    messages = []
    if share_above > 0.5:
        messages.append(
            f"warning: {share_above:.1%} of the test points have Pareto k-hat > {PARETO_K_BAD}: their importance-sampled "
            "log p(x) is unreliable (more samples help little; a better guide, e.g. objective 'iwae', does)"
        )
    if mutual_information is not None and count > 1 and mutual_information >= MI_CEILING_SHARE * math.log(count):
        messages.append(
            f"warning: I(x; z) = {mutual_information:.2f} nats sits at its ceiling log N = {math.log(count):.2f} for N = {count} "
            "points: the estimate is saturated (the posteriors barely overlap), not a measure of I(x; z); use more test points"
        )
    return messages


# I(x; z) within 5% of log N is taken as saturated.
MI_CEILING_SHARE = 0.95
