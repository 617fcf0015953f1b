"""The compiled training step: ``train.compile = "none" | "trace" | "torch"``.

An eager step runs the objective as Python: every ``pyro.sample`` walks Pyro's messenger stack
(plates, trace, replay, broadcast), builds its message, and scores its site. That bookkeeping
decides nothing that changes from one step to the next while the batch keeps its shapes: it only
decides *which tensor operations* run. A compiled step captures those operations once per batch
signature and replays them, so the bookkeeping runs at capture time only.

Capture, per batch signature (the shapes, dtypes and devices of the batch's tensors, its other
values, and which per-site KL weights are set), the second time the signature is seen (a shape
seen once is not worth its capture):

1. ``torch.fx``'s ``make_fx`` runs the objective once on *fake* tensors (shapes without data), with
   every parameter and buffer of the model and the guide, every batch tensor and the KL weights
   (as 0-dim tensors, so annealing does not force a new capture per step) as inputs. The result
   is a graph of tensor operations with no Pyro in it. Random draws are operations of the graph,
   so every replay draws afresh from torch's generator, exactly as the eager step would.
   Fake tensors have no values, so a model whose Python control flow reads a tensor's value
   (``if x.sum() > 0``, ``.item()``) cannot be captured: it runs eagerly, with a message. A
   captured graph is therefore never silently specialised to one batch's values.
2. ``"trace"`` replays the graph as it is: generated Python code with one call per tensor
   operation and torch's own autograd, nothing to compile. ``"torch"`` hands it to ``torch.compile``
   (Inductor, which fuses element-wise operations); that costs seconds to minutes per signature, so
   it pays off in long runs only.
3. The first replay of each signature is checked against the eager step on the same random draws:
   the loss, every metric and every gradient must agree (to float rounding). Otherwise, e.g. a
   custom ``torch.autograd.Function`` whose backward the graph cannot hold, or a tensor read from
   outside the model's parameters, the step falls back to eager for the rest of the run, with a
   message saying why.

Scheduled numbers in the batch (a Gumbel temperature, word dropout's keep probability) are
inputs too, as 0-dim tensors, so their schedules change no capture.

What stays eager: the first step (it runs with argument validation on), objectives that are not
``compilable`` (``pyro:`` objectives: Pyro's classes keep baselines across calls or take
gradients in their call), ``precision = "bf16"``, and a run whose batches keep changing signature (more
than ``MAX_SIGNATURES``: text batches trimmed to their longest row, say). The optimizer step
and gradient clipping run eagerly after the replayed forward and backward.

Aggressive mode's guide-only steps replay the same graph (the parameters are inputs of it): with
the model's parameters frozen (``requires_grad`` off) autograd computes no gradient for them, so
the decoder's weight gradients are skipped while the backward still reaches the guide through z.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from pyrovae.handlers import kl_scale, kl_scale_unless_one
from pyrovae.traces import preserved_rng

COMPILE_MODES = ("none", "trace", "torch")

# A run whose batches show more distinct signatures than this stops capturing and runs eagerly.
MAX_SIGNATURES = 8
# A signature is captured the time it is seen for this many times (before that its steps run
# eagerly): a shape seen once, such as an epoch's last, partial batch in a one-epoch run, costs no
# capture (about 0.1-0.3 s on the CPU for a small VAE).
CAPTURE_AT = 2


class _Pair(torch.nn.Module):
    """Model and guide under one root, so their parameters and buffers are named (each once, also
    where the guide reuses a module of the model) and swapped together (:func:`_call_swapped`)."""

    def __init__(self, model, guide):
        super().__init__()
        self.model = model
        self.guide = guide


class CaptureRefused(Exception):
    """The step cannot be captured; the message says why."""


class CompiledStep:
    """``step(batch, beta, by_site) -> (loss, metrics)``: the objective under KL weights ``beta``
    (and ``by_site``), from a captured graph where one holds, else eagerly (see the module)."""

    def __init__(self, mode: str, model, guide, objective, say: Callable[[str], None] = print, check: bool = True):
        if mode not in COMPILE_MODES:
            raise ValueError(f"train.compile = {mode!r} is not allowed: it must be one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.model, self.guide, self.objective = model, guide, objective
        self.say = say
        self.check = check
        self.pair = _Pair(model, guide)
        self._named_state = None
        # signature -> (runner, metric names, batch tensor names, weighted site names)
        self.graphs: dict[tuple, tuple] = {}
        self.sightings: dict[tuple, int] = {}
        self.disabled: str | None = None if mode != "none" else "train.compile = none"
        if self.disabled is None and getattr(objective, "compilable", True) is False:
            self._disable(f"objective {getattr(objective, 'name', type(objective).__name__)!r} keeps state across calls or takes gradients inside its call")

    @property
    def active(self) -> bool:
        return self.disabled is None

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self.say(f"train.compile = {self.mode!r}: running the step eagerly from here on: {reason}")

    # -- eager --------------------------------------------------------------------------------

    def eager(self, batch: Mapping, beta: float, by_site: Mapping[str, float]):
        with kl_scale_unless_one(beta, by_site):
            return self.objective(self.model, self.guide, batch)

    # -- compiled -----------------------------------------------------------------------------

    def __call__(self, batch: Mapping, beta: float, by_site: Mapping[str, float]):
        if self.disabled is not None:
            return self.eager(batch, beta, by_site)
        key = self._signature(batch, by_site)
        entry = self.graphs.get(key)
        if entry is None:
            self.sightings[key] = self.sightings.get(key, 0) + 1
            if self.sightings[key] < CAPTURE_AT:
                return self.eager(batch, beta, by_site)
            if len(self.graphs) >= MAX_SIGNATURES:
                self._disable(
                    f"the batches showed more than {MAX_SIGNATURES} distinct signatures (shapes or non-tensor "
                    "values), and each needs its own capture"
                )
                return self.eager(batch, beta, by_site)
            try:
                entry = self._capture(batch, by_site)
            except CaptureRefused as refused:
                self._disable(str(refused))
                return self.eager(batch, beta, by_site)
            except Exception as error:  # anything the tracer cannot follow
                self._disable(f"capture failed: {type(error).__name__}: {_first_line(error)}")
                return self.eager(batch, beta, by_site)
            self.graphs[key] = entry
            if self.check:
                return self._checked_replay(entry, batch, beta, by_site)
        return self._replay(entry, batch, beta, by_site)

    def _signature(self, batch: Mapping, by_site: Mapping[str, float]) -> tuple:
        items = []
        for name in sorted(batch):
            value = batch[name]
            if torch.is_tensor(value):
                items.append((name, tuple(value.shape), value.dtype, value.device.type, value.device.index, value.layout))
            elif _is_scheduled_number(value):
                items.append((name, "number"))  # an input of the graph: its value is not part of the key
            else:
                items.append((name, "value", repr(value)))
        # Which half is frozen (aggressive training's guide-only and model-only steps) is part of the
        # key: a captured graph keeps the kernels chosen for it (a frozen CPU decoder LSTM runs the
        # native kernel, a trained one oneDNN's), so each kind of step gets its own capture.
        frozen = tuple(not any(p.requires_grad for p in part.parameters()) for part in (self.model, self.guide))
        return (tuple(items), tuple(sorted(by_site)), self.model.training, self.guide.training, torch.is_grad_enabled(), frozen)

    def _state(self) -> tuple[list[str], list[torch.Tensor]]:
        """Names and tensors of every parameter and buffer of the pair (each once). The tensors
        keep their identity for the whole run (recovery and resume load into them in place)."""
        if self._named_state is None:
            named = dict(self.pair.named_parameters())
            named.update(self.pair.named_buffers())
            self._named_state = (list(named), list(named.values()))
        return self._named_state

    def _inputs(self, batch, beta, by_site, tensor_keys, site_names):
        _, state = self._state()
        device = state[0].device if state else None
        weights = [torch.as_tensor(float(beta), device=device)] + [torch.as_tensor(float(by_site[s]), device=device) for s in site_names]
        tensors = [batch[k] if torch.is_tensor(batch[k]) else torch.as_tensor(float(batch[k]), device=device) for k in tensor_keys]
        return [*state, *tensors, *weights]

    def _capture(self, batch: Mapping, by_site: Mapping[str, float]):
        from torch.fx.experimental.proxy_tensor import make_fx

        names, state = self._state()
        # Batch tensors, and scheduled numbers (a temperature, word dropout's keep probability) as
        # 0-dim tensors, are inputs; other values are constants of the capture (and of its key).
        tensor_keys = [k for k in sorted(batch) if torch.is_tensor(batch[k]) or _is_scheduled_number(batch[k])]
        if any(torch.is_tensor(batch[k]) and batch[k].layout != torch.strided for k in tensor_keys):
            raise CaptureRefused("the batch holds sparse tensors")
        constants = {k: v for k, v in batch.items() if k not in tensor_keys}
        site_names = sorted(by_site)
        metric_keys: list[str] = []
        pair, objective = self.pair, self.objective
        count = len(state)

        def step(*inputs):
            swapped = dict(zip(names, inputs[:count]))
            tensors = dict(zip(tensor_keys, inputs[count : count + len(tensor_keys)]))
            beta, *site_betas = inputs[count + len(tensor_keys) :]
            run_batch = {**constants, **tensors}

            def run(model, guide):
                with kl_scale(dict(zip(site_names, site_betas)), default=beta):
                    return objective(model, guide, run_batch)

            loss, metrics = _call_swapped(pair, swapped, run)
            metric_keys[:] = list(metrics)
            return (loss, *metrics.values())

        example = self._inputs(batch, 1.0, dict.fromkeys(site_names, 1.0), tensor_keys, site_names)
        with preserved_rng():
            try:
                graph = make_fx(step, tracing_mode="fake")(*example)
            except Exception as error:
                if "data-dependent" in str(error).lower() or "DataDependent" in type(error).__name__ or type(error).__name__ == "DynamicOutputShapeException":
                    raise CaptureRefused(
                        "the model, guide or objective reads a tensor's value in Python control flow "
                        f"({_first_line(error)}), so one captured graph cannot stand for every batch"
                    ) from None
                raise
        # Pyro's bookkeeping leaves results nobody reads (log-density sums of the trace, scale
        # products): drop them. Operations with effects (in-place updates, draws) stay.
        graph.graph.eliminate_dead_code()
        graph.recompile()
        stale = [name for name, value in _graph_constants(graph) if value.requires_grad]
        if stale:
            raise CaptureRefused(f"the step reads tensors that require gradients but are not parameters of the model or guide ({', '.join(stale[:3])})")
        if self.mode == "trace":
            # The graph's own Python code: one call per tensor operation, with torch's autograd.
            # (A TorchScript replay of the same graph measured slower here: its backward and the
            # optimizer step after it cost more than the Python it saves.)
            runner = graph
        else:
            # fallback_random: draw with torch's own generator, so the draws are the eager step's.
            runner = torch.compile(graph, dynamic=False, options={"fallback_random": True})
        return runner, list(metric_keys), tensor_keys, site_names

    def _replay(self, entry, batch, beta, by_site):
        runner, metric_keys, tensor_keys, site_names = entry
        outputs = runner(*self._inputs(batch, beta, by_site, tensor_keys, site_names))
        loss, values = outputs[0], outputs[1:]
        return loss, {key: value.detach() for key, value in zip(metric_keys, values)}

    def _checked_replay(self, entry, batch, beta, by_site):
        """The first replay of a signature, against the eager step on the same draws."""
        _, state = self._state()
        trainable = [t for t in state if t.requires_grad]
        buffers = [t for t in state if not t.requires_grad]
        saved = [t.clone() for t in buffers]
        with preserved_rng():
            eager_loss, eager_metrics = self.eager(batch, beta, by_site)
            eager_grads = torch.autograd.grad(eager_loss, trainable, allow_unused=True)
        with torch.no_grad():  # the step moves running statistics once, in the replay
            for tensor, value in zip(buffers, saved):
                tensor.copy_(value)
        loss, metrics = self._replay(entry, batch, beta, by_site)
        grads = torch.autograd.grad(loss, trainable, allow_unused=True, retain_graph=True)
        problem = _difference("loss", eager_loss.detach(), loss.detach())
        for key in eager_metrics:
            problem = problem or _difference(f"metric {key!r}", eager_metrics[key], metrics.get(key))
        names = [n for n, t in zip(self._state()[0], state) if t.requires_grad]
        for name, expected, got in zip(names, eager_grads, grads):
            problem = problem or _difference(f"the gradient of {name}", expected, got)
        if problem:
            self.graphs.clear()
            self._disable(f"the captured step disagrees with the eager one on the same draws ({problem})")
        return loss, metrics


def _call_swapped(pair: _Pair, swapped: dict, run):
    """``run(model, guide)`` with the pair's parameters and buffers replaced by ``swapped``
    (name -> tensor, named as ``pair.named_parameters()`` and ``named_buffers()`` name them).

    Every slot holding a swapped tensor is swapped, also where several modules hold it (a guide
    that reuses a module of the model), and restored on the way out."""
    replacement = {id(tensor): swapped[name] for name, tensor in (*pair.named_parameters(), *pair.named_buffers()) if name in swapped}
    slots = []
    for module in pair.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and id(tensor) in replacement:
                    slots.append((table, key, tensor))
    try:
        for table, key, tensor in slots:
            table[key] = replacement[id(tensor)]
        return run(pair.model, pair.guide)
    finally:
        for table, key, tensor in slots:
            table[key] = tensor


def _is_scheduled_number(value) -> bool:
    return isinstance(value, float)


def _graph_constants(graph: torch.fx.GraphModule):
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = getattr(graph, node.target, None)
            if torch.is_tensor(value):
                yield node.target, value


def _difference(what: str, expected, got) -> str | None:
    if expected is None and got is None:
        return None
    if expected is None or got is None:
        return f"{what}: present in one step only"
    if expected.shape != got.shape:
        return f"{what}: shape {tuple(got.shape)} against {tuple(expected.shape)}"
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    tolerance = 1e-4 * max(scale, 1.0)
    gap = float((expected.detach() - got.detach()).abs().max()) if expected.numel() else 0.0
    if not math.isfinite(gap) and not bool(torch.equal(expected.isfinite(), got.isfinite())):
        return f"{what}: non-finite in one step only"
    if gap > tolerance:
        return f"{what} differs by {gap:.3g}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
