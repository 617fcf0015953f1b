"""Single-sample-family ELBOs: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` semantics.

Each objective's :meth:`~ELBO.traced_loss` returns the loss and metrics together with the two
traces they were read from, so a wrapper (``free_bits``, ``mmd`` in :mod:`.regularized`) can
reuse the very KL terms the loss holds instead of running the pair a second time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r
from pyro.poutine import Trace
from torch.distributions import Distribution, kl_divergence

from pyrovae.errors import UnsupportedPairError
from pyrovae.objectives.base import Metrics, Objective, batch_size, stacked_metrics
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import PairInfo, latent_sites, observed_sites, reported_log_prob_sum


class TracedLoss(NamedTuple):
    """An objective's loss and metrics, with the traces both were read from."""

    loss: torch.Tensor
    metrics: Metrics
    model_trace: Trace
    guide_trace: Trace


def _total(terms: list[torch.Tensor]) -> torch.Tensor:
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def summed_metrics(model_trace, kl_by_site: dict[str, torch.Tensor], count: int) -> Metrics:
    """Per-datapoint metrics from summed (over batch and particles) reported terms. A model
    without latent sites has no KL terms: its elbo is its reconstruction, log p(x)."""
    with torch.no_grad():
        observed = [reported_log_prob_sum(site) for _, site in observed_sites(model_trace)]
        reconstruction = _total(observed)
        kls = list(kl_by_site.values())
        elbo = reconstruction - _total(kls) if kls else reconstruction
    return stacked_metrics(
        ["reconstruction", "elbo", *(f"kl/{name}" for name in kl_by_site)], [reconstruction, elbo, *kls], 1.0 / count
    )


def monte_carlo_kl(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """KL per site as the one-sample estimate log q(z) - log p(z), from the reported terms."""
    kl = {}
    for name, site in latent_sites(model_trace):
        guide_term = reported_log_prob_sum(guide_trace.nodes[name]) if name in guide_trace.nodes else 0.0
        kl[name] = guide_term - reported_log_prob_sum(site)
    return kl


@OBJECTIVES.register("elbo")
class ELBO(Objective):
    """Pyro's ``Trace_ELBO``:  ELBO = E_q(z|x)[log p(x, z) - log q(z | x)], estimated with
    ``particles`` vectorized samples. The surrogate is Trace_ELBO's: pathwise gradients for
    reparameterized sites, and Pyro's Rao-Blackwellized score-function terms
    (``_compute_log_r``) for the rest. Unlike ``Trace_ELBO.differentiable_loss`` it makes no
    ``.item()`` call, so it never forces a host-device sync. ``tests/test_objectives.py`` checks
    it equals ``Trace_ELBO().differentiable_loss`` on the same draws.

    A model without latent sites (a deterministic baseline with the ``no_latents`` guide) has
    loss -(1/B) sum_n log p(x_n), and metrics elbo = reconstruction and no ``kl/`` keys."""

    name = "elbo"

    def __init__(self, particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"elbo needs particles >= 1, got {particles}")
        self.particles = particles if particles > 1 else None

    def __call__(self, model, guide, batch):
        loss, metrics, _, _ = self.traced_loss(model, guide, batch)
        return loss, metrics

    def analytic_kl(self, guide_fn: Distribution, model_fn: Distribution) -> torch.Tensor | None:
        """The closed-form KL(q || p) per batch element, unscaled, that this loss holds for a site
        with these distributions; None where it holds the Monte Carlo log q(z) - log p(z) of the
        draw instead, which for ``elbo`` is always (read by the wrappers of :mod:`.regularized`)."""
        return None

    def traced_loss(self, model, guide, batch) -> TracedLoss:
        model_trace, guide_trace = self._trace(model, guide, batch)
        model_sites = latent_sites(model_trace) + observed_sites(model_trace)
        surrogate = _total([site["log_prob_sum"] for _, site in model_sites])
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
            value = sum(site["log_prob_sum"] for _, site in model_sites)
            value = value - sum(site["log_prob_sum"] for _, site in latent_sites(guide_trace))
            surrogate = surrogate + (value - surrogate).detach()
        count = batch_size(batch) * (self.particles or 1)
        metrics = summed_metrics(model_trace, monte_carlo_kl(model_trace, guide_trace), count)
        return TracedLoss(surrogate * (-1.0 / count), metrics, model_trace, guide_trace)


@OBJECTIVES.register("meanfield_elbo")
class MeanFieldELBO(ELBO):
    """Pyro's ``TraceMeanField_ELBO``:  ELBO = E_q[log p(x | z)] - sum_sites KL(q(z_s) || p(z_s)),
    with each KL in closed form where ``torch.distributions.kl_divergence`` knows the pair
    (else the Monte Carlo term log p(z_s) - log q(z_s)). The KL is scaled by the guide site's
    scale, which is where ``kl_scale`` puts beta. Assumes a mean-field guide whose sites do not
    depend on one another, and reparameterized sites: a score-function site is refused, since
    its reconstruction gradient would be dropped. Without latent sites it is ``elbo``'s
    -(1/B) sum_n log p(x_n)."""

    name = "meanfield_elbo"

    def check_pair(self, info: PairInfo) -> None:
        super().check_pair(info)
        if info.score_function_sites:
            raise UnsupportedPairError(
                f"objective 'meanfield_elbo' needs reparameterized guide sites, but {info.score_function_sites[0]!r} "
                f"of {info.model_name} has no rsample (its reconstruction gradient would be dropped); "
                "use 'elbo' (score-function terms) or 'iwae' (VIMCO)"
            )

    def analytic_kl(self, guide_fn: Distribution, model_fn: Distribution) -> torch.Tensor | None:
        """KL(q || p) per batch element of q, unscaled, where ``torch.distributions.kl_divergence``
        knows the pair; None where it does not (the loss then holds log q(z) - log p(z))."""
        try:
            kl = kl_divergence(guide_fn, model_fn)
        except NotImplementedError:
            return None
        return kl.expand(guide_fn.batch_shape)

    def traced_loss(self, model, guide, batch) -> TracedLoss:
        model_trace, guide_trace = self._trace(model, guide, batch)
        objective = sum(site["log_prob_sum"] for _, site in observed_sites(model_trace))
        reported_kl = {}
        for name, model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes[name]
            kl = self.analytic_kl(guide_site["fn"], model_site["fn"])
            if kl is None:
                objective = objective + model_site["log_prob_sum"] - guide_site["log_prob_sum"]
                reported_kl[name] = reported_log_prob_sum(guide_site) - reported_log_prob_sum(model_site)
            else:
                objective = objective - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
                unannealed = guide_site["infer"].get("unannealed_scale", guide_site["scale"])
                reported_kl[name] = scale_and_mask(kl, unannealed, guide_site["mask"]).sum()
        count = batch_size(batch) * (self.particles or 1)
        loss = objective * (-1.0 / count)
        return TracedLoss(loss, summed_metrics(model_trace, reported_kl, count), model_trace, guide_trace)
