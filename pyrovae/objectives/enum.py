"""The enumerated ELBO: Pyro's ``TraceEnum_ELBO``, with pyrovae's metrics from the same traces."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors, _find_ordinal, _get_common_scale
from pyro.infer.util import Dice, _fulldot
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing, SampleRing

from pyrovae.errors import UnsupportedPairError
from pyrovae.handlers import UNANNEALED_SCALE
from pyrovae.objectives.base import Objective, batch_size, stacked_metrics
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import enumeration_mass, is_annealed, is_auxiliary_term, preserved_rng, reported_log_prob


class SyncFreeDice(Dice):
    """Pyro's :class:`~pyro.infer.util.Dice`, without its host-device synchronisation.

    ``Dice.compute_expectation`` asks ``if not (prob > 0).all()`` for every cost ordinal (a
    device-to-host read each time) and then drops the zero-probability entries with
    ``masked_select``. Zeroing the costs of those entries instead gives the same value and the
    same gradient with no read. :meth:`expected_costs` also returns each tagged cost's expectation
    separately, so the metrics share one marginal computation.
    """

    def compute_expectation(self, costs):
        tagged = OrderedDict((ordinal, [(None, cost) for cost in terms]) for ordinal, terms in costs.items())
        total = 0.0
        for _, value in self.expected_costs(tagged):
            total = total + value
        return total

    def expected_costs(self, costs) -> list:
        """``costs``: ordinal -> [(tag, packed cost)]; returns [(tag, E[cost])] (same algorithm as Pyro's)."""
        results = []
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
                # Query the marginal probability of each cost's dims.
                queries = {frozenset(cost._pyro_dims): None for _, cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for _, cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {key: query._pyro_backward_result.exp() for key, query in queries.items()}
                for tag, cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    cost = torch.where(prob > 0, cost, torch.zeros((), dtype=cost.dtype, device=cost.device))
                    results.append((tag, scale * _fulldot(prob, cost)))
        return results


def dice_elbo(model_trace, guide_trace):
    """Pyro's ``traceenum_elbo._compute_dice_elbo`` (the differentiable TraceEnum_ELBO of one
    run), with :class:`SyncFreeDice` in place of ``Dice``."""
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, terms in log_factors.items():
            marginal_costs.setdefault(t, []).extend(packed.scale_and_mask(term, scale=scale) for term in terms)
    costs = marginal_costs
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    return SyncFreeDice(guide_trace, ordering).compute_expectation(costs)


def _sample_sites(trace):
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample"]


def model_sum(model_trace, guide_trace):
    """The sites the model sums out (latent, absent from the guide, enumerated) and the
    enumeration dims they leave to sum over, as in Pyro's ``_compute_model_factors``."""
    ordering = {
        name: _find_ordinal(trace, site) for trace in (model_trace, guide_trace) for name, site in _sample_sites(trace)
    }
    non_enum_dims = set().union(*ordering.values())
    enumerated, enum_dims = {}, set()
    for name, site in _sample_sites(model_trace):
        if name in guide_trace.nodes:
            non_enum_dims.update(guide_trace.nodes[name]["packed"]["log_prob"]._pyro_dims)
        elif site["infer"].get("_enumerate_dim") is not None:
            enumerated[name] = site
            enum_dims.update(site["packed"]["log_prob"]._pyro_dims)
    return ordering, enumerated, enum_dims - non_enum_dims


def _unannealed_scale(site):
    return site["infer"].get(UNANNEALED_SCALE, site["scale"])


def _packed(site, value):
    return packed.pack(value, site["infer"]["_dim_to_symbol"])


def _masked_density(site):
    """The site's unscaled log-density with every mask applied (the scale goes outside the sum)."""
    return scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])


def _groups(factors: dict, enum_dims: set) -> list[list[str]]:
    """Site names whose factors share enumeration dims, transitively (the independent sums)."""
    groups: list[tuple[set, list[str]]] = []
    for name, (_, factor) in factors.items():
        dims, names = set(factor._pyro_dims) & enum_dims, [name]
        for group in [g for g in groups if g[0] & dims]:
            groups.remove(group)
            dims |= group[0]
            names = group[1] + names
        groups.append((dims, names))
    return [names for _, names in groups]


def _contract(factors: dict, names: list[str], sum_dims: set, scale):
    tree = OrderedDict()
    for name in names:
        ordinal, factor = factors[name]
        tree.setdefault(ordinal, []).append(factor)
    contracted = contract_tensor_tree(tree, sum_dims)
    return [(ordinal, packed.scale_and_mask(term, scale=scale)) for ordinal, terms in contracted.items() for term in terms]


def reported_terms(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """Unannealed, masked per-term expectations of one run: ``reconstruction`` and ``kl/<site>``
    (summed over the batch and particles), with the ELBO = reconstruction - sum of the KLs.

    - ``kl/<site>`` = E_q[log q(site) - log p(site)] for each guide site, exact over enumerated
      values (Pyro's Dice weights);
    - ``reconstruction`` = E_q[log p(observed | ...)]; where the model sums a site y out, its
      prior is folded in: E_q[log sum_y p(y) p(x | y, ...)];
    - a guide site whose prior depends on a site summed out in the model gets the KL to its
      marginal prior, p(z) = sum_y p(y) p(z | y), and the reconstruction the rest (for several
      such sites sharing a sum, one joint term ``kl/<a>+<b>``).

    The prior of a site summed out in the model honours its masks and is normalised over the
    site's values (:func:`pyrovae.traces.enumeration_mass`): where a mask hides the site, the sum
    over its values is an average, as in the log-likelihood analysis.
    """
    ordering, enumerated, enum_dims = model_sum(model_trace, guide_trace)
    costs: OrderedDict = OrderedDict()
    factors: dict = {}  # the model's sum: name -> (ordinal, packed masked density)
    scales = []
    for name, site in _sample_sites(model_trace):
        if is_auxiliary_term(site):  # in the loss, not in log p(x, z): reported apart
            costs.setdefault(ordering[name], []).append((f"auxiliary/{name}", site["packed"]["log_prob"]))
        elif name in enumerated:
            density = _masked_density(site)
            factors[name] = (ordering[name], _packed(site, density - enumeration_mass(site, lambda s: density)))
            scales.append(_unannealed_scale(site))
        elif enum_dims and not enum_dims.isdisjoint(site["packed"]["log_prob"]._pyro_dims):
            factors[name] = (ordering[name], _packed(site, _masked_density(site)))
            scales.append(_unannealed_scale(site))
        else:
            value = site["packed"]["log_prob"] if not is_annealed(site) else _packed(site, reported_log_prob(site))
            if site["is_observed"]:
                costs.setdefault(ordering[name], []).append(("reconstruction", value))
            else:
                costs.setdefault(ordering[name], []).append((f"kl/{name}", packed.neg(value)))
    kl_key = {}
    if factors:
        scale = _get_common_scale(scales)
        for ordinal, term in _contract(factors, list(factors), enum_dims, scale):
            costs.setdefault(ordinal, []).append(("reconstruction", term))
        for names in _groups(factors, enum_dims):
            latents = [name for name in names if name not in enumerated and not model_trace.nodes[name]["is_observed"]]
            if not latents:
                continue  # only the summed-out prior: it stays in the reconstruction
            key = "kl/" + "+".join(latents)
            kl_key.update(dict.fromkeys(latents, key))
            prior = [name for name in names if name in enumerated or name in latents]
            for ordinal, term in _contract(factors, prior, enum_dims, scale):
                costs.setdefault(ordinal, []).extend([("reconstruction", packed.neg(term)), (key, packed.neg(term))])
    for name, site in _sample_sites(guide_trace):
        value = site["packed"]["log_prob"] if not is_annealed(site) else _packed(site, reported_log_prob(site))
        costs.setdefault(ordering[name], []).append((kl_key.get(name, f"kl/{name}"), value))
    totals: dict[str, torch.Tensor] = {}
    for tag, value in SyncFreeDice(guide_trace, ordering).expected_costs(costs):
        totals[tag] = totals[tag] + value if tag in totals else value
    return totals


@OBJECTIVES.register("enum_elbo")
class EnumELBO(Objective):
    """Pyro's ``TraceEnum_ELBO``: discrete sites marked ``infer={"enumerate": "parallel"}`` are
    summed out exactly, in the guide (an exact expectation over q(y | x)) or in the model (a site
    the guide leaves out is marginalised: log sum_y p(y) p(x, ... | y)):

        ELBO = E_q(z | x) [ sum_{y in guide} q(y | x, z) ( log p(x, y, z) - log q(y, z | x) ) ],

    estimated with ``particles`` vectorized samples of the sampled sites (DiCE gradients for the
    non-reparameterized ones, as Pyro does). The loss and its gradients are those of
    ``TraceEnum_ELBO(max_plate_nesting=...).differentiable_loss`` divided by the batch size,
    computed by Pyro's own trace and model-factor code (tested to be equal), but through
    :class:`SyncFreeDice`, so no step waits on the device.

    Metrics (see :func:`reported_terms`): ``elbo`` (unannealed, masks honoured), ``kl/<site>`` for
    each guide site (exact over enumerated values), and ``reconstruction`` = elbo + sum of the KLs.
    A site summed out in the model has no KL term: its prior is folded into ``reconstruction``
    (E_q[log sum_y p(y) p(x | y, ...)]), and ``kl_scale`` does not anneal it. Annealing a guide
    site whose prior depends on such a site is refused (Pyro needs one scale for every factor of
    the sum).

    At beta = 1, ``elbo`` equals -loss, except where a mask hides a site summed out in the model:
    Pyro's value then counts each of its values with weight 1 (a ``Distribution.mask``) or with its
    prior (a ``poutine.mask``), while ``elbo`` averages over them, as the log-likelihood does.
    """

    name = "enum_elbo"
    sums_out_enumeration = True

    def __init__(self, particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"enum_elbo needs particles >= 1, got {particles}")
        self.num_particles = particles
        self._pyro_elbo: TraceEnum_ELBO | None = None
        self._pyro_elbo_nesting: int | None = None
        self._checked = None

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

    def _check_traces(self, model_trace, guide_trace, info) -> None:
        """Refuse, by name, a model site that neither the guide samples nor the model enumerates
        in parallel: Pyro would draw it from the prior and give it no gradient."""
        for name, site in _sample_sites(model_trace):
            if site["is_observed"] or name in guide_trace.nodes or site["infer"].get("_enumerate_dim") is not None:
                continue
            how = site["infer"].get("enumerate")
            raise UnsupportedPairError(
                f"objective {self.name!r}: latent site {name!r} of {info.model_name} is not in the guide and "
                + (f"is marked enumerate={how!r}, which the model cannot do" if how else "is not marked for enumeration")
                + "; mark it infer={'enumerate': 'parallel'} (a discrete site, summed out in the model) or sample it in "
                "the guide (pyro.sample's obs_mask drops infer: split the site with poutine.mask instead)"
            )

    def _explained(self, traces, model, guide, batch, info):
        """Pyro's traces; where enumerating fails because a marked site has no finite support
        (Pyro's bare NotImplementedError), name the site."""
        try:
            yield from traces
        except NotImplementedError as error:
            with torch.no_grad(), poutine.block(), preserved_rng():
                guide_trace = poutine.trace(guide).get_trace(**batch)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
            for trace in (guide_trace, model_trace):
                for name, site in _sample_sites(trace):
                    if site["infer"].get("enumerate") and not site["fn"].has_enumerate_support:
                        raise UnsupportedPairError(
                            f"objective {self.name!r} cannot enumerate site {name!r} of {info.model_name}: "
                            f"{type(site['fn']).__name__} has no finite support; remove its infer 'enumerate'"
                        ) from error
            raise

    def _unanneal_model_sums(self, model_trace, guide_trace, info) -> None:
        """A site summed out in the model has no KL term to anneal: undo beta on it. A latent
        whose prior sits inside that sum cannot be annealed either: refuse it by name."""
        _, enumerated, enum_dims = model_sum(model_trace, guide_trace)
        for site in enumerated.values():
            if is_annealed(site):
                site["scale"] = site["infer"][UNANNEALED_SCALE]
        if not enum_dims:
            return
        for name, site in _sample_sites(model_trace):
            if name in enumerated or not is_annealed(site) or enum_dims.isdisjoint(site["packed"]["log_prob"]._pyro_dims):
                continue
            dims = enum_dims & set(site["packed"]["log_prob"]._pyro_dims)
            summed = [other for other, s in enumerated.items() if dims & set(s["packed"]["log_prob"]._pyro_dims)]
            raise UnsupportedPairError(
                f"objective {self.name!r} cannot anneal site {name!r} of {info.model_name}: its density depends on "
                f"{', '.join(map(repr, summed)) or 'a site'} summed out in the model, and the sum needs one scale for all "
                f"its factors; keep beta = 1 for {name!r} ([anneal.sites.{name}]) or enumerate in the guide"
            )

    def __call__(self, model, guide, batch):
        info = self.prepare(model, guide, batch)
        values, runs = [], []
        check = self._checked is None or self._checked[0] is not model or self._checked[1] is not guide
        # One run with vectorized particles, or one per particle when Pyro's options ask for that.
        traces = self._elbo(info.max_plate_nesting)._get_traces(model, guide, (), batch)
        if check:
            traces = self._explained(traces, model, guide, batch, info)
        for model_trace, guide_trace in traces:
            if check:
                self._check_traces(model_trace, guide_trace, info)
            if info.model_enumerated:
                self._unanneal_model_sums(model_trace, guide_trace, info)
            values.append(dice_elbo(model_trace, guide_trace))
            with torch.no_grad():
                runs.append(reported_terms(model_trace, guide_trace))
        self._checked = (model, guide)
        count = batch_size(batch) * self.num_particles
        loss = (values[0] if len(values) == 1 else sum(values)) * (-1.0 / count)
        with torch.no_grad():
            terms = runs[0] if len(runs) == 1 else {key: sum(run[key] for run in runs) for key in runs[0]}
            reconstruction = terms.pop("reconstruction", None)
            reconstruction = torch.zeros_like(loss) if reconstruction is None else reconstruction
            auxiliary = {key: terms.pop(key) for key in list(terms) if key.startswith("auxiliary/")}
            kls = list(terms.values())
            elbo = reconstruction - (torch.stack(kls).sum() if kls else 0.0)
            names, values = ["elbo", "reconstruction", *terms, *auxiliary], [elbo, reconstruction, *kls, *auxiliary.values()]
        return loss, stacked_metrics(names, values, 1.0 / count)
