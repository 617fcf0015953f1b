"""Objectives: ``objective(model, guide, batch) -> (loss, metrics)`` (see :mod:`.base`).

Registered names: ``elbo`` (Trace_ELBO), ``meanfield_elbo`` (TraceMeanField_ELBO),
``iwae`` (IWAE with VIMCO for score-function sites, optional DReG), ``enum_elbo``
(TraceEnum_ELBO: enumerated discrete sites summed out exactly), ``free_bits`` (Kingma et al.
2016) and ``mmd`` (InfoVAE, Zhao et al. 2017), which wrap ``elbo`` or ``meanfield_elbo`` (option
``objective``) and edit the KL terms of its loss (:mod:`.regularized`), and ``pyro:<Class>`` for
any ELBO class of ``pyro.infer`` with its own options.

In TOML, a wrapper's table holds its own options and the inner objective's::

    [objective]
    name = "free_bits"          # or "mmd" (alpha, weight, kernel, bandwidth)
    objective = "meanfield_elbo"
    threshold = 0.5             # nats per latent dimension (per = "site": per latent site)
    particles = 1
"""

from pyrovae.objectives.base import Metrics, Objective, batch_size
from pyrovae.objectives.elbo import ELBO, MeanFieldELBO, TracedLoss
from pyrovae.objectives.enum import EnumELBO
from pyrovae.objectives.pyro_elbo import PyroELBO, pyro_objective
from pyrovae.objectives.iwae import IWAE, detach_parameters, vimco_learning_signals
from pyrovae.objectives.regularized import MMD, FreeBits, kl_terms, squared_mmd
from pyrovae.registry import OBJECTIVES

__all__ = [
    "ELBO",
    "EnumELBO",
    "FreeBits",
    "IWAE",
    "MMD",
    "MeanFieldELBO",
    "Metrics",
    "Objective",
    "PyroELBO",
    "TracedLoss",
    "batch_size",
    "build_objective",
    "detach_parameters",
    "kl_terms",
    "pyro_objective",
    "squared_mmd",
    "vimco_learning_signals",
]


def build_objective(name: str, **options) -> Objective:
    return OBJECTIVES.resolve(name, "objective.name")(**options)
