"""Active units per latent site (Burda et al. 2016, section 5.2).

A latent dimension d of site s is *active* when its posterior mean moves with the data:

    A_{s,d} = Cov_x( E_{q(z | x)}[z_{s,d}] ) > threshold         (threshold 0.01 in the paper)

For a hierarchical guide, E_q[z_s | x] integrates over the layers drawn before s (for the
ladder guide, z_1's mean depends on the z_2 drawn): it is estimated by averaging the mean of
q(z_s | parents, x) over ``samples`` joint draws of the guide, which are vectorized by
``pyro.plate("particles", samples)``. Sites whose distribution has no ``mean`` average their draws.

On a run folder: ``pyrovae active-units RUN_DIR [--test-examples 2000] [--samples 20] [--threshold 0.01]``
(``pyrovae evaluate`` with ``evaluate.latent_metrics`` and ``pyrovae analyze`` report them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pyro
import torch
from pyro import poutine

from pyrovae.traces import PARTICLE_PLATE, batch_device, inspect_pair, latent_sites


@dataclass(frozen=True)
class ActiveUnits:
    """One site's count of active dims, its size, and Cov_x(E_q[z_d]) per dim (flattened event)."""

    active: int
    dims: int
    variance: torch.Tensor

    def as_dict(self) -> dict:
        return {"active": self.active, "dims": self.dims, "max_variance": float(self.variance.max())}


def _conditional_mean(site, samples_dim: int) -> torch.Tensor:
    fn, value = site["fn"], site["value"]
    try:
        mean = fn.mean.expand(value.shape)
    except (NotImplementedError, AttributeError, RuntimeError):
        mean = value
    return mean.mean(samples_dim)


def posterior_means(model, guide, data: Mapping[str, torch.Tensor], samples: int = 20, inputs=None, batch_size: int = 500) -> dict:
    """E_q[z_s | x] per latent site s of the guide, shaped (N, prod(event_shape)), estimated
    with ``samples`` vectorized draws of the guide per example (the guide in eval mode, no gradients)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    tensors, extra = dict(data), dict(inputs or {})
    count = int(tensors["x"].shape[0])
    nesting = inspect_pair(model, guide, {**{k: v[:2] for k, v in tensors.items()}, **extra}).max_plate_nesting
    was_training = guide.training
    guide.eval()
    means: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad(), poutine.block():
            for start in range(0, count, batch_size):
                batch = {**{k: v[start : start + batch_size] for k, v in tensors.items()}, **extra}
                plate = pyro.plate(PARTICLE_PLATE, samples, dim=-(nesting + 1), device=batch_device(batch))
                trace = poutine.trace(plate(guide)).get_trace(**batch)
                for name, site in latent_sites(trace):
                    event = len(site["fn"].event_shape)
                    # The particle dim, counted from the left of the value's batch dims.
                    samples_dim = site["value"].dim() - event - (nesting + 1)
                    mean = _conditional_mean(site, samples_dim)
                    means.setdefault(name, []).append(mean.reshape(mean.shape[0], -1).cpu())
    finally:
        guide.train(was_training)
    return {name: torch.cat(parts) for name, parts in means.items()}


def active_units(
    model, guide, data: Mapping[str, torch.Tensor], threshold: float = 0.01, samples: int = 20, inputs=None, batch_size: int = 500
) -> dict[str, ActiveUnits]:
    """Active units of every latent site of the guide (see the module docstring), from the
    examples of ``data`` (a batch dict, e.g. the test split)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    result = {}
    for name, means in posterior_means(model, guide, data, samples, inputs, batch_size).items():
        variance = means.double().var(0, unbiased=False)
        result[name] = ActiveUnits(active=int((variance > threshold).sum()), dims=int(variance.numel()), variance=variance)
    return result
