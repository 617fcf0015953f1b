"""Any of Pyro's ELBO classes by name: ``objective.name = "pyro:TraceGraph_ELBO"``.

Pyro's own class is built from the TOML options and computes the loss with its own code, so its
options, checks, warnings and estimator details (e.g. ``infer["baseline"]`` for score-function
sites under ``TraceGraph_ELBO``) apply exactly. pyrovae's metrics are read from the traces Pyro
ran: the model and guide are wrapped in trace recorders inside Pyro's own traces.
"""

from __future__ import annotations

import inspect
import math

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.objectives.base import Objective, batch_size
from pyrovae.objectives.elbo import monte_carlo_kl, summed_metrics
from pyrovae.objectives.enum import EnumELBO
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import PairInfo

# Pyro's deprecated spelling of max_plate_nesting: not offered as an option.
_HIDDEN_OPTIONS = {"self", "max_iarange_nesting"}
# Gradients that loss_and_grads computes are only taken when a trace holds a param site; pyrovae's
# parameters live in torch modules, so a parameter-free anchor site is added to the guide.
_ANCHOR = "_pyrovae_gradient_anchor"


class _Recorder:
    """Wraps a model or guide so each run's trace is kept (Pyro traces the same run around it)."""

    def __init__(self):
        self.traces: list = []

    def wrap(self, fn, anchor: bool = False):
        def recorded(*args, **kwargs):
            if anchor:
                pyro.param(_ANCHOR, lambda: torch.zeros(()))
            tracer = poutine.trace(fn)
            result = tracer(*args, **kwargs)
            self.traces.append(tracer.trace)
            return result

        return recorded


class PyroELBO(Objective):
    """Pyro's ``pyro_class`` as an objective. The loss is Pyro's, per datapoint:
    ``differentiable_loss`` where the class has it; ``TraceGraph_ELBO``'s surrogate (with its
    baselines) otherwise; classes with only ``loss_and_grads`` (``RenyiELBO``) compute their
    gradients during the call (the fit loop zeroes gradients before calling an objective).

    Metrics: ``elbo``, ``reconstruction`` and ``kl/<site>`` (Monte Carlo, unannealed, masks
    honoured) from the recorded traces; ``RenyiELBO`` also reports its own bound ``renyi`` and
    selects by it. Pairs with enumerated sites go to ``pyro:TraceEnum_ELBO`` (or ``enum_elbo``);
    other classes refuse them.
    """

    pyro_class: type = pyro.infer.Trace_ELBO

    def __init__(self, **options):
        super().__init__(None)
        self.options = options
        self._elbo = None

    @property
    def name(self) -> str:
        return f"pyro:{self.pyro_class.__name__}"

    @property
    def selection_metric(self) -> str:
        return "renyi" if issubclass(self.pyro_class, pyro.infer.RenyiELBO) else "elbo"

    def check_pair(self, info: PairInfo) -> None:
        if info.enumerated:
            raise UnsupportedPairError(
                f"objective {self.name!r} does not sum out the enumerated site {info.enumerated[0]!r} of "
                f"{info.model_name}; use 'pyro:TraceEnum_ELBO' or 'enum_elbo'"
            )

    def _pyro_elbo(self, info: PairInfo):
        if self._elbo is None:
            options = dict(self.options)
            if options.get("max_plate_nesting", math.inf) == math.inf:
                options["max_plate_nesting"] = info.max_plate_nesting  # Pyro would guess by running the pair again
            self._elbo = self.pyro_class(**options)
        return self._elbo

    def __call__(self, model, guide, batch):
        info = self.prepare(model, guide, batch)
        elbo = self._pyro_elbo(info)
        models, guides = _Recorder(), _Recorder()
        count = batch_size(batch)
        metrics = {}
        if hasattr(elbo, "differentiable_loss"):
            loss = elbo.differentiable_loss(models.wrap(model), guides.wrap(guide), **batch) / count
        elif hasattr(elbo, "_loss_and_surrogate_loss"):  # TraceGraph_ELBO: the surrogate includes baselines
            value, surrogate = elbo._loss_and_surrogate_loss(models.wrap(model), guides.wrap(guide), (), batch)
            loss = (surrogate + (-value - surrogate).detach()) / count
        else:
            if torch.is_grad_enabled():
                value = elbo.loss_and_grads(models.wrap(model), guides.wrap(guide, anchor=True), **batch)
            else:
                value = elbo.loss(models.wrap(model), guides.wrap(guide), **batch)
            # Gradients are already in place: a leaf whose backward adds nothing carries the value.
            loss = torch.tensor(float(value) / count, requires_grad=torch.is_grad_enabled())
            if isinstance(elbo, pyro.infer.RenyiELBO):
                metrics["renyi"] = -loss.detach()
        metrics.update(self._trace_metrics(models.traces, guides.traces, count))
        return loss, metrics

    @staticmethod
    def _trace_metrics(model_traces, guide_traces, count) -> dict:
        """Average of the per-run metrics over the runs Pyro made (its particles)."""
        runs = []
        for model_trace, guide_trace in zip(model_traces, guide_traces):
            model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            particles = _vectorized_particles(model_trace)
            runs.append(summed_metrics(model_trace, monte_carlo_kl(model_trace, guide_trace), count * particles))
        return {key: torch.stack([run[key] for run in runs]).mean() for key in runs[0]}


def _vectorized_particles(trace) -> int:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == "num_particles_vectorized":
                return frame.size
    return 1


class PyroEnumELBO(EnumELBO):
    """``pyro:TraceEnum_ELBO``: pyrovae's ``enum_elbo`` with Pyro's options."""

    def __init__(self, **options):
        super().__init__(particles=options.get("num_particles", 1), max_plate_nesting=None)
        self.options = options
        self.name = f"pyro:{self.pyro_class.__name__}"

    def _elbo(self, nesting: int):
        if self._pyro_elbo is None:
            options = dict(self.options)
            if options.get("max_plate_nesting", math.inf) == math.inf:
                options["max_plate_nesting"] = nesting
            options.setdefault("vectorize_particles", True)
            options.setdefault("strict_enumeration_warning", False)
            self._pyro_elbo = self.pyro_class(**options)
        return self._pyro_elbo


def pyro_objective(class_name: str, where: str = "objective") -> type:
    """The objective class for ``pyro:<class_name>``, whose options are the Pyro class's own."""
    pyro_class = getattr(pyro.infer, class_name, None)
    if not (isinstance(pyro_class, type) and issubclass(pyro_class, pyro.infer.ELBO)):
        known = sorted(n for n in dir(pyro.infer) if isinstance(getattr(pyro.infer, n), type) and issubclass(getattr(pyro.infer, n), pyro.infer.ELBO) and n != "ELBO")
        raise ConfigError(f"{where}: pyro.infer has no ELBO class {class_name!r}; choose one of: {', '.join(known)}")
    base = PyroEnumELBO if issubclass(pyro_class, pyro.infer.TraceEnum_ELBO) else PyroELBO

    def __init__(self, **options):
        base.__init__(self, **options)

    signature = inspect.signature(pyro_class.__init__)
    __init__.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name not in _HIDDEN_OPTIONS or name == "self"]
    )
    return type(f"Pyro_{class_name}", (base,), {"pyro_class": pyro_class, "__init__": __init__, "__doc__": base.__doc__})


OBJECTIVES.register_prefix("pyro", pyro_objective)
