"""Importance-sampled marginal likelihood."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from tqdm.auto import tqdm

from pyrovae.traces import check_enumeration_in_data_plate, inspect_pair, log_weights, trace_pair


def importance_log_likelihood(
    model,
    guide,
    data: torch.Tensor | Mapping[str, torch.Tensor],
    particles: int = 5000,
    inputs: Mapping[str, float] | None = None,
    batch_size: int = 100,
    max_rows: int = 20000,
    progress: bool = False,
) -> torch.Tensor:
    """log p(x) estimated per example with K = ``particles`` guide samples (Burda et al. 2016):

        log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x).

    Enumerated sites (in the model or the guide) are summed out exactly: for each particle
    the weight is sum_e p(x, z_k, e) / q(z_k | x, e) over their values e. Masks are honoured
    (:func:`pyrovae.traces.reported_log_prob`). ``data`` is a tensor of x or a dict of tensors
    (the whole batch contract: ``x``, ``y``, masks ...) with examples on dim 0; ``inputs`` are
    extra keyword arguments passed to every call (e.g. the current values of scheduled inputs).

    Particles are drawn in chunks of at most ``max_rows // batch_size`` and combined with a
    running log-sum-exp, so memory is bounded whatever K is. Returns a CPU tensor of shape
    (N,) in nats; its mean is the test log-likelihood (minus the NLL).
    """
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    tensors = {"x": data} if torch.is_tensor(data) else dict(data)
    count = int(tensors["x"].shape[0])
    extra = dict(inputs or {})
    chunk = max(1, min(particles, max_rows // batch_size))
    modules = [part for part in (model, guide) if isinstance(part, torch.nn.Module)]
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    results = []
    with torch.no_grad():
        info = inspect_pair(model, guide, {**{k: v[:2] for k, v in tensors.items()}, **extra})
        nesting, enumerate = info.max_plate_nesting, bool(info.enumerated)
        for start in tqdm(range(0, count, batch_size), disable=not progress, desc=f"log p(x), K={particles}", unit="batch"):
            batch = {**{key: value[start : start + batch_size] for key, value in tensors.items()}, **extra}
            running = None
            for done in range(0, particles, chunk):
                drawn = min(chunk, particles - done)
                model_trace, guide_trace = trace_pair(
                    model, guide, batch, max_plate_nesting=nesting, particles=drawn, enumerate=enumerate
                )
                if enumerate and running is None:
                    check_enumeration_in_data_plate(model_trace, guide_trace)
                partial = torch.logsumexp(log_weights(model_trace, guide_trace, nesting, True, scaled=False), 0)
                running = partial if running is None else torch.logaddexp(running, partial)
            results.append((running - math.log(particles)).cpu())
    for module, mode in zip(modules, was_training):
        module.train(mode)
    log_likelihood = torch.cat(results)
    if not torch.isfinite(log_likelihood).all():
        bad = int((~torch.isfinite(log_likelihood)).sum())
        raise FloatingPointError(f"importance_log_likelihood: {bad} of {count} examples gave a non-finite estimate")
    return log_likelihood
