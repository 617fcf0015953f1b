"""The objective contract: ``objective(model, guide, batch) -> (loss, metrics)``.

``loss`` is a differentiable scalar: the negative objective per datapoint of the
batch. ``metrics`` maps names to detached 0-dim tensors (``float(v)`` reads one),
per datapoint, read off the same traces as the loss (no second forward pass):

- ``elbo``: E_q[log p(x, z) - log q(z | x)], never KL-annealed, so it is the true bound;
- ``reconstruction``: E_q[log p(x | z)];
- ``kl/<site>``: KL(q(z_site | .) || p(z_site | .)), analytic where the objective uses
  it, else the Monte Carlo estimate log q - log p;
- objectives with their own bound add it (IWAE: ``iwae``) and name it ``selection_metric``.

Every metric honours masks and undoes only ``kl_scale``'s beta
(:func:`pyrovae.traces.reported_log_prob`). They are kept as tensors so the fit loop can
accumulate them without a host-device synchronisation per step.

KL annealing is not an argument: wrap the call in :class:`pyrovae.handlers.kl_scale`,
which scales the latent sites of both traces.

Before its first step with a pair, an objective inspects it once
(:func:`pyrovae.traces.inspect_pair`) and refuses, by name, what it cannot treat correctly:
enumerated sites unless it sums them out, score-function sites unless it has an estimator.
"""

from __future__ import annotations

from typing import Mapping

import torch

from pyrovae.errors import UnsupportedPairError
from pyrovae.traces import PairInfo, inspect_pair, trace_pair

Metrics = dict[str, torch.Tensor]


class Objective:
    """Base: inspects each pair once, checks it, and caches the plate depth."""

    __pyrovae_kind__ = "objective"  # subclasses may be named by import path (pyrovae.registry.declare)

    name: str = "objective"
    particles: int | None = None
    # The validation metric the fit loop selects best.pt and stops early by (higher is better).
    selection_metric: str = "elbo"
    # Whether the objective sums enumerated sites out exactly (else it refuses them).
    sums_out_enumeration: bool = False
    # Whether one call is a pure function of the parameters, the batch and the random draws, so
    # train.compile may capture it (see pyrovae.train.compiled). An objective that keeps state
    # across calls or takes gradients inside its call sets False.
    compilable: bool = True

    def __init__(self, max_plate_nesting: int | None = None):
        self.max_plate_nesting = max_plate_nesting
        self._pair = None
        self._info: PairInfo | None = None

    def prepare(self, model, guide, batch: Mapping) -> PairInfo:
        """Inspect and check the pair on its first use; cached while the pair is the same."""
        if self._pair is None or self._pair[0] is not model or self._pair[1] is not guide:
            info = inspect_pair(model, guide, batch, self.max_plate_nesting)
            self.check_pair(info)
            self._pair, self._info = (model, guide), info
            self.max_plate_nesting = info.max_plate_nesting
        return self._info

    def check_pair(self, info: PairInfo) -> None:
        """Refuse what this objective cannot treat correctly. The default refuses enumeration."""
        if info.enumerated and not self.sums_out_enumeration:
            where = "the guide" if info.guide_enumerated else "the model"
            raise UnsupportedPairError(
                f"objective {self.name!r} cannot sum out the enumerated site {info.enumerated[0]!r} of "
                f"{info.model_name} (enumerated in {where}) and would sample it instead; "
                "use objective.name = 'enum_elbo', which sums it out exactly"
            )

    def _trace(self, model, guide, batch, before_model=None):
        info = self.prepare(model, guide, batch)
        return trace_pair(
            model,
            guide,
            batch,
            max_plate_nesting=info.max_plate_nesting,
            particles=self.particles,
            before_model=before_model,
            enumerate=bool(info.enumerated) and self.sums_out_enumeration,
        )

    def __call__(self, model, guide, batch: Mapping) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError


def batch_size(batch: Mapping) -> int:
    return int(batch["x"].shape[0])


def stacked_metrics(names: list[str], values: list[torch.Tensor], scale: float) -> Metrics:
    """Detached metrics from one stack and one multiply instead of an op per metric (they run every step)."""
    with torch.no_grad():
        scaled = (torch.stack(values) * scale).unbind()
    return dict(zip(names, scaled))
