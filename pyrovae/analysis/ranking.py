"""Ranking metrics on held-out items: the fold-in evaluation of Liang et al. 2018.

A held-out user brings the items folded in (``x``, seen by the model) and the items to find
(``heldout``). Every item the user has not already seen is scored; seen items are excluded from
the ranking (their scores set to -inf). With rel_r = 1 if the item at rank r is held out, and
H = the number of held-out items:

    DCG@k  = sum_{r=1}^{k} rel_r / log2(r + 1)
    NDCG@k = DCG@k / IDCG@k,    IDCG@k = sum_{r=1}^{min(k, H)} 1 / log2(r + 1)   (DCG of a perfect ranking)
    Recall@k = (sum_{r=1}^{k} rel_r) / min(k, H)                                 (the paper's normalised recall)

so both lie in [0, 1] and reach 1 for a perfect ranking. A row with no held-out item has no value
(NaN), so a split without held-out items cannot pass for a ranked one.

:class:`RankingMetrics` is an objective that wraps another (``meanfield_elbo``, ``elbo``,
``pyro:Trace_ELBO`` ...): its loss is the inner one's, and when the pair is evaluated (the parts in
evaluation mode, as the fit loop's validation and ``final.json``'s test metrics run them) on a batch
with ``heldout`` it adds ``ndcg@100``, ``recall@20`` and ``recall@50`` (per row, averaged) to the
metrics and names ``ndcg@100`` its ``selection_metric``: validation NDCG every epoch,
``best.pt`` by NDCG, test NDCG in ``final.json``. Training steps compute none of it.

Scores come from :func:`rank_scores`: a part's own ``rank_scores(**batch)`` method (guide first,
then model) where it has one; otherwise the model's observation distribution for the batch with
every latent site set to the mean of q (Mult-VAE's z = mu), read as its logits (or its mean).
:func:`evaluate_ranking` runs the same metrics over a split for any scoring function (the
popularity and EASE baselines of :mod:`pyrovae.baselines`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from pyro import poutine

from pyrovae.errors import ConfigError, DataError
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import latent_sites

HELDOUT_KEY = "heldout"


def _discounts(k: int, like: torch.Tensor) -> torch.Tensor:
    """1 / log2(r + 1) for ranks r = 1..k."""
    ranks = torch.arange(1, k + 1, dtype=like.dtype, device=like.device)
    return 1.0 / torch.log2(ranks + 1.0)


def ranked_hits(scores: torch.Tensor, heldout: torch.Tensor, seen: torch.Tensor | None, k: int) -> torch.Tensor:
    """rel_r for r = 1..k: whether the r-th best-scored unseen item of each row is held out, (B, k)
    as floats. Seen items (``seen > 0``) are ranked last; k is capped at the number of items."""
    if scores.shape != heldout.shape:
        raise DataError(f"ranking: scores have shape {tuple(scores.shape)} but heldout has {tuple(heldout.shape)}")
    if seen is not None:
        scores = scores.masked_fill(seen > 0, -math.inf)
    k = min(k, scores.shape[-1])
    top = scores.topk(k, dim=-1).indices
    return (heldout.gather(-1, top) > 0).to(scores.dtype if scores.dtype.is_floating_point else torch.float32)


def ranking_metrics(
    scores: torch.Tensor,
    heldout: torch.Tensor,
    seen: torch.Tensor | None = None,
    ndcg_at: Sequence[int] = (100,),
    recall_at: Sequence[int] = (20, 50),
) -> dict[str, torch.Tensor]:
    """``ndcg@k`` and ``recall@k`` per row (B,), from one top-k of the scores (see the module
    docstring); NaN for a row without held-out items."""
    ks = list(ndcg_at) + list(recall_at)
    if not ks or min(ks) < 1:
        raise ConfigError(f"ranking cut-offs must be integers >= 1, got ndcg_at={list(ndcg_at)}, recall_at={list(recall_at)}")
    hits = ranked_hits(scores, heldout, seen, max(ks))
    relevant = (heldout > 0).sum(-1).to(hits.dtype)
    discounts = _discounts(hits.shape[-1], hits)
    ideal = torch.cat([discounts.new_zeros(1), discounts.cumsum(0)])  # ideal[h] = IDCG of h held-out items
    missing = torch.full_like(relevant, math.nan)
    metrics = {}
    for k in ndcg_at:
        kk = min(k, hits.shape[-1])
        cut = torch.clamp(relevant, max=kk).long()
        dcg = (hits[:, :kk] * discounts[:kk]).sum(-1)
        metrics[f"ndcg@{k}"] = torch.where(relevant > 0, dcg / ideal[cut].clamp(min=1e-12), missing)
    for k in recall_at:
        kk = min(k, hits.shape[-1])
        found = hits[:, :kk].sum(-1)
        metrics[f"recall@{k}"] = torch.where(relevant > 0, found / torch.clamp(relevant, max=kk).clamp(min=1), missing)
    return metrics


def observation_scores(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-item scores from an observation distribution: its logits where it has them (monotone in
    the item probabilities), else its mean; shaped like ``x``."""
    base = fn
    while getattr(base, "logits", None) is None and hasattr(base, "base_dist"):
        base = base.base_dist
    scores = getattr(base, "logits", None)
    if scores is None or scores.shape != x.shape:
        scores = fn.mean
    if scores.shape != x.shape:
        raise DataError(f"ranking: the observation distribution gives scores of shape {tuple(scores.shape)} for x of shape {tuple(x.shape)}")
    return scores


def posterior_mean_scores(model, guide, batch: Mapping) -> torch.Tensor:
    """The model's observed-site scores (:func:`observation_scores`) with each latent site at the
    mean of q(z | x) (no sampling); a model without latents is run as it is."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(**batch)
        for name, site in latent_sites(guide_trace):
            if site["fn"].support.is_discrete:
                raise ConfigError(
                    f"ranking: latent site {name!r} is discrete, so the mean of q is not a value of it; "
                    "give the model or guide a rank_scores(**batch) method"
                )
            site["value"] = site["fn"].mean
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    site = model_trace.nodes[getattr(model, "observed_site", "x")]
    return observation_scores(site["fn"], batch["x"])


def rank_scores(model, guide, batch: Mapping) -> torch.Tensor:
    """Scores (B, items) for ranking: ``rank_scores(**batch)`` of the guide or the model where one
    has it, else :func:`posterior_mean_scores`."""
    for part in (guide, model):
        method = getattr(part, "rank_scores", None)
        if callable(method):
            with torch.no_grad():
                return method(**batch)
    return posterior_mean_scores(model, guide, batch)


@OBJECTIVES.register("ranking")
class RankingMetrics:
    """An objective with ranking metrics (see the module docstring): the loss and metrics of
    ``objective`` (built with ``particles`` where that is not 1), plus ``ndcg@<k>`` for k in
    ``ndcg_at`` and ``recall@<k>`` for k in ``recall_at`` when the pair is evaluated on a batch
    with ``heldout``. ``selection_metric`` is ``ndcg@<ndcg_at[0]>``."""

    name = "ranking"

    def __init__(self, objective: str = "meanfield_elbo", particles: int = 1, ndcg_at: list[int] = [100], recall_at: list[int] = [20, 50]):
        from pyrovae.objectives import build_objective

        if objective == "pyrovae.analysis.ranking:RankingMetrics":
            raise ConfigError("objective.objective: RankingMetrics cannot wrap itself")
        if not ndcg_at or any(k < 1 for k in list(ndcg_at) + list(recall_at)):
            raise ConfigError(f"objective.ndcg_at and recall_at must be cut-offs >= 1 (ndcg_at not empty), got {ndcg_at} and {recall_at}")
        self.inner = build_objective(objective, **({"particles": particles} if particles != 1 else {}))
        self.ndcg_at, self.recall_at = tuple(ndcg_at), tuple(recall_at)
        self.selection_metric = f"ndcg@{self.ndcg_at[0]}"
        self.particles = getattr(self.inner, "particles", None)

    def __call__(self, model, guide, batch: Mapping):
        loss, metrics = self.inner(model, guide, batch)
        evaluating = not (getattr(model, "training", False) or getattr(guide, "training", False))
        if evaluating and HELDOUT_KEY in batch:
            scores = rank_scores(model, guide, batch)
            per_row = ranking_metrics(scores, batch[HELDOUT_KEY], batch["x"], self.ndcg_at, self.recall_at)
            metrics = {**metrics, **{key: value.mean() for key, value in per_row.items()}}
        return loss, metrics


def evaluate_ranking(
    scores_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    data,
    split: str,
    batch_size: int = 500,
    ndcg_at: Sequence[int] = (100,),
    recall_at: Sequence[int] = (20, 50),
) -> dict[str, float]:
    """The ranking metrics of ``scores_of(batch) -> (B, items)`` averaged over every row of a split
    of ``data`` (a :class:`~pyrovae.data.DataSplits` whose batches have ``heldout``), a batch at a time."""
    totals: dict[str, float] = {}
    rows = 0
    with torch.no_grad():
        for batch in data.batches(split, batch_size):
            if HELDOUT_KEY not in batch:
                raise DataError(f"ranking: the {split} split has no {HELDOUT_KEY!r} items to rank (keys: {sorted(batch)})")
            per_row = ranking_metrics(scores_of(batch), batch[HELDOUT_KEY], batch["x"], ndcg_at, recall_at)
            for key, value in per_row.items():
                totals[key] = totals.get(key, 0.0) + float(value.double().sum())
            rows += int(batch["x"].shape[0])
    return {key: value / rows for key, value in totals.items()}
