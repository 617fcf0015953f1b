"""Objectives: ``objective(model, guide, batch) -> (loss, metrics)`` (see :mod:`.base`).

Registered names: ``elbo`` (Trace_ELBO), ``meanfield_elbo`` (TraceMeanField_ELBO),
``iwae`` (IWAE with VIMCO for score-function sites, optional DReG), ``enum_elbo``
(TraceEnum_ELBO: enumerated discrete sites summed out exactly), and ``pyro:<Class>`` for any
ELBO class of ``pyro.infer`` with its own options.
"""

from pyrovae.objectives.base import Metrics, Objective, batch_size
from pyrovae.objectives.elbo import ELBO, MeanFieldELBO
from pyrovae.objectives.enum import EnumELBO
from pyrovae.objectives.pyro_elbo import PyroELBO, pyro_objective
from pyrovae.objectives.iwae import IWAE, detach_parameters, vimco_learning_signals
from pyrovae.registry import OBJECTIVES

__all__ = [
    "ELBO",
    "EnumELBO",
    "IWAE",
    "MeanFieldELBO",
    "Metrics",
    "Objective",
    "PyroELBO",
    "batch_size",
    "build_objective",
    "detach_parameters",
    "pyro_objective",
    "vimco_learning_signals",
]


def build_objective(name: str, **options) -> Objective:
    return OBJECTIVES.resolve(name, "objective.name")(**options)
