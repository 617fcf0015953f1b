"""The enumerated ELBO: Pyro's ``TraceEnum_ELBO``, with pyrovae's metrics from the same traces."""

from __future__ import annotations

import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_dice_elbo
from pyro.infer.util import Dice
from pyro.ops import packed

from pyrovae.handlers import UNANNEALED_SCALE
from pyrovae.objectives.base import Objective, batch_size, stacked_metrics
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import is_annealed, latent_sites, reported_log_prob


@OBJECTIVES.register("enum_elbo")
class EnumELBO(Objective):
    """Pyro's ``TraceEnum_ELBO``: discrete sites marked ``infer={"enumerate": "parallel"}`` are
    summed out exactly, in the guide (an exact expectation over q(y | x)) or in the model (a site
    the guide leaves out is marginalised: log sum_y p(y) p(x, ... | y)):

        ELBO = E_q(z | x) [ sum_{y in guide} q(y | x, z) ( log p(x, y, z) - log q(y, z | x) ) ],

    estimated with ``particles`` vectorized samples of the sampled sites (DiCE gradients for the
    non-reparameterized ones, as Pyro does). The loss is ``TraceEnum_ELBO``'s, computed by Pyro's
    own functions on Pyro's own traces (tested to equal ``differentiable_loss``).

    Metrics: ``elbo`` (unannealed, masks honoured); ``kl/<site>`` = E_q[log q - log p] for each
    guide site, exact over enumerated values; ``reconstruction`` = elbo + sum of the KLs, which is
    E_q[log p(x | ...)], or for a pair that sums a site out in the model, the marginal
    E_q[log sum_y p(y | ...) p(x | y, ...)] (such a site has no KL of its own). KL annealing
    (``kl_scale``) weights the guide sites' terms; a site summed out in the model is not annealed,
    since it has no KL term (Pyro also needs one scale across the factors it contracts).
    """

    name = "enum_elbo"
    sums_out_enumeration = True

    def __init__(self, particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"enum_elbo needs particles >= 1, got {particles}")
        self.num_particles = particles
        self._pyro_elbo: TraceEnum_ELBO | None = None

    def _elbo(self, nesting: int) -> TraceEnum_ELBO:
        if self._pyro_elbo is None or self._pyro_elbo_nesting != nesting:
            self._pyro_elbo = TraceEnum_ELBO(
                max_plate_nesting=nesting,
                num_particles=self.num_particles,
                vectorize_particles=True,
                strict_enumeration_warning=False,
            )
            self._pyro_elbo_nesting = nesting
        return self._pyro_elbo

    def __call__(self, model, guide, batch):
        info = self.prepare(model, guide, batch)
        values, reported, kls = [], [], []
        # One run with vectorized particles, or one per particle when Pyro's options ask for that.
        for model_trace, guide_trace in self._elbo(info.max_plate_nesting)._get_traces(model, guide, (), batch):
            for name in info.model_enumerated:
                site = model_trace.nodes.get(name)
                if site is not None and is_annealed(site):
                    site["scale"] = site["infer"][UNANNEALED_SCALE]
            value = _compute_dice_elbo(model_trace, guide_trace)
            values.append(value)
            with torch.no_grad():
                annealed = [
                    site
                    for trace in (model_trace, guide_trace)
                    for _, site in latent_sites(trace)
                    if is_annealed(site) and site["name"] not in info.model_enumerated
                ]
                for site in annealed:  # report the unannealed numbers: swap in the reported log-densities
                    site["packed"]["log_prob"] = packed.pack(reported_log_prob(site), site["infer"]["_dim_to_symbol"])
                reported.append(_compute_dice_elbo(model_trace, guide_trace) if annealed else value.detach())
                kls.append(self._kl_by_site(model_trace, guide_trace))
        count = batch_size(batch) * self.num_particles
        loss = sum(values) * (-1.0 / count)
        with torch.no_grad():
            elbo = sum(reported)
            kl = {name: sum(run[name] for run in kls) for name in kls[0]}
            total_kl = sum(kl.values()) if kl else torch.zeros_like(elbo)
        metrics = stacked_metrics(
            ["elbo", "reconstruction", *(f"kl/{name}" for name in kl)],
            [elbo, elbo + total_kl, *kl.values()],
            1.0 / count,
        )
        return loss, metrics

    @staticmethod
    def _kl_by_site(model_trace, guide_trace) -> dict[str, torch.Tensor]:
        """E_q[log q(site) - log p(site)] per guide site, with Pyro's Dice weights (exact over
        enumerated values, one sample over sampled ones)."""
        ordering = {
            name: frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
            for trace in (model_trace, guide_trace)
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
        }
        dice = Dice(guide_trace, ordering)
        kl = {}
        for name, site in latent_sites(model_trace):
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                continue  # summed out in the model: part of the marginal reconstruction
            costs = {ordering[name]: [guide_site["packed"]["log_prob"], packed.neg(site["packed"]["log_prob"])]}
            kl[name] = dice.compute_expectation(costs)
        return kl
