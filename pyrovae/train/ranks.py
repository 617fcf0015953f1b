"""Gradient averaging across ranks: the loop's data-parallel part (see :mod:`pyrovae.train.distributed`).

In a single process :class:`Ranks` hands out the training split's batches as
:meth:`DataSplits.batches <pyrovae.data.splits.DataSplits.batches>` does and averages nothing.
Under ``torchrun`` rank 0 draws each epoch's permutation exactly where and how a single process
draws it and sends it to every rank; each rank takes its contiguous piece of every global batch
(:meth:`~pyrovae.data.splits.DataSplits.shard_batches`), remembers its share of the rows, and after
``backward`` the gradients are averaged with those shares as weights (one flat ``all_reduce``), so
every rank holds the gradient of the per-datapoint loss over the whole global batch. The epoch's
training metrics are each step's row-weighted sum over the ranks, reduced once per epoch.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from pyrovae.train import distributed


def epoch_order(data, context) -> torch.Tensor:
    """The epoch's permutation of the training rows: drawn by rank 0 exactly as a single process
    draws it (``torch.randperm`` on the device, from its random stream), and sent to every rank."""
    size = data.size("train")
    if context.is_main:
        order = torch.randperm(size, device=data.device)
    else:
        order = torch.empty(size, dtype=torch.int64, device=data.device)
    with distributed.collective(context, "sharing the epoch's order"):
        torch.distributed.broadcast(order, src=0)
    return order


def mean_metrics(history: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each metric's mean over the steps (one host read per metric)."""
    return {key: float(torch.stack([m[key] for m in history]).mean()) for key in history[0]}


def weighted_metrics(history: list[dict[str, torch.Tensor]], shares: list[float]) -> tuple[list[str], torch.Tensor]:
    """The metric names and a (steps x metrics) float64 table, each step's row weighted by this
    rank's share of that step's global batch: summed over the ranks, a row is the step's metric."""
    keys = sorted(history[0])
    table = torch.stack([torch.stack([m[key].double() for key in keys]) for m in history])
    return keys, table * torch.tensor(shares, dtype=torch.float64, device=table.device).unsqueeze(1)


class Ranks:
    """The training batches of an epoch, gradient averaging after each ``backward``, and the
    epoch's metrics, for one process or for every rank of a ``torchrun`` job."""

    def __init__(self, context, parameters: list[torch.nn.Parameter]):
        self.context = context
        # None in a single process: the step tests this once and averages nothing.
        self.averager = distributed.GradientAverager(context, parameters) if context.active else None
        self.shares: list[float] = []  # this rank's share of each global batch of the epoch so far

    def batches(self, data, batch_size: int) -> Iterable[dict]:
        """The epoch's training batches (shuffled; this rank's pieces of the global batches)."""
        if self.averager is None:
            return data.batches("train", batch_size, shuffle=True)
        self.shares = []
        # This rank's piece of every global batch, and its share of the rows (python numbers).
        return self._pieces(data.shard_batches("train", batch_size, epoch_order(data, self.context), self.context.rank, self.context.world_size))

    def _pieces(self, pieces) -> Iterator[dict]:
        for batch, rows, total in pieces:
            self.shares.append(rows / total)
            yield batch

    def average_gradients(self) -> None:
        """The gradient of the per-datapoint loss over the global batch of the latest step, on every rank."""
        self.averager(self.shares[-1] * self.context.world_size)

    def epoch_metrics(self, history: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The epoch's training metrics: means over the steps, over the rows of every rank."""
        if self.averager is None:
            return mean_metrics(history)
        keys, table = weighted_metrics(history, self.shares)
        table = distributed.sum_tensor(self.context, table.to(self.context.device), "reducing training metrics").mean(0).cpu()
        return {key: float(value) for key, value in zip(keys, table)}
