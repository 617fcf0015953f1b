"""Schedules: optimizer step (0, 1, 2, ...) -> value, for KL weights and named inputs.

Each is a small frozen dataclass, so it is saved with the run config and is a
pure function of the step: resuming at step t gives the value an unbroken run
would have had.

Each schedule class declares the ``roles`` it fits: ``"beta"`` (a KL weight, under
``[anneal]`` and ``[anneal.sites.<site>]``) and/or ``"input"`` (a named input of the
model or guide, under ``[schedules.<input>]``: a temperature, a keep rate). A schedule
that declares no ``roles`` fits both.

:class:`StepSchedules` bundles what the fit loop drives: beta (one value, and one per
latent site where configured) and the scheduled inputs a model or guide declares with a
``scheduled_inputs = {name: default}`` class attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pyrovae.errors import ConfigError
from pyrovae.registry import SCHEDULES

ROLES = frozenset({"beta", "input"})
ROLE_PLACES = {"beta": "[anneal] and [anneal.sites.<site>] (KL weights)", "input": "[schedules.<input>] (named inputs)"}
# name -> class of the schedules defined here, so a refusal can list the ones that fit.
BUILT_IN: dict[str, type] = {}


def _schedule(name: str):
    def add(cls):
        BUILT_IN[name] = cls
        return SCHEDULES.register(name)(cls)

    return add


def roles_of(schedule) -> frozenset:
    """The roles a schedule (class or instance) declares; all of them when it declares none."""
    return frozenset(getattr(schedule, "roles", ROLES))


def schedules_for(role: str) -> list[str]:
    """Names of the built-in schedules that fit ``role``."""
    return sorted(name for name, cls in BUILT_IN.items() if role in roles_of(cls))


def check_role(schedule, role: str, where: str, name: str | None = None) -> None:
    """Refuse a schedule used in a role it does not declare (a temperature schedule as beta)."""
    roles = roles_of(schedule)
    if role in roles:
        return
    label = repr(name) if name else type(schedule).__name__
    meant = " and ".join(ROLE_PLACES[r] for r in sorted(roles) if r in ROLE_PLACES) or f"roles {sorted(roles)}"
    raise ConfigError(
        f"[{where}] schedule {label} is meant for {meant}, not for {ROLE_PLACES[role]}; "
        f"schedules that fit: {', '.join(schedules_for(role))}"
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@_schedule("constant")
@dataclass(frozen=True)
class Constant:
    """value(t) = value."""

    roles = ROLES

    value: float = 1.0

    def __call__(self, step: int) -> float:
        return self.value


@_schedule("linear")
@dataclass(frozen=True)
class LinearWarmup:
    """value(t) = start + (end - start) * min(1, t / warmup_steps)."""

    roles = ROLES

    warmup_steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _require(self.warmup_steps > 0, f"linear schedule needs warmup_steps > 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(1.0, step / self.warmup_steps)


@_schedule("autoencoder_pretraining")
@dataclass(frozen=True)
class AutoencoderPretraining:
    """Li et al. 2019 ("A surprisingly effective fix for deep latent variable modeling of text"),
    the first phase of their recipe: value(t) = 0 for t < steps (the pair trains as an autoencoder:
    reconstruction only), then ``value``.

    With ``reinitialize_decoder = true`` the fit loop re-draws the model's parameters (its
    decoder; the guide keeps what it learned) and their optimizer state once, just before step
    ``steps``, as Li et al. do. The second phase is whatever the objective says: with
    ``[objective] name = "free_bits"`` this is their recipe; any other objective, scheduled input
    or strategy combines with it."""

    roles = frozenset({"beta"})

    steps: int
    value: float = 1.0
    reinitialize_decoder: bool = False

    def __post_init__(self):
        _require(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
            f"autoencoder_pretraining needs steps >= 1 (optimizer steps at beta = 0), got {self.steps!r}",
        )
        _require(self.value >= 0, f"autoencoder_pretraining needs value >= 0 (the KL weight after pretraining), got {self.value}")

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.steps else self.value

    def reinitialize_model_at(self) -> int | None:
        """The step before which the model's parameters are re-drawn (None: never)."""
        return self.steps if self.reinitialize_decoder else None


@_schedule("logistic")
@dataclass(frozen=True)
class Logistic:
    """Bowman et al. 2016: value(t) = end / (1 + exp(-k (t - midpoint)))."""

    roles = ROLES

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


@_schedule("cyclical")
@dataclass(frozen=True)
class Cyclical:
    """Fu et al. 2019: total_steps split into ``cycles`` periods of length P = total_steps / cycles.
    With tau = (t mod P) / P, value(t) = start + (end - start) * min(1, tau / ratio):
    a linear ramp over the first ``ratio`` of each cycle, then a plateau at ``end``.
    After total_steps the value stays at ``end``."""

    roles = ROLES

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


@_schedule("capped_linear")
@dataclass(frozen=True)
class CappedLinear:
    """Liang et al. 2018: value(t) = min(cap, t / anneal_steps)."""

    roles = ROLES

    anneal_steps: int
    cap: float = 1.0

    def __post_init__(self):
        _require(self.anneal_steps > 0, f"capped_linear schedule needs anneal_steps > 0, got {self.anneal_steps}")

    def __call__(self, step: int) -> float:
        return min(self.cap, step / self.anneal_steps)


@_schedule("exponential_decay")
@dataclass(frozen=True)
class ExponentialDecay:
    """Temperatures (Jang et al. 2017): value(t) = max(minimum, initial * exp(-rate * t)).
    A schedule for named inputs only: it decays towards ``minimum``, never a KL weight."""

    roles = frozenset({"input"})

    rate: float
    initial: float = 1.0
    minimum: float = 0.5

    def __post_init__(self):
        _require(self.rate >= 0, f"exponential_decay needs rate >= 0 (a decay), got {self.rate}")
        _require(self.minimum >= 0, f"exponential_decay needs minimum >= 0, got {self.minimum}")
        _require(self.initial >= self.minimum, f"exponential_decay needs initial >= minimum, got {self.initial} < {self.minimum}")

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.initial * math.exp(-self.rate * step))


def declared_inputs(*parts) -> dict[str, float]:
    """name -> default of the scheduled inputs the parts declare (``scheduled_inputs``, a class
    attribute of a model or guide; the first part to declare a name gives its default)."""
    declared: dict[str, float] = {}
    for part in parts:
        for name, default in dict(getattr(part, "scheduled_inputs", None) or {}).items():
            declared.setdefault(name, float(default))
    return declared


def check_input_names(configured, declared: Mapping[str, float], where: str = "schedules") -> None:
    """A configured schedule must drive an input some part reads (catches typos)."""
    for name in configured:
        if name not in declared:
            raise ConfigError(
                f"[{where}.{name}] no part reads an input named {name!r}; the model and guide declare: "
                f"{', '.join(sorted(declared)) or '(none)'} (as scheduled_inputs)"
            )


@dataclass(frozen=True)
class StepSchedules:
    """What the fit loop drives at each step, as pure functions of the step.

    ``beta`` is the KL weight of every latent site (a schedule; one returning a dict
    ``{site: value}`` is taken as per-site values with 1 elsewhere); ``beta_by_site`` overrides
    it for the sites it names; ``inputs`` gives every scheduled input of the pair its
    schedule (defaults already filled in: see :meth:`for_pair`).
    """

    beta: Callable[[int], float] = field(default_factory=lambda: Constant(1.0))
    beta_by_site: Mapping[str, Callable[[int], float]] = field(default_factory=dict)
    inputs: Mapping[str, Callable[[int], float]] = field(default_factory=dict)

    @classmethod
    def for_pair(cls, model, guide, beta=None, beta_by_site=None, inputs=None) -> "StepSchedules":
        """Check the schedules against the pair and fill in the declared inputs' defaults.

        Raises :class:`ConfigError` for a temperature schedule used as beta, a per-site beta
        for a site the model does not declare, a schedule for an input no part declares, and
        a negative beta at step 0.
        """
        beta = beta if beta is not None else Constant(1.0)
        beta_by_site = dict(beta_by_site or {})
        check_role(beta, "beta", "anneal")
        for site, schedule in beta_by_site.items():
            check_role(schedule, "beta", f"anneal.sites.{site}")
        declared = declared_inputs(model, guide)
        configured = dict(inputs or {})
        check_input_names(configured, declared)
        for name, schedule in configured.items():
            check_role(schedule, "input", f"schedules.{name}")
        resolved = {name: configured.get(name, Constant(default)) for name, default in declared.items()}
        schedules = cls(beta=beta, beta_by_site=beta_by_site, inputs=resolved)
        first = beta(0)
        named = set(beta_by_site) | (set(first) if isinstance(first, Mapping) else set())
        try:
            latent = [site.name for site in model.latent_sites]
        except (AttributeError, NotImplementedError):
            latent = None  # a plain callable model declares nothing to compare with
        if latent is not None:
            for site in sorted(named):
                if site not in latent:
                    raise ConfigError(
                        f"[anneal.sites.{site}] {type(model).__name__} has no latent site {site!r} "
                        f"(its latent sites: {', '.join(latent) or '(none)'})"
                    )
        schedules.betas(0)  # beta >= 0
        return schedules

    def betas(self, step: int) -> tuple[float, dict[str, float]]:
        """(default beta, {site: beta}) at ``step``; raises ConfigError for a negative beta."""
        value = self.beta(step)
        if isinstance(value, Mapping):
            default, by_site = 1.0, {site: float(v) for site, v in value.items()}
        else:
            default, by_site = float(value), {}
        for site, schedule in self.beta_by_site.items():
            by_site[site] = float(schedule(step))
        if not default >= 0.0 or (by_site and not min(by_site.values()) >= 0.0):
            bad = {"[anneal]": default, **{f"[anneal.sites.{s}]": v for s, v in by_site.items()}}
            where, number = next((k, v) for k, v in bad.items() if not v >= 0.0)
            raise ConfigError(f"{where} schedule gives beta = {number!r} at step {step}; a KL weight must be >= 0")
        return default, by_site

    def input_values(self, step: int) -> dict[str, float]:
        """The scheduled inputs' values at ``step``, as python floats."""
        return {name: float(schedule(step)) for name, schedule in self.inputs.items()}

    def record(self, step: int) -> dict[str, float]:
        """The values at ``step`` for metrics.jsonl: ``beta``, ``beta/<site>``, ``schedule/<input>``."""
        default, by_site = self.betas(step)
        return {
            "beta": default,
            **{f"beta/{site}": value for site, value in by_site.items()},
            **{f"schedule/{name}": value for name, value in self.input_values(step).items()},
        }
