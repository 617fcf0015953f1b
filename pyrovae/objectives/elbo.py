"""Single-sample-family ELBOs: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` semantics.

Each objective's :meth:`~ELBO.traced_loss` returns the loss and metrics together with the two
traces they were read from, so a wrapper (``free_bits``, ``mmd`` in :mod:`.regularized`) can
reuse the very KL terms the loss holds instead of running the pair a second time.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Mapping, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Distribution, kl_divergence

from pyrovae.errors import UnsupportedPairError
from pyrovae.objectives.base import Metrics, Objective, batch_size, stacked_metrics
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import PairInfo, auxiliary_sites, latent_sites, observed_sites, preserved_rng, reported_log_prob_sum


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
    without latent sites has no KL terms: its elbo is its reconstruction, log p(x). An auxiliary
    training term (:func:`pyrovae.pair.auxiliary_term`) is in the loss but not in the elbo: it is
    reported apart, as ``auxiliary/<site>``."""
    with torch.no_grad():
        observed = [reported_log_prob_sum(site) for _, site in observed_sites(model_trace, auxiliary=False)]
        reconstruction = _total(observed)
        kls = list(kl_by_site.values())
        elbo = reconstruction - _total(kls) if kls else reconstruction
        auxiliary = {f"auxiliary/{name}": site["log_prob_sum"] for name, site in auxiliary_sites(model_trace)}
    return stacked_metrics(
        ["reconstruction", "elbo", *(f"kl/{name}" for name in kl_by_site), *auxiliary],
        [reconstruction, elbo, *kls, *auxiliary.values()],
        1.0 / count,
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


# --- the mean-field check of meanfield_elbo --------------------------------------------------


class _TagLatents(Messenger):
    """Pyro's provenance tracking (``pyro.ops.provenance``, as in ``pyro.infer.inspect``), for
    latent values only: each sampled latent value becomes a ``ProvenanceTensor`` holding its site's
    name, so every tensor computed from it (another site's distribution parameters) carries the
    name. ``drawn_from[site]``: the names the value itself was computed from, before tagging."""

    def __init__(self):
        super().__init__()
        self.drawn_from: dict[str, frozenset] = {}

    def _pyro_post_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        self.drawn_from[msg["name"]] = get_provenance(msg["value"])
        msg["value"] = ProvenanceTensor(detach_provenance(msg["value"]), frozenset({msg["name"]}))


@contextmanager
def _buffers_kept(*modules):
    """Put the modules' buffers (a batch-norm's running statistics) back as they were: a check
    must leave training as it would have been without it."""
    saved = [
        (table, key, tensor, tensor.detach().clone())
        for module in modules
        if isinstance(module, torch.nn.Module)
        for part in module.modules()
        for table in (part._buffers,)
        for key, tensor in table.items()
        if tensor is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for table, key, tensor, value in saved:
                table[key] = tensor
                tensor.copy_(value)


def _run_pair(model, guide, batch: Mapping, tag: bool):
    """One run of the guide and of the model replayed on it, without gradients, without moving
    the random streams and hidden from outer handlers (``kl_scale``). With ``tag``, the latent
    values carry provenance; returns the traces and each trace's ``drawn_from``."""
    guide_tags, model_tags = _TagLatents(), _TagLatents()
    with _buffers_kept(model, guide), torch.no_grad(), poutine.block(), preserved_rng(), pyro.validation_enabled(False):
        with guide_tags if tag else nullcontext():
            guide_trace = poutine.trace(guide).get_trace(**batch)
        with model_tags if tag else nullcontext():
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    return guide_trace, model_trace, guide_tags.drawn_from, model_tags.drawn_from


def latent_parents(trace, drawn_from: Mapping[str, frozenset]) -> dict[str, set[str]]:
    """For each latent site of a provenance-tracked trace: the other latent sites whose sampled
    values its distribution was computed from (read, as ``pyro.infer.inspect.get_dependencies``
    does, off the provenance of its log-density at its value, and off its draw)."""
    names = {name for name, _ in latent_sites(trace)}
    parents = {}
    with torch.no_grad(), pyro.validation_enabled(False):
        for name, site in latent_sites(trace):
            found = set(drawn_from.get(name, ())) | set(get_provenance(site["fn"].log_prob(site["value"])))
            parents[name] = {other for other in found if other in names and other != name}
    return parents


def _chains(parents: Mapping[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """``chains[site][ancestor]``: a chain ``[ancestor, ..., site]`` of direct dependencies."""
    chains = {}
    for site in parents:
        found: dict[str, list[str]] = {}
        frontier = [(parent, [parent, site]) for parent in sorted(parents[site])]
        while frontier:
            ancestor, chain = frontier.pop(0)
            if ancestor not in found:
                found[ancestor] = chain
                frontier.extend((up, [up, *chain]) for up in sorted(parents.get(ancestor, ())))
        chains[site] = found
    return chains


def meanfield_violations(guide_parents, model_parents) -> list[tuple[str, str, list[str]]]:
    """``(site, parent, chain)`` for each latent ``site`` whose model distribution depends on a
    ``parent`` that the guide draws from ``site`` (``chain``: site -> ... -> parent in the guide).
    Pyro's precise condition for ``TraceMeanField_ELBO``: a site's parents in the model must not
    be its descendants in the guide. A mean-field guide (no dependencies) always meets it."""
    chains = _chains(guide_parents)
    return [
        (site, parent, chains[parent][site])
        for site in guide_parents
        for parent in sorted(model_parents.get(site, ()))
        if parent in chains and site in chains[parent]
    ]


def _quoted(names) -> str:
    return ", ".join(repr(name) for name in names)


@OBJECTIVES.register("meanfield_elbo")
class MeanFieldELBO(ELBO):
    """Pyro's ``TraceMeanField_ELBO``:  ELBO = E_q[log p(x | z)] - sum_sites KL(q(z_s) || p(z_s)),
    with each KL in closed form where ``torch.distributions.kl_divergence`` knows the pair
    (else the Monte Carlo term log p(z_s) - log q(z_s)). The KL is scaled by the guide site's
    scale, which is where ``kl_scale`` puts beta. Needs reparameterized sites: a score-function
    site is refused, since its reconstruction gradient would be dropped. Without latent sites it
    is ``elbo``'s -(1/B) sum_n log p(x_n).

    It assumes a mean-field guide. Precisely (Pyro's condition), no latent site's parents in the
    model may be its descendants in the guide: with q(z1 | x) q(z2 | z1) for p(z2) p(z1 | z2),
    KL(q(z1 | x) || p(z1 | z2)) is taken at a z2 drawn from z1 itself, and the loss is not the
    ELBO. A guide whose sites depend on one another in the model's direction (top-down, as
    q(z2 | x) q(z1 | z2, x)) meets the condition and is silently accepted. On its first call with
    a pair, the objective runs the guide and the model once with Pyro's provenance tracking
    (:class:`_TagLatents`) to find which latent values each site's distribution was computed
    from, and *warns* (``warnings.warn``, once per objective instance, naming the sites and the
    dependency, and pointing to ``objective.name = "elbo"``) when the condition fails. It warns
    rather than refuses, as Pyro's ``TraceMeanField_ELBO`` does: the loss is still finite and
    trainable, provenance may miss or add a dependency (a value read through ``.item()``, an
    operation that drops the tracking), and a user may mean it. Where provenance cannot be followed
    through the pair (the run raises), it falls back to Pyro's own sign, which is a warning
    when the guide samples its sites in another order than the model."""

    name = "meanfield_elbo"
    _meanfield_warned = False  # set on the instance by its one warning

    def prepare(self, model, guide, batch: Mapping) -> PairInfo:
        """The base inspection and :meth:`check_pair`, then, with each new pair and until it has
        warned once, the mean-field check (:meth:`check_mean_field`)."""
        new_pair = self._pair is None or self._pair[0] is not model or self._pair[1] is not guide
        info = super().prepare(model, guide, batch)
        if new_pair and not self._meanfield_warned:
            self.check_mean_field(model, guide, batch, info)
        return info

    def check_mean_field(self, model, guide, batch: Mapping, info: PairInfo) -> None:
        """Warn (once) when the guide breaks the mean-field condition; see the class docstring."""
        try:
            guide_trace, model_trace, guide_drawn, model_drawn = _run_pair(model, guide, batch, tag=True)
            violations = meanfield_violations(latent_parents(guide_trace, guide_drawn), latent_parents(model_trace, model_drawn))
        except Exception as error:  # noqa: BLE001 - provenance could not follow the pair: Pyro's order check
            self._check_site_order(model, guide, batch, info, error)
            return
        if not violations:
            return
        site, parent, chain = violations[0]
        through = f" (through {_quoted(chain[1:-1])})" if len(chain) > 2 else f" (q({parent} | {site}, ...))"
        others = [f"{s!r} and {p!r}" for s, p, _ in violations[1:]]
        also = f"; also {', '.join(others)}" if others else ""
        self._warn(
            f"objective 'meanfield_elbo': the guide of {info.model_name} is not mean field: it draws {parent!r} "
            f"from {site!r}{through}, while the model draws {site!r} given {parent!r} (p({site} | {parent}, ...)){also}. "
            f"The analytic KL(q({site}) || p({site} | {parent})) is then taken at a {parent} drawn from {site} itself, "
            "so the loss is not the ELBO. Use objective.name = \"elbo\" (right for any guide), or a guide whose "
            "sites depend on one another only in the model's direction"
        )

    def _check_site_order(self, model, guide, batch: Mapping, info: PairInfo, error: Exception) -> None:
        """Pyro's ``TraceMeanField_ELBO`` check: model and guide sample the shared latents in one order."""
        try:
            guide_trace, model_trace, _, _ = _run_pair(model, guide, batch, tag=False)
        except Exception:  # noqa: BLE001 - the pair itself fails: its first step reports that
            return
        guide_names = [name for name, _ in latent_sites(guide_trace) if name in model_trace.nodes]
        model_names = [name for name, _ in latent_sites(model_trace) if name in guide_trace.nodes]
        if guide_names != model_names:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._warn(
                f"objective 'meanfield_elbo': could not follow the dependencies between the sites of "
                f"{info.model_name} and its guide ({type(error).__name__}: {reason}); the guide samples its sites "
                f"in the order {_quoted(guide_names)} and the model in the order {_quoted(model_names)}, Pyro's "
                "sign that the guide may not be mean field, and then the loss is not the ELBO. If a guide site "
                "depends on another, use objective.name = \"elbo\" (right for any guide)"
            )

    def _warn(self, message: str) -> None:
        self._meanfield_warned = True
        warnings.warn(message, UserWarning, stacklevel=2)

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
