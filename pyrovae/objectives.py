"""Objectives: ``objective(model, guide, batch) -> (loss, metrics)``.

``loss`` is a differentiable scalar: the negative objective per datapoint of the
batch. ``metrics`` maps names to detached 0-dim tensors (``float(v)`` reads one),
per datapoint, read off the same traces as the loss (no second forward pass):

- ``elbo``: E_q[log p(x, z) - log q(z | x)], never KL-annealed, so it is the true bound;
- ``reconstruction``: E_q[log p(x | z)];
- ``kl/<site>``: KL(q(z_site | .) || p(z_site | .)), analytic where the objective uses
  it, else the Monte Carlo estimate log q - log p;
- IWAE adds ``iwae``, the K-sample bound.

They are kept as tensors so the fit loop can accumulate them without a
host-device synchronisation per step.

KL annealing is not an argument: wrap the call in :class:`pyrovae.handlers.kl_scale`,
which scales the latent sites of both traces.
"""

from __future__ import annotations

from typing import Mapping

import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r

from pyrovae.registry import OBJECTIVES
from pyrovae.traces import (
    guess_max_plate_nesting,
    latent_sites,
    log_mean_exp,
    log_weight_terms,
    observed_sites,
    trace_pair,
)

Metrics = dict[str, torch.Tensor]


class Objective:
    """Base: caches the plate depth of the pair it is used with."""

    particles: int | None = None
    # The validation metric the fit loop selects best.pt and stops early by (higher is better).
    selection_metric: str = "elbo"

    def __init__(self, max_plate_nesting: int | None = None):
        self.max_plate_nesting = max_plate_nesting

    def _plate_nesting(self, model, guide, batch) -> int:
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, batch)
        return self.max_plate_nesting

    def _trace(self, model, guide, batch, before_model=None):
        nesting = self._plate_nesting(model, guide, batch)
        return trace_pair(
            model, guide, batch, max_plate_nesting=nesting, particles=self.particles, before_model=before_model
        )

    def __call__(self, model, guide, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["x"].shape[0])


def _unscaled_sum(site) -> torch.Tensor:
    # Unscaled sites share their tensor with the scaled one: reuse its sum instead of summing again.
    if site["unscaled_log_prob"] is site["log_prob"]:
        return site["log_prob_sum"]
    return site["unscaled_log_prob"].sum()


def _summed_metrics(model_trace, guide_trace, kl_by_site: dict[str, torch.Tensor], count: int) -> Metrics:
    """Per-datapoint metrics from summed (over batch and particles) unscaled terms."""
    with torch.no_grad():
        observed = [_unscaled_sum(site) for _, site in observed_sites(model_trace)]
        reconstruction = observed[0] if len(observed) == 1 else torch.stack(observed).sum()
        kls = list(kl_by_site.values())
        elbo = reconstruction - (kls[0] if len(kls) == 1 else torch.stack(kls).sum())
        # One stack, scale and unbind instead of an op per metric: these run every step.
        values = (torch.stack([reconstruction, elbo, *kls]) * (1.0 / count)).unbind()
    metrics = {"reconstruction": values[0], "elbo": values[1]}
    metrics.update({f"kl/{name}": value for name, value in zip(kl_by_site, values[2:])})
    return metrics


def _any_scaled(*traces) -> bool:
    return any(
        site["type"] == "sample" and "log_prob" in site and site["log_prob"] is not site["unscaled_log_prob"]
        for trace in traces
        for site in trace.nodes.values()
    )


def _monte_carlo_kl(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    kl = {}
    for name, site in latent_sites(model_trace):
        guide_term = _unscaled_sum(guide_trace.nodes[name]) if name in guide_trace.nodes else 0.0
        kl[name] = guide_term - _unscaled_sum(site)
    return kl


@OBJECTIVES.register("elbo")
class ELBO(Objective):
    """Pyro's ``Trace_ELBO``:  ELBO = E_q(z|x)[log p(x, z) - log q(z | x)], estimated with
    ``particles`` vectorized samples. The surrogate is Trace_ELBO's: pathwise gradients for
    reparameterized sites, and Pyro's Rao-Blackwellized score-function terms
    (``_compute_log_r``) for the rest. Unlike ``Trace_ELBO.differentiable_loss`` it makes no
    ``.item()`` call, so it never forces a host-device sync. ``tests/test_objectives.py`` checks
    it equals ``Trace_ELBO().differentiable_loss`` on the same draws."""

    def __init__(self, particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"elbo needs particles >= 1, got {particles}")
        self.particles = particles if particles > 1 else None

    def __call__(self, model, guide, batch):
        model_trace, guide_trace = self._trace(model, guide, batch)
        model_sites = latent_sites(model_trace) + observed_sites(model_trace)
        surrogate = torch.stack([site["log_prob_sum"] for _, site in model_sites]).sum()
        log_r = None
        for _, site in latent_sites(guide_trace):
            log_prob, score_function_term, entropy_term = site["score_parts"]
            if entropy_term is log_prob:  # reparameterized: the entropy term is log q itself
                surrogate = surrogate - site["log_prob_sum"]
            elif not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                surrogate = surrogate + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        if log_r is not None:
            # Score-function terms change the surrogate's value, not just its gradient: report
            # the (annealed) ELBO itself, as Trace_ELBO does, with the surrogate's gradient.
            value = sum(site["log_prob_sum"] for _, site in latent_sites(model_trace) + observed_sites(model_trace))
            value = value - sum(site["log_prob_sum"] for _, site in latent_sites(guide_trace))
            surrogate = surrogate + (value - surrogate).detach()
        count = _batch_size(batch) * (self.particles or 1)
        metrics = _summed_metrics(model_trace, guide_trace, _monte_carlo_kl(model_trace, guide_trace), count)
        return surrogate * (-1.0 / count), metrics


@OBJECTIVES.register("meanfield_elbo")
class MeanFieldELBO(ELBO):
    """Pyro's ``TraceMeanField_ELBO``:  ELBO = E_q[log p(x | z)] - sum_sites KL(q(z_s) || p(z_s)),
    with each KL in closed form where ``torch.distributions.kl_divergence`` knows the pair
    (else the Monte Carlo term log p(z_s) - log q(z_s)). The KL is scaled by the guide site's
    scale, which is where ``kl_scale`` puts beta. Assumes a mean-field guide whose sites do not
    depend on one another, and reparameterized sites."""

    def __call__(self, model, guide, batch):
        model_trace, guide_trace = self._trace(model, guide, batch)
        objective = sum(site["log_prob_sum"] for _, site in observed_sites(model_trace))
        unscaled_kl = {}
        for name, model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes[name]
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                kl = None
            if kl is None:
                objective = objective + model_site["log_prob_sum"] - guide_site["log_prob_sum"]
                unscaled_kl[name] = guide_site["unscaled_log_prob"].sum() - model_site["unscaled_log_prob"].sum()
            else:
                kl = kl.expand(guide_site["fn"].batch_shape)
                objective = objective - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
                unscaled_kl[name] = scale_and_mask(kl, mask=guide_site["mask"]).sum()
        count = _batch_size(batch) * (self.particles or 1)
        return objective * (-1.0 / count), _summed_metrics(model_trace, guide_trace, unscaled_kl, count)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``holder["weights"]``, which the
    objective fills in after the forward pass (the weights depend on the model run)."""

    @staticmethod
    def forward(ctx, value, holder, shape):
        ctx.holder, ctx.shape = holder, shape
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.holder["weights"].reshape(ctx.shape), None, None


def detach_parameters(fn: dist.Distribution) -> dist.Distribution:
    """The same distribution with its parameters cut from the graph (values still carry gradients)."""
    if hasattr(fn, "detached"):
        return fn.detached()
    if isinstance(fn, dist.Independent):
        return dist.Independent(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return detach_parameters(fn.base_dist).expand(fn.batch_shape)
    params = {
        key: value.detach()
        for key, value in vars(fn).items()
        if key in fn.arg_constraints and torch.is_tensor(value)
    }
    if "logits" in params:
        params.pop("probs", None)
    try:
        return type(fn)(**params, validate_args=False)
    except TypeError as error:
        raise NotImplementedError(
            f"DReG cannot detach the parameters of {type(fn).__name__} ({error}); use dreg = false"
        ) from None


@OBJECTIVES.register("iwae")
class IWAE(Objective):
    """Importance weighted bound (Burda et al. 2016), per datapoint x:

        L_K(x) = log (1/K) sum_k w_k,   w_k = p(x, z_k) / q(z_k | x),   z_1..z_K ~ q(z | x),

    with the K particles vectorized by ``pyro.plate("particles", K)`` and the log-mean-exp
    taken over particles for each datapoint separately. ``dreg=True`` gives the doubly
    reparameterized guide gradient of Tucker et al. 2018,

        grad_phi = sum_k  wtilde_k^2 * d log w_k / d z_k * d z_k / d phi,   wtilde = softmax_k(log w),

    by evaluating log q with detached parameters and scaling the gradient that reaches each
    z_k (where the model and log q read it) by wtilde_k; model gradients are the IWAE ones.
    For guides whose site parameters depend on upstream latents, that dependence is treated
    as stop-gradient in log q.
    """

    selection_metric = "iwae"

    def __init__(self, particles: int = 5, dreg: bool = False, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"iwae needs particles >= 1, got {particles}")
        self.particles = particles
        self.dreg = dreg

    def _dreg_hook(self, holder):
        nesting = self.max_plate_nesting

        def prepare(guide_trace):
            for _, site in latent_sites(guide_trace):
                if not site["fn"].has_rsample:
                    raise NotImplementedError(f"DReG needs reparameterized guide sites; {site['name']!r} is not")
                data_dim = [f.dim for f in site["cond_indep_stack"] if f.name == "data"][0]
                shape = [1] * (nesting + 1) + [1] * len(site["fn"].event_shape)
                shape[0] = self.particles
                shape[nesting + 1 + data_dim] = -1
                site["fn"] = detach_parameters(site["fn"])
                site["value"] = _ScaleGradient.apply(site["value"], holder, tuple(shape))

        return prepare

    def __call__(self, model, guide, batch):
        self._plate_nesting(model, guide, batch)
        holder: dict[str, torch.Tensor] = {}
        use_dreg = self.dreg and torch.is_grad_enabled()
        model_trace, guide_trace = self._trace(
            model, guide, batch, before_model=self._dreg_hook(holder) if use_dreg else None
        )
        nesting = self.max_plate_nesting
        reconstruction, latent_terms = log_weight_terms(model_trace, guide_trace, nesting, True, scaled=True)
        log_weights = reconstruction + sum(latent_terms.values())  # (K, B)
        bound = log_mean_exp(log_weights, 0)
        if use_dreg:
            holder["weights"] = torch.softmax(log_weights.detach(), 0)
        with torch.no_grad():
            if _any_scaled(model_trace, guide_trace):  # annealing: report the unannealed bound
                plain_reconstruction, plain_terms = log_weight_terms(model_trace, guide_trace, nesting, True, scaled=False)
                plain_log_weights = plain_reconstruction + sum(plain_terms.values())
                plain_bound = log_mean_exp(plain_log_weights, 0)
            else:  # nothing scaled: the terms above are already the plain ones
                plain_reconstruction, plain_terms, plain_log_weights = reconstruction, latent_terms, log_weights
                plain_bound = bound
            # One stack and mean instead of an op per metric: these run every step.
            per_datapoint_terms = [plain_log_weights, plain_reconstruction, *(-term for term in plain_terms.values())]
            values = torch.stack(per_datapoint_terms).mean((1, 2)).unbind()
            metrics = {"iwae": plain_bound.detach().mean(), "elbo": values[0], "reconstruction": values[1]}
            metrics.update({f"kl/{name}": value for name, value in zip(plain_terms, values[2:])})
        return -bound.mean(), metrics


def build_objective(name: str, **options) -> Objective:
    return OBJECTIVES.resolve(name, "objective.name")(**options)
