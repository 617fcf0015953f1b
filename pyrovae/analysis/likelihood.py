"""Importance-sampled marginal likelihood."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from tqdm.auto import tqdm

from pyrovae.traces import guess_max_plate_nesting, log_weight_terms, trace_pair


def importance_log_likelihood(
    model,
    guide,
    data: torch.Tensor | Mapping[str, torch.Tensor],
    particles: int = 5000,
    batch_size: int = 100,
    max_rows: int = 20000,
    progress: bool = False,
) -> torch.Tensor:
    """log p(x) estimated per example with K = ``particles`` guide samples (Burda et al. 2016):

        log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x).

    Particles are drawn in chunks of at most ``max_rows // batch_size`` and combined with a
    running log-sum-exp, so memory is bounded whatever K is. Returns a CPU tensor of shape
    (N,) in nats; its mean is the test log-likelihood (minus the NLL).
    """
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    tensors = {"x": data} if torch.is_tensor(data) else dict(data)
    count = int(tensors["x"].shape[0])
    chunk = max(1, min(particles, max_rows // batch_size))
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    results = []
    with torch.no_grad():
        nesting = guess_max_plate_nesting(model, guide, {k: v[:2] for k, v in tensors.items()})
        for start in tqdm(range(0, count, batch_size), disable=not progress, desc=f"log p(x), K={particles}", unit="batch"):
            batch = {key: value[start : start + batch_size] for key, value in tensors.items()}
            running = None
            for done in range(0, particles, chunk):
                drawn = min(chunk, particles - done)
                model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=nesting, particles=drawn)
                reconstruction, latent_terms = log_weight_terms(model_trace, guide_trace, nesting, True, scaled=False)
                log_weights = reconstruction + sum(latent_terms.values())
                partial = torch.logsumexp(log_weights, 0)
                running = partial if running is None else torch.logaddexp(running, partial)
            results.append((running - math.log(particles)).cpu())
    model.train(was_training[0])
    guide.train(was_training[1])
    log_likelihood = torch.cat(results)
    if not torch.isfinite(log_likelihood).all():
        bad = int((~torch.isfinite(log_likelihood)).sum())
        raise FloatingPointError(f"importance_log_likelihood: {bad} of {count} examples gave a non-finite estimate")
    return log_likelihood
