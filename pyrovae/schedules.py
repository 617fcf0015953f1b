"""Schedules: optimizer step (0, 1, 2, ...) -> value, for KL weights and temperatures.

Each is a small frozen dataclass, so it is saved with the run config and is a
pure function of the step: resuming at step t gives the value an unbroken run
would have had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyrovae.registry import SCHEDULES


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@SCHEDULES.register("constant")
@dataclass(frozen=True)
class Constant:
    """value(t) = value."""

    value: float = 1.0

    def __call__(self, step: int) -> float:
        return self.value


@SCHEDULES.register("linear")
@dataclass(frozen=True)
class LinearWarmup:
    """value(t) = start + (end - start) * min(1, t / warmup_steps)."""

    warmup_steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _require(self.warmup_steps > 0, f"linear schedule needs warmup_steps > 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(1.0, step / self.warmup_steps)


@SCHEDULES.register("logistic")
@dataclass(frozen=True)
class Logistic:
    """Bowman et al. 2016: value(t) = end / (1 + exp(-k (t - midpoint)))."""

    midpoint: int
    k: float = 0.0025
    end: float = 1.0

    def __post_init__(self):
        _require(self.k > 0, f"logistic schedule needs k > 0, got {self.k}")

    def __call__(self, step: int) -> float:
        exponent = -self.k * (step - self.midpoint)
        if exponent > 700:  # exp overflow: the curve is 0 to double precision there
            return 0.0
        return self.end / (1.0 + math.exp(exponent))


@SCHEDULES.register("cyclical")
@dataclass(frozen=True)
class Cyclical:
    """Fu et al. 2019: total_steps split into ``cycles`` periods of length P = total_steps / cycles.
    With tau = (t mod P) / P, value(t) = start + (end - start) * min(1, tau / ratio):
    a linear ramp over the first ``ratio`` of each cycle, then a plateau at ``end``.
    After total_steps the value stays at ``end``."""

    total_steps: int
    cycles: int = 4
    ratio: float = 0.5
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _require(self.total_steps > 0, f"cyclical schedule needs total_steps > 0, got {self.total_steps}")
        _require(self.cycles >= 1, f"cyclical schedule needs cycles >= 1, got {self.cycles}")
        _require(0 < self.ratio <= 1, f"cyclical schedule needs 0 < ratio <= 1, got {self.ratio}")

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.end
        period = self.total_steps / self.cycles
        tau = (step % period) / period
        return self.start + (self.end - self.start) * min(1.0, tau / self.ratio)


@SCHEDULES.register("capped_linear")
@dataclass(frozen=True)
class CappedLinear:
    """Liang et al. 2018: value(t) = min(cap, t / anneal_steps)."""

    anneal_steps: int
    cap: float = 1.0

    def __post_init__(self):
        _require(self.anneal_steps > 0, f"capped_linear schedule needs anneal_steps > 0, got {self.anneal_steps}")

    def __call__(self, step: int) -> float:
        return min(self.cap, step / self.anneal_steps)


@SCHEDULES.register("exponential_decay")
@dataclass(frozen=True)
class ExponentialDecay:
    """Temperatures (Jang et al. 2017): value(t) = max(minimum, initial * exp(-rate * t))."""

    rate: float
    initial: float = 1.0
    minimum: float = 0.5

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.initial * math.exp(-self.rate * step))
