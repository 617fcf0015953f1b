"""Importance-sampled marginal likelihood, with its Monte Carlo standard error.

    log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x, z_k) / q(z_k | x),   z_k ~ q(z | x)

(Burda et al. 2016). Two ways to get the weights, with the same numbers:

- **traced** (any pair): the model and guide run under Pyro's handlers with the particles as a
  vectorized plate (:func:`pyrovae.traces.trace_pair`); enumerated sites are summed out, masks
  honoured.
- **sentence** (a pair whose guide offers ``posterior(**batch)`` -> q(z | x) and whose model
  offers ``conditional_log_prob(z, **batch)`` -> log p(x | z) and ``latent_log_prob(z)`` -> log
  p(z), as the sentence VAE and its LSTM guide do): the encoder runs once per sentence, the K
  particles are folded into the rows of one decoder call, the output layer runs only at real
  positions a slice at a time, and the rows per decoder call come from a memory budget. The
  language model (no latent) is scored exactly, once.

Both report, per example, the delta-method variance of the log of the mean weight,

    Var[log p^(x)] ~= (1/K) (mean_k w_k^2 / (mean_k w_k)^2 - 1) = (1/K) (K / ESS - 1),

so that ``ImportanceEstimate.standard_error`` tells whether K was enough (ESS: Kish's effective
sample size, (sum w)^2 / sum w^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from tqdm.auto import tqdm

from pyrovae.nn.sequence import LOGIT_SLICE_ELEMENTS
from pyrovae.traces import check_enumeration_in_data_plate, inspect_pair, log_weights, trace_pair

METHODS = ("auto", "traced", "sentence")
BYTES = 4


@dataclass
class ImportanceEstimate:
    """Per-example importance-sampled log-likelihoods and their Monte Carlo variances (CPU, (N,))."""

    log_likelihood: torch.Tensor
    variance: torch.Tensor
    effective_sample_size: torch.Tensor
    particles: int

    @property
    def mean(self) -> float:
        """The mean log-likelihood over the examples (minus the NLL)."""
        return float(self.log_likelihood.double().mean())

    @property
    def standard_error(self) -> float:
        """The Monte Carlo standard error of :attr:`mean` (given these examples):
        sqrt(sum_n Var[log p^(x_n)]) / N."""
        return float(self.variance.double().sum().sqrt() / self.log_likelihood.numel())


class _Accumulator:
    """Running log sum_k w_k and log sum_k w_k^2 per example over chunks of particles."""

    def __init__(self):
        self.total = self.squares = None

    def add(self, log_weights: torch.Tensor) -> None:  # (particles, rows)
        total, squares = torch.logsumexp(log_weights, 0), torch.logsumexp(2 * log_weights, 0)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total, self.squares = torch.logaddexp(self.total, total), torch.logaddexp(self.squares, squares)

    def finish(self, particles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_likelihood = self.total - math.log(particles)
        # K / ESS = K sum w^2 / (sum w)^2 >= 1; clamp the rounding below 1.
        inverse_ess = (self.squares - 2 * self.total + math.log(particles)).exp().clamp(min=1.0)
        variance = (inverse_ess - 1.0) / particles
        return log_likelihood.cpu(), variance.cpu(), (particles / inverse_ess).cpu()


def offers_sentence_path(model, guide) -> bool:
    """Whether the pair offers the methods of the sentence path (see the module text)."""
    if not callable(getattr(model, "conditional_log_prob", None)):
        return False
    sites = [site.name for site in getattr(model, "latent_sites", ())]
    if not sites:
        return True  # the language model: log p(x) is exact
    return sites == ["z"] and callable(getattr(guide, "posterior", None)) and callable(getattr(model, "latent_log_prob", None))


def importance_log_likelihood(model, guide, data: torch.Tensor | Mapping[str, torch.Tensor], particles: int = 5000, **options) -> torch.Tensor:
    """log p(x) per example (a CPU tensor (N,) in nats; its mean is minus the NLL); ``options`` and
    the standard error: see :func:`importance_estimate`."""
    return importance_estimate(model, guide, data, particles, **options).log_likelihood


def importance_estimate(
    model,
    guide,
    data: torch.Tensor | Mapping[str, torch.Tensor],
    particles: int = 5000,
    inputs: Mapping[str, float] | None = None,
    batch_size: int = 100,
    max_rows: int = 20000,
    progress: bool = False,
    memory_gb: float = 0.25,
    method: str = "auto",
) -> ImportanceEstimate:
    """log p(x) estimated per example with K = ``particles`` guide samples, and its Monte Carlo
    variance (see the module text).

    ``data`` is a tensor of x or a dict of tensors (the whole batch contract: ``x``, ``y``,
    masks ...) with examples on dim 0; ``inputs`` are extra keyword arguments passed to every call
    (the current values of scheduled inputs). ``method``: ``"traced"``, ``"sentence"``, or
    ``"auto"`` (the sentence path where the pair offers it).

    Traced: ``batch_size`` examples per call, particles in chunks of at most ``max_rows //
    batch_size``. Sentence: the encoder reads ``batch_size`` sentences at a time, and each
    decoder call holds as many (sentence, particle) rows as ``memory_gb`` allows. Both combine
    chunks with a running log-sum-exp, so memory is bounded whatever K is. The modules are put in
    eval mode while it runs (and restored). ``progress`` shows a bar per decoder call (per chunk),
    with the time left."""
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if method not in METHODS:
        raise ValueError(f"method = {method!r}: choose one of {', '.join(METHODS)}")
    if not memory_gb > 0:
        raise ValueError(f"memory_gb = {memory_gb!r}: the memory budget must be > 0")
    tensors = {"x": data} if torch.is_tensor(data) else dict(data)
    sentence = offers_sentence_path(model, guide)
    if method == "sentence" and not sentence:
        raise ValueError(
            f"method = 'sentence' needs a model with conditional_log_prob and latent_log_prob and a guide with posterior "
            f"({type(model).__name__}, {type(guide).__name__} do not offer them); use method = 'traced'"
        )
    modules = [part for part in (model, guide) if isinstance(part, torch.nn.Module)]
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            if sentence and method != "traced":
                estimate = _sentence_estimate(model, guide, tensors, particles, dict(inputs or {}), batch_size, memory_gb, progress)
            else:
                estimate = _traced_estimate(model, guide, tensors, particles, dict(inputs or {}), batch_size, max_rows, progress)
    finally:
        for module, mode in zip(modules, was_training):
            module.train(mode)
    log_likelihood = estimate.log_likelihood
    if not torch.isfinite(log_likelihood).all():
        bad = int((~torch.isfinite(log_likelihood)).sum())
        raise FloatingPointError(f"importance_log_likelihood: {bad} of {log_likelihood.numel()} examples gave a non-finite estimate")
    return estimate


def _traced_estimate(model, guide, tensors, particles, extra, batch_size, max_rows, progress) -> ImportanceEstimate:
    count = int(tensors["x"].shape[0])
    chunk = max(1, min(particles, max_rows // batch_size))
    info = inspect_pair(model, guide, {**{k: v[:2] for k, v in tensors.items()}, **extra})
    nesting, enumerate = info.max_plate_nesting, bool(info.enumerated)
    passes = math.ceil(count / batch_size) * math.ceil(particles / chunk)
    bar = tqdm(total=passes, disable=not progress, desc=f"log p(x), K={particles}", unit="chunk")
    results = []
    for start in range(0, count, batch_size):
        batch = {**{key: value[start : start + batch_size] for key, value in tensors.items()}, **extra}
        running = _Accumulator()
        for done in range(0, particles, chunk):
            drawn = min(chunk, particles - done)
            model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=nesting, particles=drawn, enumerate=enumerate)
            if enumerate and done == 0:
                check_enumeration_in_data_plate(model_trace, guide_trace)
            running.add(log_weights(model_trace, guide_trace, nesting, True, scaled=False))
            bar.update()
        results.append(running.finish(particles))
    bar.close()
    return ImportanceEstimate(*(torch.cat(part) for part in zip(*results)), particles=particles)


def sentence_rows_per_pass(model, length: int, memory_gb: float) -> int:
    """How many (sentence, particle) rows of ``length`` positions one decoder call may hold within
    ``memory_gb``: the output layer's slice (``LOGIT_SLICE_ELEMENTS`` logits, its log-softmax and
    their gather: fixed) plus, per row and position, the embedding and context read, the decoder's
    features, their copy at the real positions and its working state, counted as 15 feature widths:
    the process's measured peak (``benchmarks/eval_throughput.py --sentences``, VmHWM) was 1.5x the
    budget when counted as 9 (the LSTM's gates and activations, and the copy), as the allocator keeps
    freed blocks resident between calls."""
    decoder = model.decoder
    width = decoder.output.in_features
    fixed = 3 * LOGIT_SLICE_ELEMENTS * BYTES
    per_row = length * (decoder.embedding.embedding_dim + decoder.context_dim + 15 * width) * BYTES
    return max(1, int((memory_gb * 1e9 - fixed) // per_row))


def _sentence_estimate(model, guide, tensors, particles, extra, batch_size, memory_gb, progress) -> ImportanceEstimate:
    x = tensors["x"]
    count = int(x.shape[0])
    if "lengths" in tensors:
        lengths = tensors["lengths"]
    elif "mask" in tensors:
        lengths = tensors["mask"].sum(-1)
    else:
        lengths = torch.full((count,), x.shape[1], device=x.device)
    # Longest first, so each block is trimmed close to its rows' lengths; results go back in order.
    order = torch.sort(lengths.cpu(), descending=True, stable=True).indices
    host_lengths = lengths.cpu()[order]
    latent = bool(getattr(model, "latent_sites", ()))
    drawn = particles if latent else 1
    plan = []  # (first row, end row, particles per decoder call) per block of sentences, in the sorted order
    begin = 0
    while begin < count:
        rows = sentence_rows_per_pass(model, int(host_lengths[begin]), memory_gb)
        sentences = max(1, min(batch_size, rows // drawn, count - begin))
        plan.append((begin, begin + sentences, min(drawn, rows)))
        begin += sentences
    passes = sum(math.ceil(drawn / chunk) for _, _, chunk in plan)
    bar = tqdm(total=passes, disable=not progress, desc=f"log p(x), K={particles}", unit="chunk")
    results = []
    for begin, end, chunk in plan:
        index = order[begin:end].to(x.device)
        longest = int(host_lengths[begin])
        batch = {
            key: (value.index_select(0, index)[:, :longest] if key in ("x", "mask") else value.index_select(0, index))
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == count
            else value
            for key, value in tensors.items()
        }
        batch.update(extra)
        if not latent:
            log_likelihood = model.conditional_log_prob(None, **batch)[0].cpu()
            results.append((log_likelihood, torch.zeros_like(log_likelihood), torch.full_like(log_likelihood, float(particles))))
            bar.update()
            continue
        posterior = guide.posterior(**batch)  # the encoder, once per sentence
        running = _Accumulator()
        for done in range(0, particles, chunk):
            z = posterior.rsample((min(chunk, particles - done),))
            weights = model.conditional_log_prob(z, **batch) + model.latent_log_prob(z) - posterior.log_prob(z)
            running.add(weights)
            bar.update()
        results.append(running.finish(particles))
    bar.close()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(count)
    return ImportanceEstimate(*(torch.cat(part)[inverse] for part in zip(*results)), particles=particles)
