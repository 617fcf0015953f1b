"""An objective's metrics averaged over a split: validation every epoch, and the test metrics."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from pyrovae.data.splits import DataSplits
from pyrovae.train import distributed


def evaluate_objective(model, guide, objective, data: DataSplits, split: str, batch_size: int, **options) -> dict[str, float]:
    """Average per-datapoint metrics of ``objective`` over a split, without annealing or gradients,
    on whole batches plus ``inputs`` (the scheduled inputs' values, e.g. at the current step).

    ``options``: ``limit`` (evaluate the first this many rows; None: all), ``inputs`` (a mapping, or
    None) and ``context`` (a :class:`pyrovae.train.distributed.Context`, or None). With an active
    ``context`` each rank evaluates a contiguous share of the split's rows and the sums are reduced
    across ranks, so every rank returns the metrics of the whole split."""
    unknown = sorted(set(options) - {"limit", "inputs", "context"})
    if unknown:
        raise TypeError(f"evaluate_objective() got an unexpected keyword argument {unknown[0]!r}")
    limit, inputs, context = options.get("limit"), options.get("inputs"), options.get("context")
    if context is None or not context.active:
        totals, count = _summed((model, guide), objective, lambda: data.batches(split, batch_size, limit=limit), inputs)
        return {key: float(value) / count for key, value in totals.items()}
    size = data.size(split) if limit is None else min(limit, data.size(split))
    lo, hi = distributed.shard_range(size, context)
    weight = 1
    if lo == hi:  # more ranks than rows: evaluate a stand-in row, counted zero times
        lo, hi, weight = 0, 1, 0
    totals, count = _summed((model, guide), objective, lambda: data.batches(split, batch_size, limit=hi, start=lo), inputs, weight)
    keys = sorted(totals)
    table = torch.stack([torch.as_tensor(totals[key], dtype=torch.float64, device=context.device) for key in keys] + [
        torch.tensor(float(count), dtype=torch.float64, device=context.device)
    ])
    table = distributed.sum_tensor(context, table, f"reducing {split} metrics").cpu()
    return {key: float(table[index]) / float(table[-1]) for index, key in enumerate(keys)}


def _summed(pair, objective, batches: Callable[[], Iterable[dict]], inputs, weight: int | None = None) -> tuple[dict, int]:
    """Each metric summed over the rows of ``batches()`` (weighted by the rows' count), and the
    count, in evaluation mode without gradients. With a ``weight`` (0 or 1: a sharded
    evaluation's stand-in row counts zero times) the sums are float64."""
    model, guide = pair
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    totals: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in batches():
            n = batch["x"].shape[0] if weight is None else batch["x"].shape[0] * weight
            _, metrics = objective(model, guide, {**batch, **inputs} if inputs else batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + (value * n if weight is None else value.double() * n)
            count += n
    model.train(was_training[0])
    guide.train(was_training[1])
    return totals, count
