"""Any of Pyro's ELBO classes by name: ``objective.name = "pyro:TraceGraph_ELBO"``.

Pyro's own class is built from the TOML options and computes the loss with its own code, so its
options, checks, warnings and estimator details (e.g. ``infer["baseline"]`` for score-function
sites under ``TraceGraph_ELBO``) apply exactly. pyrovae's metrics are read from the traces Pyro
ran: the model and guide are wrapped in trace recorders inside Pyro's own traces.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.infer.tracetmc_elbo import _compute_tmc_estimate
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.ops import packed
from pyro.ops.provenance import detach_provenance
from pyro.poutine.util import prune_subsample_sites

from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.objectives.base import Objective, batch_size, stacked_metrics
from pyrovae.objectives.enum import EnumELBO
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import PairInfo, auxiliary_sites, batch_device, is_annealed, is_auxiliary_term, latent_sites, observed_sites, reported_log_prob

# Pyro's deprecated spelling of max_plate_nesting: not offered as an option.
_HIDDEN_OPTIONS = {"max_iarange_nesting"}
# Subclasses of pyro.infer.ELBO that are not one objective pyrovae can train by.
_REFUSED = {
    "ELBO": "is the abstract base class",
    "ReweightedWakeSleep": "returns two losses (one for the model, one for the guide), not one objective",
    "Trace_MMD": "is an MMD objective whose kernel is an object a TOML file cannot give",
    "TraceTailAdaptive_ELBO": "computes gradients only (its loss value is inf by design), but the fit loop needs a "
    "finite value to check steps and select checkpoints",
}
# The TOML types of Pyro's constructor options (the others follow their default's type).
_OPTION_TYPES = {
    "num_particles": int,
    "max_plate_nesting": Optional[int],
    "vectorize_particles": bool,
    "strict_enumeration_warning": bool,
    "ignore_jit_warnings": bool,
    "jit_options": Optional[dict],
    "retain_graph": Optional[bool],
    "tail_adaptive_beta": float,
    "alpha": float,
}
# loss_and_grads only takes gradients when a trace holds a param site; pyrovae's parameters live
# in torch modules, so a parameter-free anchor site is added to the guide.
_ANCHOR = "_pyrovae_gradient_anchor"


class _Recorder:
    """Wraps a model or guide so each run's trace is kept (Pyro traces the same run around it).
    ``on_trace(trace)`` is called after each run."""

    def __init__(self, on_trace=None):
        self.traces: list = []
        self.on_trace = on_trace

    def wrap(self, fn, anchor: bool = False):
        def recorded(*args, **kwargs):
            if anchor:
                pyro.param(_ANCHOR, lambda: torch.zeros(()))
            tracer = poutine.trace(fn)
            result = tracer(*args, **kwargs)
            self.traces.append(tracer.trace)
            if self.on_trace is not None:
                self.on_trace(tracer.trace)
            return result

        return recorded


class _GradientScale:
    """Multiplies every gradient that reaches the pair's parameters by ``factor`` while it is
    active (tensor hooks, removed on exit): the gradients ``loss_and_grads`` takes are those of the
    summed loss, the contract's are per datapoint. Parameters are the model's and guide's
    ``torch.nn`` parameters and the param sites their runs touch."""

    def __init__(self, factor: float, *parts):
        self.factor = factor
        self.handles = []
        self.seen: set[int] = set()
        for part in parts:
            if isinstance(part, torch.nn.Module):
                for parameter in part.parameters():
                    self._hook(parameter)

    def _hook(self, tensor) -> None:
        if torch.is_tensor(tensor) and tensor.requires_grad and tensor.is_leaf and id(tensor) not in self.seen:
            self.seen.add(id(tensor))
            self.handles.append(tensor.register_hook(lambda grad: grad * self.factor))

    def on_trace(self, trace) -> None:
        for site in trace.nodes.values():
            if site["type"] == "param":
                unconstrained = getattr(site["value"], "unconstrained", None)
                self._hook(unconstrained() if callable(unconstrained) else site["value"])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PyroELBO(Objective):
    """Pyro's ``pyro_class`` as an objective. The loss is Pyro's, divided by the batch size:

    - ``differentiable_loss`` where the class has it (``Trace_ELBO``, ``TraceMeanField_ELBO``,
      ``TraceTMC_ELBO``);
    - ``TraceGraph_ELBO``'s surrogate (``_loss_and_surrogate_loss``, baselines included) with the
      ELBO as its value;
    - for classes with only ``loss_and_grads`` (``RenyiELBO``), Pyro's own call, which takes the
      gradients during the call (scaled to the per-datapoint loss); the returned loss carries the
      value and its backward adds nothing. The fit loop zeroes gradients before calling an
      objective, so these gradients are the step's.

    Under ``torch.no_grad()`` (validation) classes without ``differentiable_loss`` use Pyro's
    ``loss``, which has no side effects (no baseline updates, no gradients).

    Metrics from the recorded traces, unannealed and masks honoured: ``elbo``, ``reconstruction``
    and ``kl/<site>`` (Monte Carlo: log q - log p on the draws Pyro made, averaged over its
    particles and over the draws of sites sampled several times); ``RenyiELBO`` also reports its
    bound as ``renyi`` and ``TraceTMC_ELBO`` its estimate as ``tmc``, each its selection metric.
    A model site absent from the guide counts as drawn from its prior (KL 0).

    Pairs with enumerated sites go to ``pyro:TraceEnum_ELBO`` (or ``enum_elbo``);
    ``pyro:TraceTMC_ELBO`` takes sites sampled several times (``num_samples``); other classes
    refuse them.
    """

    pyro_class: type = pyro.infer.Trace_ELBO
    # Pyro's classes may keep state across calls (TraceGraph_ELBO's decaying-average baselines)
    # or take gradients in their call (loss_and_grads): the step stays eager under train.compile.
    compilable = False

    def __init__(self, **options):
        super().__init__(options.pop("max_plate_nesting", None))
        self.options = options
        self._elbo = None
        self._elbo_nesting: int | None = None
        self._checked = None

    @property
    def name(self) -> str:
        return f"pyro:{self.pyro_class.__name__}"

    @property
    def own_bound(self) -> str | None:
        if issubclass(self.pyro_class, pyro.infer.RenyiELBO):
            return "renyi"
        if issubclass(self.pyro_class, pyro.infer.TraceTMC_ELBO):
            return "tmc"
        return None

    @property
    def selection_metric(self) -> str:
        return self.own_bound or "elbo"

    def check_pair(self, info: PairInfo) -> None:
        if info.enumerated and not issubclass(self.pyro_class, pyro.infer.TraceTMC_ELBO):
            raise UnsupportedPairError(
                f"objective {self.name!r} does not sum out the enumerated site {info.enumerated[0]!r} of "
                f"{info.model_name}; use 'pyro:TraceEnum_ELBO' or 'enum_elbo'"
            )

    def _check_traces(self, model_trace, guide_trace) -> None:
        """TMC metrics average over draws: a site enumerated exhaustively (no ``num_samples``) has
        no draws to average over."""
        for trace in (guide_trace, model_trace):
            for name, site in latent_sites(trace):
                if site["infer"].get("enumerate") and not site["infer"].get("num_samples"):
                    raise UnsupportedPairError(
                        f"objective {self.name!r}: site {name!r} is enumerated exhaustively; pyrovae's Monte "
                        "Carlo metrics need it sampled: add infer={'num_samples': N}, or use 'enum_elbo'"
                    )

    def _pyro_elbo(self, info: PairInfo):
        # Pyro would guess the plate depth by running the pair again: give it the known one.
        if self._elbo is None or self._elbo_nesting != info.max_plate_nesting:
            self._elbo = self.pyro_class(max_plate_nesting=info.max_plate_nesting, **self.options)
            self._elbo_nesting = info.max_plate_nesting
        return self._elbo

    def __call__(self, model, guide, batch):
        info = self.prepare(model, guide, batch)
        elbo = self._pyro_elbo(info)
        count = batch_size(batch)
        models, guides = _Recorder(), _Recorder()
        if hasattr(elbo, "differentiable_loss"):
            loss = elbo.differentiable_loss(models.wrap(model), guides.wrap(guide), **batch) / count
        elif not torch.is_grad_enabled():
            loss = torch.tensor(elbo.loss(models.wrap(model), guides.wrap(guide), **batch) / count, device=batch_device(batch))
        elif hasattr(elbo, "_loss_and_surrogate_loss"):  # TraceGraph_ELBO: the surrogate includes baselines
            value, surrogate = elbo._loss_and_surrogate_loss(models.wrap(model), guides.wrap(guide), (), batch)
            loss = (surrogate + (-value - surrogate).detach()) / count
        else:
            scale = _GradientScale(1.0 / count, model, guide)
            models.on_trace = guides.on_trace = scale.on_trace
            try:
                value = elbo.loss_and_grads(models.wrap(model), guides.wrap(guide, anchor=True), **batch)
            finally:
                scale.remove()
            # The gradients are in place: a leaf whose backward adds nothing carries the value.
            loss = torch.tensor(float(value) / count, device=batch_device(batch), requires_grad=True)
        if self._checked is None or self._checked[0] is not model or self._checked[1] is not guide:
            if issubclass(self.pyro_class, pyro.infer.TraceTMC_ELBO):
                for model_trace, guide_trace in zip(models.traces, guides.traces):
                    self._check_traces(model_trace, guide_trace)
            self._checked = (model, guide)
        return loss, self._metrics(elbo, loss, models.traces, guides.traces, count)

    def _metrics(self, elbo, loss, model_traces, guide_traces, count: int) -> dict:
        """Per-datapoint metrics averaged over the runs Pyro made (its particles), and the class's
        own bound: -loss, or where kl_scale annealed a site, the same bound from the reported terms."""
        with torch.no_grad():
            runs = [_scored(m, g, score_model=self.own_bound == "tmc") for m, g in zip(model_traces, guide_traces)]
            terms = [_run_terms(m, g, elbo.max_plate_nesting) for m, g in runs]
            names = list(terms[0])
            values = [torch.stack([run[name] for run in terms]).sum() if len(terms) > 1 else terms[0][name] for name in names]
            reconstruction, kls = values[0], values[1:]
            total = reconstruction - (torch.stack(kls).sum() if kls else 0.0)
            per_run = count * len(runs) * _vectorized_particles(runs[0][0])
            auxiliary: dict[str, torch.Tensor] = {}
            for model_trace, _ in runs:  # summed like the terms above: over runs, batch and particles
                for name, site in auxiliary_sites(model_trace):
                    key = f"auxiliary/{name}"
                    auxiliary[key] = auxiliary[key] + site["log_prob_sum"] if key in auxiliary else site["log_prob_sum"]
            metrics = stacked_metrics(
                ["elbo", *names, *auxiliary], [total, reconstruction, *kls, *auxiliary.values()], 1.0 / per_run
            )
            if self.own_bound is not None:
                annealed = any(is_annealed(site) for pair in runs for trace in pair for _, site in latent_sites(trace))
                if not annealed and not auxiliary:
                    bound = -loss.detach()
                elif self.own_bound == "renyi":
                    bound = _renyi_bound(runs, elbo) / count
                else:
                    bound = _tmc_bound(runs, elbo) / count
                metrics = {self.own_bound: bound, **metrics}
        # TraceGraph_ELBO tracks provenance through the values it draws: report plain tensors.
        return {key: detach_provenance(value) for key, value in metrics.items()}


def _scored(model_trace, guide_trace, score_model: bool):
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    if score_model:
        model_trace.compute_score_parts()
    else:
        model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    return model_trace, guide_trace


def _sample_sites(trace):
    """The sample sites of p(x, z) or q(z | x), auxiliary training terms left out."""
    return [site for site in trace.nodes.values() if site["type"] == "sample" and not is_auxiliary_term(site)]


def _renyi_bound(runs, elbo) -> torch.Tensor:
    """``RenyiELBO.loss``'s bound (summed over the batch) from the reported log-densities."""
    particles = []
    for model_trace, guide_trace in runs:
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_weight = sum(torch_sum(reported_log_prob(site), sum_dims) for site in _sample_sites(model_trace))
        log_weight = log_weight - sum(torch_sum(reported_log_prob(site), sum_dims) for site in _sample_sites(guide_trace))
        particles.append(log_weight)
    vectorized = elbo.vectorize_particles and elbo.num_particles > 1
    log_weights = (1.0 - elbo.alpha) * (particles[0] if vectorized else torch.stack(particles))
    bound = torch.logsumexp(log_weights, 0) - math.log(elbo.num_particles)
    return bound.sum() / (1.0 - elbo.alpha)


def _tmc_bound(runs, elbo) -> torch.Tensor:
    """``TraceTMC_ELBO``'s estimate (summed over the batch) from the reported log-densities."""
    total = 0.0
    for model_trace, guide_trace in runs:
        for name, _ in auxiliary_sites(model_trace):
            model_trace.remove_node(name)  # a training term, not part of p(x, z)
        guide_trace.pack_tensors()
        model_trace.pack_tensors(guide_trace.plate_to_symbol)
        for site in _sample_sites(model_trace) + _sample_sites(guide_trace):
            if is_annealed(site):
                site["packed"]["log_prob"] = packed.pack(reported_log_prob(site), site["infer"]["_dim_to_symbol"])
        total = total + _compute_tmc_estimate(model_trace, guide_trace)
    return total / elbo.num_particles


def _total(site, nesting: int) -> torch.Tensor:
    """A site's reported log-density summed over its plates, averaged over the draws of sites
    sampled several times (the dims left of Pyro's plates)."""
    log_prob = reported_log_prob(site)
    extra = log_prob.dim() - nesting
    draws = math.prod(log_prob.shape[:extra]) if extra > 0 else 1
    return log_prob.sum() / draws if draws != 1 else log_prob.sum()


def _run_terms(model_trace, guide_trace, nesting: int) -> dict[str, torch.Tensor]:
    """``reconstruction`` and ``kl/<site>`` of one run, summed over the batch (and vectorized particles)."""
    observed = [_total(site, nesting) for _, site in observed_sites(model_trace, auxiliary=False)]
    terms = {"reconstruction": torch.stack(observed).sum() if observed else torch.zeros(())}
    for name, site in latent_sites(model_trace):
        if name in guide_trace.nodes:
            terms[f"kl/{name}"] = _total(guide_trace.nodes[name], nesting) - _total(site, nesting)
        else:  # drawn from the prior in the model: q = p
            terms[f"kl/{name}"] = torch.zeros_like(terms["reconstruction"])
    return terms


def _vectorized_particles(trace) -> int:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == "num_particles_vectorized":
                return frame.size
    return 1


class PyroEnumELBO(EnumELBO):
    """``pyro:TraceEnum_ELBO``: pyrovae's ``enum_elbo`` (Pyro's TraceEnum_ELBO loss and gradients,
    exact metrics) built with Pyro's options."""

    pyro_class: type = pyro.infer.TraceEnum_ELBO

    def __init__(self, **options):
        super().__init__(particles=options.get("num_particles", 1), max_plate_nesting=options.pop("max_plate_nesting", None))
        self.options = options
        self.name = f"pyro:{self.pyro_class.__name__}"

    def _elbo(self, nesting: int):
        if self._pyro_elbo is None or self._pyro_elbo_nesting != nesting:
            self._pyro_elbo = self.pyro_class(max_plate_nesting=nesting, **self.options)
            self._pyro_elbo_nesting = nesting
        return self._pyro_elbo


def _option_type(name: str, default) -> Any:
    if name in _OPTION_TYPES:
        return _OPTION_TYPES[name]
    if default is None or default is inspect.Parameter.empty:
        return Any
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float if isinstance(default, float) else int
    return type(default)


def pyro_objective(class_name: str, where: str = "objective") -> type:
    """The objective class for ``pyro:<class_name>``, whose options are the Pyro class's own
    constructor arguments, typed for the config check (``max_plate_nesting`` defaults to the
    depth pyrovae's inspection finds)."""
    pyro_class = getattr(pyro.infer, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(pyro_class, type) and issubclass(pyro_class, pyro.infer.ELBO)):
        known = sorted(
            name
            for name in dir(pyro.infer)
            if isinstance(getattr(pyro.infer, name), type)
            and issubclass(getattr(pyro.infer, name), pyro.infer.ELBO)
            and name not in _REFUSED
        )
        raise ConfigError(f"{where}: pyro.infer has no ELBO class {class_name!r}; choose one of: {', '.join(known)}")
    if class_name in _REFUSED:
        raise ConfigError(f"{where}: pyro.infer.{class_name} {_REFUSED[class_name]}, so it cannot be a pyrovae objective")
    if class_name.startswith("Jit"):
        raise ConfigError(
            f"{where}: pyro.infer.{class_name} compiles with torch.jit, which needs the batch's tensors as positional "
            f"arguments, but pyrovae passes the batch by keyword; use 'pyro:{class_name[3:]}'"
        )
    base = PyroEnumELBO if issubclass(pyro_class, pyro.infer.TraceEnum_ELBO) else PyroELBO

    signature = inspect.signature(pyro_class.__init__)
    parameters = [signature.parameters["self"]]
    annotations = {}
    for name, parameter in signature.parameters.items():
        if name == "self" or name in _HIDDEN_OPTIONS or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = None if name == "max_plate_nesting" else parameter.default
        annotations[name] = _option_type(name, default)
        parameters.append(parameter.replace(kind=parameter.KEYWORD_ONLY, default=default, annotation=annotations[name]))

    def __init__(self, **options):
        base.__init__(self, **options)

    __init__.__signature__ = signature.replace(parameters=parameters)
    __init__.__annotations__ = annotations
    return type(f"Pyro_{class_name}", (base,), {"pyro_class": pyro_class, "__init__": __init__, "__doc__": base.__doc__})


OBJECTIVES.register_prefix("pyro", pyro_objective)
