"""Objectives that change the latent terms of an ELBO: free bits and MMD (InfoVAE).

Each wraps an inner ELBO-type objective, named by the option ``objective`` (``elbo`` or
``meanfield_elbo``, with its own options such as ``particles`` passed through). It runs the inner
once (:meth:`~pyrovae.objectives.elbo.ELBO.traced_loss`) and edits that loss through the KL terms
the loss holds,

    inner loss = -(1/B) sum_n [ E_q log p(x_n | z) - sum_sites KL_{n,site} ],

where the KL terms are exactly the inner's (:func:`kl_terms`): the Monte Carlo
log q(z) - log p(z) of the guide's draw per element for ``elbo``, the closed-form KL per element
for ``meanfield_elbo``, each as scored (masks, plate scales and ``kl_scale``'s beta included).
Only objectives whose loss is linear in these terms can be edited so: IWAE's log-mean-exp and
the enumerated ELBO's sums are not, and are refused.

Both wrappers keep the inner's metrics (``elbo`` stays the true, unregularised bound, and is the
selection metric) and add their own. Score-function (non-reparameterized) guide sites are
refused by name: their surrogate's learning signal would still hold the unedited KL.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import scale_and_mask
from torch.distributions import Distribution, Independent

from pyrovae.distributions import DiagonalNormal, StandardNormal
from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.objectives.base import Objective, batch_size
from pyrovae.objectives.elbo import ELBO, MeanFieldELBO
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import DATA_PLATE, PARTICLE_PLATE, PairInfo, latent_sites

# The inner objectives a wrapper can edit: losses linear in their KL terms.
WRAPPABLE = {"elbo": ELBO, "meanfield_elbo": MeanFieldELBO}


def inner_objective(wrapper: str, name: str, particles: int, max_plate_nesting: int | None) -> ELBO:
    if name not in WRAPPABLE:
        raise ConfigError(
            f"objective {wrapper!r} cannot wrap objective = {name!r}: it edits the KL terms of a loss that is linear in "
            f"them (reconstruction minus KL), which only {' and '.join(map(repr, WRAPPABLE))} are "
            "(IWAE's log-mean-exp and enum_elbo's exact sums are not)"
        )
    return WRAPPABLE[name](particles=particles, max_plate_nesting=max_plate_nesting)


# --- the KL terms an inner loss holds ------------------------------------------------------------


def factorised_per_dimension(fn: Distribution) -> Distribution | None:
    """``fn`` as the same distribution with no event dims (batch shape = its batch shape + event
    shape), so its log-density and KL come per latent dimension; None where it does not factorise
    over its event dims (or its factorisation is unknown here). Sees through ``Independent`` /
    ``to_event`` and ``expand``."""
    if not fn.event_shape:
        return fn
    shape = fn.batch_shape + fn.event_shape
    if isinstance(fn, DiagonalNormal):
        return dist.Normal(fn.loc, fn.scale)
    if isinstance(fn, StandardNormal):
        zero = torch.zeros((), dtype=fn.dtype, device=fn.device)
        return dist.Normal(zero, zero + 1.0).expand(shape)
    if isinstance(fn, Independent):
        return factorised_per_dimension(fn.base_dist)
    if isinstance(fn, ExpandedDistribution):
        base = factorised_per_dimension(fn.base_dist)
        return None if base is None else base.expand(shape)
    return None


def _over_event(value, event_dims: int):
    """A site's scale or mask (shaped like its batch) broadcast over its event dims too."""
    if torch.is_tensor(value) and value.dim() > 0 and event_dims:
        return value.reshape(value.shape + (1,) * event_dims)
    return value


def _per_dimension_terms(inner: ELBO, guide_site, model_site, analytic: bool) -> torch.Tensor | None:
    """The site's KL terms summed over everything but its event dims: one entry per dimension,
    by the same estimator the inner used for the whole site. None where that is impossible."""
    q, p = guide_site["fn"], model_site["fn"]
    q_dims, p_dims = factorised_per_dimension(q), factorised_per_dimension(p)
    if q_dims is None or p_dims is None:
        return None
    event_dims, value = len(q.event_shape), guide_site["value"]
    if analytic:
        kl = inner.analytic_kl(q_dims, p_dims)
        if kl is None:  # the inner's closed form has no per-dimension counterpart
            return None
        scale, mask = _over_event(guide_site["scale"], event_dims), _over_event(guide_site["mask"], event_dims)
        terms = scale_and_mask(kl, scale, mask)
    else:
        log_q = scale_and_mask(
            q_dims.log_prob(value), _over_event(guide_site["scale"], event_dims), _over_event(guide_site["mask"], event_dims)
        )
        log_p = scale_and_mask(
            p_dims.log_prob(value), _over_event(model_site["scale"], event_dims), _over_event(model_site["mask"], event_dims)
        )
        terms = log_q - log_p
    terms = torch.broadcast_to(terms, torch.broadcast_shapes(terms.shape, value.shape))  # trailing dims: the event
    return terms.reshape(-1, math.prod(q.event_shape)).sum(0)


def kl_terms(
    inner: ELBO,
    model_trace,
    guide_trace,
    per_dimension: bool = False,
    on_fallback: Callable[[str, Distribution], None] | None = None,
) -> dict[str, torch.Tensor]:
    """For each latent site the guide samples, the sum over the batch, the particles and every
    plate of the KL terms the inner loss holds for it (so 1/(B K) times the total of these is the
    KL part of the inner loss, B datapoints and K particles):

    - ``elbo``: log q(z) - log p(z) of the guide's draw, from the traced log-densities;
    - ``meanfield_elbo``: KL(q || p) in closed form where it has one (scaled and masked by the
      guide site, as the inner does), else the same Monte Carlo term.

    Each value is a vector: one entry for the site, or with ``per_dimension`` one per element of
    its event shape (row-major), through the distributions factorised per dimension
    (:func:`factorised_per_dimension`). Where a site does not factorise so, it keeps one entry and
    ``on_fallback(name, fn)`` is called."""
    terms = {}
    for name, model_site in latent_sites(model_trace):
        guide_site = guide_trace.nodes.get(name)
        if guide_site is None:
            continue
        kl = inner.analytic_kl(guide_site["fn"], model_site["fn"])
        if per_dimension and guide_site["fn"].event_shape:
            split = _per_dimension_terms(inner, guide_site, model_site, analytic=kl is not None)
            if split is not None:
                terms[name] = split
                continue
            if on_fallback is not None:
                on_fallback(name, guide_site["fn"])
        if kl is not None:
            total = scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
        else:  # the very sums the inner's loss holds
            total = guide_site["log_prob_sum"] - model_site["log_prob_sum"]
        terms[name] = total.reshape(1)
    return terms


# --- the wrappers ----------------------------------------------------------------------------------


class KLRegularized(Objective):
    """Base of the wrappers: builds the inner objective, checks pairs once (the inner's checks,
    then the wrapper's), and counts datapoints as the inner does."""

    name = "kl_regularized"

    def __init__(self, objective: str, particles: int, max_plate_nesting: int | None):
        super().__init__(max_plate_nesting)
        self.inner = inner_objective(self.name, objective, particles, max_plate_nesting)
        self.particles = self.inner.particles

    def prepare(self, model, guide, batch: Mapping) -> PairInfo:
        info = self.inner.prepare(model, guide, batch)
        if self._pair is None or self._pair[0] is not model or self._pair[1] is not guide:
            self.check_pair(info)
            self._pair, self._info = (model, guide), info
            self.max_plate_nesting = info.max_plate_nesting
        return info

    def check_pair(self, info: PairInfo) -> None:
        if info.score_function_sites:
            raise UnsupportedPairError(
                f"objective {self.name!r} needs reparameterized guide sites, but {info.score_function_sites[0]!r} of "
                f"{info.model_name} has no rsample: its score-function learning signal would still hold the unedited KL; "
                "use 'elbo' or 'iwae' (VIMCO) without the wrapper"
            )

    def count(self, batch: Mapping) -> int:
        return batch_size(batch) * (self.inner.particles or 1)


@OBJECTIVES.register("free_bits")
class FreeBits(KLRegularized):
    """Free bits (Kingma et al. 2016, the IAF paper), around ``elbo`` or ``meanfield_elbo``:

        loss = -(1/B) sum_n E_q log p(x_n | z) + sum_groups max(lambda, KL_g),
        KL_g = (1/B) sum_n KL_{n,g},

    with ``lambda = threshold`` nats per group and the groups the latent dimensions
    (``per = "dimension"``: every element of every site's event shape) or the latent sites
    (``per = "site"``). With K particles, KL_g also averages over them. Computed as

        loss = inner loss - (1/B) sum_{n,g} KL_{n,g} + sum_g max(lambda, KL_g)
             = inner loss + sum_g max(0, lambda - KL_g),

    from the KL terms the inner loss holds (:func:`kl_terms`, split per dimension through the
    ``Independent``/``to_event`` base distribution), so while KL_g < lambda the gradient of
    group g's KL is exactly zero, above it the inner's gradient is unchanged, and a threshold below
    every group's KL gives exactly the inner's loss. A site whose distributions do not factorise
    per dimension counts as one group (said once per site).

    Under ``kl_scale(beta)`` the KL terms carry beta, as in the inner loss, so a group is compared
    as beta KL_g: the loss is E[-log p(x | z)] + sum_g max(lambda, beta KL_g). During a warm-up a
    group is free while KL_g < lambda / beta, and at beta = 0 every group is (the KL gives no
    gradient, as without free bits).

    Metrics: the inner's (``elbo`` is the unregularised bound), ``free_bits/groups`` and
    ``free_bits/active_groups`` (groups whose KL_g, as compared, is above lambda).
    """

    name = "free_bits"

    def __init__(
        self,
        threshold: float,
        per: str = "dimension",
        objective: str = "elbo",
        particles: int = 1,
        max_plate_nesting: int | None = None,
    ):
        if not threshold > 0:
            raise ConfigError(f"free_bits needs threshold > 0 (nats per group), got {threshold!r}")
        if per not in ("dimension", "site"):
            raise ConfigError(f"free_bits per = {per!r} is not allowed: use 'dimension' or 'site'")
        super().__init__(objective, particles, max_plate_nesting)
        self.threshold = float(threshold)
        self.per = per
        self._fallbacks_said: set[str] = set()

    def _say_fallback(self, name: str, fn: Distribution) -> None:
        if name not in self._fallbacks_said:
            self._fallbacks_said.add(name)
            warnings.warn(
                f"free_bits: site {name!r} ({type(fn).__name__}) does not factorise per dimension here, "
                "so its KL counts as one group (per = 'site' for it)",
                stacklevel=3,
            )

    def __call__(self, model, guide, batch):
        self.prepare(model, guide, batch)
        loss, metrics, model_trace, guide_trace = self.inner.traced_loss(model, guide, batch)
        terms = kl_terms(self.inner, model_trace, guide_trace, self.per == "dimension", self._say_fallback)
        if terms:
            kl = torch.cat(list(terms.values())) * (1.0 / self.count(batch))
            loss = loss + torch.relu(self.threshold - kl).sum()  # = sum_g max(lambda, KL_g) - KL_g
            with torch.no_grad():
                active = (kl > self.threshold).sum().to(loss.dtype)
            groups = kl.numel()
        else:  # no latent sites: nothing to hold up
            active, groups = torch.zeros((), dtype=loss.dtype, device=loss.device), 0
        metrics["free_bits/groups"] = torch.full((), float(groups), dtype=loss.dtype, device=loss.device)
        metrics["free_bits/active_groups"] = active
        return loss, metrics


# --- MMD -------------------------------------------------------------------------------------------

MMD_KERNELS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    # k(a, b) = C / (C + |a - b|^2): heavy tails keep a gradient for codes far from the prior.
    "imq": lambda squared_distance, bandwidth: bandwidth / (bandwidth + squared_distance),
    # k(a, b) = exp(-|a - b|^2 / C)
    "gaussian": lambda squared_distance, bandwidth: torch.exp(-squared_distance / bandwidth),
}


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 for every pair of rows, batched over leading dims (one matmul, no (N, M, D) tensor)."""
    squared = a.pow(2).sum(-1).unsqueeze(-1) + b.pow(2).sum(-1).unsqueeze(-2) - 2.0 * a @ b.transpose(-1, -2)
    return squared.clamp(min=0.0)  # rounding can dip below zero for near-equal rows


def squared_mmd(x: torch.Tensor, y: torch.Tensor, kernel: str = "imq", bandwidth: float | None = None) -> torch.Tensor:
    """The unbiased U-statistic of MMD^2 between samples x (..., N, D) and y (..., M, D):

        MMD^2_u = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(N M) sum_{i, j} k(x_i, y_j),

    with the kernel ``imq`` k = C / (C + |a - b|^2) or ``gaussian`` k = exp(-|a - b|^2 / C) and
    C = ``bandwidth``, by default 2 D (the usual C = 2 D sigma^2 with sigma = 1). Its expectation
    is MMD^2, so it is near zero, and can be negative, for samples of one distribution. Batched over
    leading dims; needs N, M >= 2."""
    if x.shape[-2] < 2 or y.shape[-2] < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 draws on each side, got {x.shape[-2]} and {y.shape[-2]}")
    measure = MMD_KERNELS[kernel]
    scale = float(2 * x.shape[-1]) if bandwidth is None else float(bandwidth)

    def within(samples):
        n = samples.shape[-2]
        same = torch.eye(n, dtype=torch.bool, device=samples.device)
        values = measure(_squared_distances(samples, samples), scale).masked_fill(same, 0.0)
        return values.sum((-1, -2)) / (n * (n - 1))

    between = measure(_squared_distances(x, y), scale).mean((-1, -2))
    return within(x) + within(y) - 2.0 * between


def _codes(site, value: torch.Tensor, with_particles: bool) -> torch.Tensor:
    """A site's values as (K, B, features): particles, then datapoints, then everything else."""
    frames = {frame.name: frame.dim for frame in site["cond_indep_stack"] if frame.vectorized}
    if DATA_PLATE not in frames:
        raise UnsupportedPairError(
            f"objective 'mmd': latent site {site['name']!r} is outside the 'data' plate, so it has no code per "
            "datapoint to compare with the prior"
        )
    batch_rank = value.dim() - len(site["fn"].event_shape)
    axes = ([batch_rank + frames[PARTICLE_PLATE]] if with_particles else []) + [batch_rank + frames[DATA_PLATE]]
    moved = value.movedim(axes, list(range(len(axes))))
    codes = moved.reshape(moved.shape[: len(axes)] + (-1,))
    return codes if with_particles else codes.unsqueeze(0)


@OBJECTIVES.register("mmd")
class MMD(KLRegularized):
    """InfoVAE (Zhao et al. 2017) around ``elbo`` or ``meanfield_elbo``, per datapoint:

        loss = -E_q log p(x | z) + (1 - alpha) KL(q(z | x) || p(z)) + (alpha + lambda - 1) MMD^2(q(z), p(z)),

    with ``alpha`` and ``lambda = weight``. The (1 - alpha) KL is the inner loss minus
    alpha (1/B) sum of the KL terms it holds (:func:`kl_terms`, shared with free bits). MMD^2 is
    :func:`squared_mmd` (kernel ``imq`` or ``gaussian``, scale ``bandwidth``, default 2 x the latent
    dims) between the guide's B draws z ~ q(z | x_n) of the batch (every latent site flattened and
    concatenated per datapoint; gradients flow through them) and B draws from the prior (each
    model site's distribution in the trace, ``.sample()``: no gradient through them). For a
    hierarchical prior those are draws of each site given the guide's draws of its parents. With K
    particles it averages the K per-particle estimates. A batch of one datapoint has no unbiased
    estimate: the MMD term is then 0.

    The defaults (alpha = 0, weight = 1000: the MMD coefficient is 999) suit data whose
    reconstruction is tens to hundreds of nats per datapoint, next to MMD^2 values of about
    1e-3 to 1e-1. alpha = 0, weight = 1 is the inner objective exactly.

    Refused: alpha > 1 (a negative KL weight rewards a larger KL) and alpha + weight - 1 < 0 (a
    negative MMD coefficient rewards a larger MMD, as a published library's defaults, alpha = 0
    and lambda = 1e-3, do).

    Under ``kl_scale(beta)`` the KL terms carry beta, as in the inner loss, and the MMD is not
    annealed: loss = E[-log p(x | z)] + (1 - alpha) beta KL + (alpha + weight - 1) MMD^2.

    Metrics: the inner's (``elbo`` is the unregularised bound) and ``mmd``, the MMD^2 estimate.
    """

    name = "mmd"

    def __init__(
        self,
        alpha: float = 0.0,
        weight: float = 1000.0,
        kernel: str = "imq",
        bandwidth: float | None = None,
        objective: str = "elbo",
        particles: int = 1,
        max_plate_nesting: int | None = None,
    ):
        if alpha > 1:
            raise ConfigError(
                f"mmd alpha = {alpha!r} is not allowed: alpha > 1 gives the KL a negative weight 1 - alpha, which rewards a larger KL"
            )
        if alpha + weight - 1 < 0:
            raise ConfigError(
                f"mmd alpha = {alpha!r}, weight = {weight!r} is not allowed: the MMD coefficient alpha + weight - 1 = "
                f"{alpha + weight - 1:.6g} is negative, which rewards a larger MMD; use weight >= {1 - alpha:.6g}"
            )
        if kernel not in MMD_KERNELS:
            raise ConfigError(f"mmd kernel = {kernel!r} is not allowed: use one of {', '.join(map(repr, MMD_KERNELS))}")
        if bandwidth is not None and not bandwidth > 0:
            raise ConfigError(
                f"mmd bandwidth = {bandwidth!r} is not allowed: it must be > 0 (or left out for 2 x latent dims)"
            )
        super().__init__(objective, particles, max_plate_nesting)
        self.alpha, self.weight = float(alpha), float(weight)
        self.kernel, self.bandwidth = kernel, bandwidth
        self.coefficient = self.alpha + self.weight - 1.0

    def code_draws(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(guide draws, prior draws), each (K, B, latent features); None without latent sites."""
        posterior, prior = [], []
        with_particles = self.inner.particles is not None
        for name, model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                continue
            posterior.append(_codes(guide_site, guide_site["value"], with_particles))
            with torch.no_grad():
                prior.append(_codes(model_site, model_site["fn"].sample(), with_particles))
        if not posterior:
            return None
        return torch.cat(posterior, -1), torch.cat(prior, -1)

    def __call__(self, model, guide, batch):
        self.prepare(model, guide, batch)
        loss, metrics, model_trace, guide_trace = self.inner.traced_loss(model, guide, batch)
        if self.alpha != 0.0:
            terms = kl_terms(self.inner, model_trace, guide_trace)
            if terms:
                loss = loss - (self.alpha / self.count(batch)) * torch.cat(list(terms.values())).sum()
        draws = self.code_draws(model_trace, guide_trace)
        if draws is None or draws[0].shape[-2] < 2:  # no latents, or one datapoint: no MMD term
            estimate = torch.zeros((), dtype=loss.dtype, device=loss.device)
        elif self.coefficient != 0.0:
            estimate = squared_mmd(*draws, self.kernel, self.bandwidth).mean()
            loss = loss + self.coefficient * estimate
        else:  # switched off: reported only
            with torch.no_grad():
                estimate = squared_mmd(*draws, self.kernel, self.bandwidth).mean()
        metrics["mmd"] = estimate.detach()
        return loss, metrics
