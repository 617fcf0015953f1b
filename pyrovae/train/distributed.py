"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

One process per rank runs the same fit loop. This module holds what the loop needs from
``torch.distributed`` and nothing of its own making: the process group (``gloo`` on CPU,
``nccl`` on CUDA, chosen from the training device), and a few collectives with the error
handling that turns a lost peer into one clear line.

Why gradients are averaged with ``all_reduce`` and not by ``DistributedDataParallel``: the
loop calls ``objective(model, guide, batch)``, which runs the pair inside Pyro's traces, often
more than once per step (particles, enumeration, a guide trace replayed into the model), and a
guide may share a network with its model. DDP's reducer is armed by the wrapped module's own
``forward`` and expects each parameter's gradient once per forward; the objectives call the
modules through Pyro's messengers instead, so its hooks would not fire reliably (and the
wrapper would hide ``latent_sites`` and the other attributes the objectives read). After
``backward`` every gradient of the optimizer's parameters (the ``"model"`` and ``"guide"``
groups) is copied into one flat buffer, summed across ranks with a single ``all_reduce`` and
divided by the world size: the same average DDP computes, in one bucket, for any objective.
It is asynchronous on the device (NCCL enqueues it on the stream), so the step still never
waits for the device.

Not a launcher: ``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them. Without them,
or with ``WORLD_SIZE=1``, everything is the single-process code path, unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from pyrovae.train.devices import resolve_device

# How long a collective waits for the other ranks (seconds). Rank 0 writes checkpoints and the
# others wait in the next step's all_reduce, so this bounds a stall, not a normal pause.
TIMEOUT_SECONDS = float(os.environ.get("PYROVAE_DIST_TIMEOUT", "1800"))


class DistributedJobError(RuntimeError):
    """A process of a distributed job stopped or lost contact with the others."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    # Where collectives' tensors live: the training device under nccl, the CPU under gloo.
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()
_context: Context = SINGLE


def launched_world_size() -> int:
    """The world size torchrun announced to this process (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> Context:
    """The context :func:`setup` made (or found), else the single-process one."""
    global _context
    if not _context.active and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        _context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, device)
    return _context


def training_device(name: str, context: Context) -> torch.device:
    """The device a rank trains on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under a multi-GPU job."""
    device = resolve_device(name)
    if context.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", context.local_rank)
    return device


def setup(device_name: str = "auto") -> Context:
    """Join the process group torchrun prepared (once per process; later calls return the same
    context). The backend follows the training device: ``nccl`` for CUDA, ``gloo`` for the CPU."""
    global _context
    found = current()
    if found.active or launched_world_size() <= 1:
        return found
    if not dist.is_available():
        raise DistributedJobError("torchrun started this process, but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DistributedJobError(
                f"local rank {local_rank} needs CUDA device {index}, but this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per node (--nproc-per-node)"
            )
        torch.cuda.set_device(index)
        backend, collective_device = "nccl", torch.device("cuda", index)
    else:
        backend, collective_device = "gloo", torch.device("cpu")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    except (RuntimeError, ValueError) as error:
        raise DistributedJobError(f"could not join the distributed job ({_first_line(error)})") from None
    _context = Context(dist.get_rank(), dist.get_world_size(), local_rank, backend, collective_device)
    return _context


def finish() -> None:
    """The job's end: wait until every rank is done (rank 0 writes the last files), then leave."""
    context = current()
    if context.active:
        with collective(context, "finishing"):
            dist.barrier()
    shutdown()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    global _context
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _context = SINGLE


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _reason(error: BaseException) -> str:
    """A backend's error in a few words: gloo's ``[.../pair.cc:553] Connection closed by peer
    [127.0.0.1]:64231. This is typically ...`` becomes ``Connection closed by peer [127.0.0.1]:64231``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(error))
    return text.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def collective(context: Context, what: str) -> Iterator[None]:
    """Turn a collective's failure (a peer killed, a broken connection, a timeout) into
    :class:`DistributedJobError` with one line naming this rank and what it was doing."""
    try:
        yield
    except DistributedJobError:
        raise
    except RuntimeError as error:  # DistBackendError and gloo/nccl failures are RuntimeErrors
        raise DistributedJobError(
            f"rank {context.rank} of {context.world_size} lost contact with the other processes of the job during "
            f"{what} ({_reason(error)}): another process stopped or was killed"
        ) from None


# --- collectives -----------------------------------------------------------------------------------


def broadcast_object(context: Context, value: Any = None, what: str = "a broadcast") -> Any:
    """Rank 0's ``value`` on every rank (pickled; for checkpoints and messages, not per step)."""
    if not context.active:
        return value
    holder = [value if context.is_main else None]
    with collective(context, what):
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_object_from(context: Context, value: Any, source: int, what: str = "a broadcast") -> Any:
    """Rank ``source``'s ``value`` on every rank."""
    if not context.active:
        return value
    holder = [value if context.rank == source else None]
    with collective(context, what):
        dist.broadcast_object_list(holder, src=source)
    return holder[0]


def gather_objects(context: Context, value: Any, what: str = "a gather") -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.active:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    with collective(context, what):
        dist.all_gather_object(gathered, value)
    return gathered


def on_main(context: Context, function: Callable[[], Any], what: str = "rank 0's work") -> Any:
    """Run ``function`` on rank 0 only and give its result to every rank. If it raises, every
    rank raises the same error, so no rank waits forever in a later collective."""
    if not context.active:
        return function()
    outcome: tuple[str, Any] | None = None
    if context.is_main:
        try:
            outcome = ("ok", function())
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised again
            outcome = ("error", error)
            original = error
    shared = broadcast_object(context, _picklable(outcome), what)
    if shared[0] == "error":
        if context.is_main:
            raise original
        raise shared[1]
    return shared[1]


def _picklable(outcome):
    """An error that does not pickle travels as its message."""
    if outcome is None or outcome[0] != "error":
        return outcome
    try:
        pickle.dumps(outcome[1])
        return outcome
    except Exception:  # noqa: BLE001
        return ("error", DistributedJobError(f"rank 0: {_first_line(outcome[1])}"))


@contextlib.contextmanager
def main_holds(context: Context, manager: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``manager()`` (e.g. a run folder's lock) on rank 0 only; if entering fails, every rank
    raises rank 0's error."""
    if not context.active:
        with manager():
            yield
        return
    with contextlib.ExitStack() as stack:

        def enter() -> None:
            stack.enter_context(manager())

        on_main(context, enter, "taking the run folder")
        yield


def agree(context: Context, function: Callable[[], Any], what: str = "a check") -> Any:
    """Run ``function`` on every rank; if it raises on any rank, every rank raises the first
    failing rank's error (checks that may fail on one rank only, e.g. its shard of the data)."""
    if not context.active:
        return function()
    try:
        result, failure = function(), None
    except Exception as error:  # noqa: BLE001 - shared, then raised again
        result, failure = None, error
    failures = gather_objects(context, _picklable(("error", failure))[1] if failure is not None else None, what)
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise failure if failure is not None else first
    return result


def sum_floats(context: Context, values: Iterable[float], what: str = "reducing metrics") -> list[float]:
    """Element-wise sums across ranks of a few python numbers (float64)."""
    values = [float(v) for v in values]
    if not context.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    with collective(context, what):
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def sum_tensor(context: Context, tensor: torch.Tensor, what: str = "reducing metrics") -> torch.Tensor:
    """``tensor`` summed across ranks (in place; returned)."""
    if context.active:
        with collective(context, what):
            dist.all_reduce(tensor)
    return tensor


def mean_rows(context: Context, values: torch.Tensor, rows: int) -> tuple[float, int]:
    """The mean over every rank of the first ``rows`` entries of each rank's ``values``, and their count."""
    if not context.active:
        return float(values.mean()), int(values.shape[0])
    total, count = sum_floats(context, [float(values[:rows].double().sum()) if rows else 0.0, rows], "reducing test metrics")
    return total / count, int(count)


def min_int(context: Context, value: int, what: str) -> int:
    if not context.active:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=context.device)
    with collective(context, what):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.cpu()[0])


def broadcast_module_state(context: Context, *modules: torch.nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers (DDP does the same at construction)."""
    if not context.active:
        return
    with collective(context, "sharing rank 0's parameters"), torch.no_grad():
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)


def average_buffers(context: Context, *modules: torch.nn.Module) -> None:
    """Average floating-point buffers (e.g. batch-norm running statistics) across ranks, so every
    rank validates and checkpoints the same module. Integer buffers agree already (counts)."""
    if not context.active:
        return
    buffers = [b for module in modules for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    with collective(context, "averaging buffers"), torch.no_grad():
        for buffer in buffers:
            dist.all_reduce(buffer)
            buffer.div_(context.world_size)


class GradientAverager:
    """After ``backward``: the rank's gradients, weighted by its share of the global batch, summed
    across ranks in one flat ``all_reduce``. With ``weight = rows * world_size / global_rows``
    the result is the gradient of the per-datapoint loss over the whole global batch, also for
    a last batch that does not split evenly.

    A parameter that got no gradient on a rank (``grad is None``) takes part with zeros, so every
    rank reduces the same buffer; afterwards it holds the average of the others' gradients."""

    def __init__(self, context: Context, parameters: list[torch.nn.Parameter]):
        self.context = context
        self.parameters = parameters
        # One flat buffer per dtype and device (usually one).
        self.groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for parameter in parameters:
            self.groups.setdefault((parameter.dtype, parameter.device), []).append(parameter)

    def __call__(self, weight: float) -> None:
        scale = weight / self.context.world_size
        with collective(self.context, "averaging gradients"):
            for parameters in self.groups.values():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
                if any(g.is_sparse for g in grads):
                    raise DistributedJobError("sparse gradients (nn.Embedding(sparse=True)) are not supported in a distributed run")
                flat = torch.cat([g.reshape(-1) for g in grads])
                if scale != 1.0:
                    flat.mul_(scale)
                dist.all_reduce(flat)
                offset = 0
                for parameter in parameters:
                    size = parameter.numel()
                    parameter.grad = flat[offset : offset + size].view_as(parameter)
                    offset += size


def shard_range(rows: int, context: Context) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``rows`` rows (sizes differ by at most one)."""
    base, extra = divmod(rows, context.world_size)
    lo = context.rank * base + min(context.rank, extra)
    return lo, lo + base + (1 if context.rank < extra else 0)


def mixed_seed(*parts: int) -> int:
    """A seed from integers (for ranks' random streams): deterministic, spread over 63 bits."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = ((value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF
