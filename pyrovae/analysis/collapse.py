"""Is the latent used? A diagnosis of posterior collapse from the numbers ``pyrovae analyze``
measures (KL per dimension, active units, I(x; z)) and the run's training records
(``metrics.jsonl``), with the remedies pyrovae has and the TOML lines that switch them on.

Verdicts, in the order they are tried:

- **collapsed**: I(x; z) is near 0 (below ``COLLAPSED_NATS``) and either the KL is near 0 too
  (q(z | x) is the prior for every x) or no unit is active (the KL is paid to move q(z | x) off
  the prior alike for every x, as free bits allow, not to encode x): the decoder ignores z.
- **lagging guide** (He et al. 2019): over training after the KL weight stopped changing, the
  guide's information (``valid/mutual_information`` where the run recorded it, else the validation
  KL, an upper bound on it) fell below half its peak while the validation ELBO kept improving: the
  model learns to do without z faster than the guide learns to encode x.
- **partly collapsed**: n of d dimensions carry information (KL_d > ``INFORMATIVE_NATS`` and
  active: Cov_x E_q[z_d | x] above the active-unit threshold); the others do not.
- **healthy**: every dimension carries information and the information did not fall in training.

The numbers behind a verdict are in the returned :class:`CollapseDiagnosis` and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# KL (summed over a model's continuous sites) and I(x; z) below this many nats: collapsed.
COLLAPSED_NATS = 0.1
# A dimension with KL_d above this many nats carries information about x.
INFORMATIVE_NATS = 0.05
# The report also counts dimensions above this (a dimension holds at most about KL_d nats of I(x; z_d)).
STRONG_NATS = 0.5
# The information measure "fell" when its last value is below this share of its peak.
FALL_SHARE = 0.5

REMEDIES = (
    (
        "free bits (Kingma et al. 2016): each dimension's KL counts as at least lambda nats, so the optimizer stops pushing it to 0",
        '[objective]\nname = "free_bits"\nobjective = "meanfield_elbo"\nthreshold = 0.1\nper = "dimension"',
    ),
    (
        "cyclical KL annealing (Fu et al. 2019): the KL weight ramps from 0 to 1 several times, so the guide relearns to encode x",
        '[anneal]\nname = "cyclical"\ntotal_steps = 10000   # the run\'s steps\ncycles = 4\nratio = 0.5',
    ),
    (
        "aggressive guide updates (He et al. 2019): the guide is trained to convergence before each model step while I(x; z) rises",
        '[train]\nstrategy = "aggressive"\naggressive_check_every = 2\naggressive_max_steps = 10',
    ),
    (
        "word dropout (Bowman et al. 2016; sentence VAEs): the decoder sees only some of the previous words and must read z",
        '[schedules.word_keep]\nname = "constant"\nvalue = 0.7',
    ),
    (
        "a weaker decoder (Yang et al. 2017; sentence VAEs): a dilated CNN with a short receptive field cannot model the sentence alone",
        '[model]\ndecoder = "dilated_cnn"\ndilations = [1, 2, 4, 8]',
    ),
)


@dataclass
class SiteUse:
    """One continuous site: KL per dimension (nats), active units and their count."""

    site: str
    kl_per_dimension: list[float]
    active: int
    dims: int
    active_mask: list[bool] = field(default_factory=list)

    @property
    def kl(self) -> float:
        return float(sum(self.kl_per_dimension))

    @property
    def informative(self) -> int:
        """Dimensions with KL_d > INFORMATIVE_NATS whose guide mean moves with x (active)."""
        mask = self.active_mask if len(self.active_mask) == len(self.kl_per_dimension) else [True] * len(self.kl_per_dimension)
        return int(sum(value > INFORMATIVE_NATS and moving for value, moving in zip(self.kl_per_dimension, mask)))

    @property
    def strong(self) -> int:
        return int(sum(value > STRONG_NATS for value in self.kl_per_dimension))


@dataclass
class Trend:
    """The information measure over training (after the KL weight settled) and the ELBO."""

    measure: str  # "valid/mutual_information" or "valid/kl"
    epochs: list[int]
    values: list[float]
    elbo: list[float]

    @property
    def peak(self) -> float:
        return max(self.values) if self.values else math.nan

    def fell_while_elbo_improved(self) -> bool:
        if len(self.values) < 3:
            return False
        top = int(np.argmax(self.values))
        if top == len(self.values) - 1 or self.values[top] <= COLLAPSED_NATS:
            return False
        fell = self.values[-1] < FALL_SHARE * self.values[top]
        improved = self.elbo[-1] > self.elbo[top]
        return bool(fell and improved)


@dataclass
class CollapseDiagnosis:
    verdict: str
    reason: str
    sites: list[SiteUse]
    mutual_information: float | None
    mutual_information_ceiling: float
    trend: Trend | None = None
    remedies: tuple = field(default=REMEDIES)

    @property
    def kl(self) -> float:
        return float(sum(site.kl for site in self.sites))

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "kl": self.kl,
            "informative_dims": sum(site.informative for site in self.sites),
            "strong_dims": sum(site.strong for site in self.sites),
            "dims": sum(site.dims for site in self.sites),
            "active_units": sum(site.active for site in self.sites),
            "mutual_information": self.mutual_information,
            "mutual_information_ceiling": self.mutual_information_ceiling,
            "trend": None if self.trend is None else {"measure": self.trend.measure, "epochs": self.trend.epochs, "values": self.trend.values, "elbo": self.trend.elbo},
        }


def information_trend(history: Sequence[Mapping] | None, sites: Sequence[str]) -> Trend | None:
    """The validation records of ``metrics.jsonl`` after the KL weight (``beta``) reached its last
    value: ``valid/mutual_information`` where recorded, else ``valid/kl/<site>`` summed over the
    continuous sites; with ``valid/elbo``. None without at least three such records."""
    records = [record for record in (history or []) if "valid/elbo" in record]
    if not records:
        return None
    final_beta = records[-1].get("beta")
    if final_beta is not None and not isinstance(final_beta, dict):
        settled = [i for i, record in enumerate(records) if record.get("beta") != final_beta]
        records = records[(settled[-1] + 1) if settled else 0 :]
    if all("valid/mutual_information" in record for record in records):
        measure, values = "valid/mutual_information", [float(record["valid/mutual_information"]) for record in records]
    else:
        keys = [f"valid/kl/{site}" for site in sites]
        if not keys or not all(key in record for record in records for key in keys):
            return None
        measure, values = "valid/kl", [float(sum(record[key] for key in keys)) for record in records]
    if len(values) < 3:
        return None
    return Trend(measure, [int(record.get("epoch", i)) for i, record in enumerate(records)], values, [float(r["valid/elbo"]) for r in records])


def diagnose_collapse(
    kl: Mapping[str, object],
    activity: Mapping[str, Sequence[float]],
    active_threshold: float,
    mutual_information: float | None,
    count: int,
    history: Sequence[Mapping] | None = None,
) -> CollapseDiagnosis:
    """The verdict (see the module docstring) from ``kl`` (site -> KL per dimension, nats: the
    values of :func:`pyrovae.analysis.kl_per_dimension`), ``activity`` (site -> Cov_x E_q[z_d | x]
    per dimension), I(x; z) on ``count`` points, and the run's ``metrics.jsonl`` records."""
    sites = []
    for name, values in kl.items():
        per_dim = np.atleast_1d(np.asarray(getattr(values, "values", values), dtype=np.float64)).reshape(-1).tolist()
        act = np.atleast_1d(np.asarray(activity.get(name, []), dtype=np.float64)).reshape(-1)
        mask = (act > active_threshold).tolist() if act.size == len(per_dim) else []
        sites.append(SiteUse(name, per_dim, int((act > active_threshold).sum()), len(per_dim), mask))
    ceiling = math.log(count) if count > 1 else 0.0
    trend = information_trend(history, [site.site for site in sites])
    total = float(sum(site.kl for site in sites))
    mi = mutual_information
    informative = sum(site.informative for site in sites)
    dims = sum(site.dims for site in sites)
    if not sites:
        return CollapseDiagnosis("healthy", "the pair has no continuous latent to collapse", sites, mi, ceiling, trend)
    active = sum(site.active for site in sites)
    quiet = mi is None or mi < COLLAPSED_NATS
    if quiet and (total < COLLAPSED_NATS or (mi is not None and active == 0)):
        if total < COLLAPSED_NATS:
            reason = f"KL {total:.3f} nats" + (f" and I(x; z) {mi:.3f} nats" if mi is not None else "") + f" are near 0 (below {COLLAPSED_NATS}): q(z | x) is the prior for every x"
        else:
            reason = (
                f"I(x; z) is {mi:.3f} nats and no unit is active, although the KL is {total:.3g} nats: the KL moves q(z | x) off "
                "the prior alike for every x (free bits allow this) instead of encoding x"
            )
        if trend is not None and trend.fell_while_elbo_improved():
            reason += f"; {trend.measure} fell from {trend.peak:.3g} while the ELBO improved (a lagging guide, He et al. 2019)"
        return CollapseDiagnosis("collapsed", reason, sites, mi, ceiling, trend)
    if trend is not None and trend.fell_while_elbo_improved():
        reason = (
            f"{trend.measure} fell from {trend.peak:.3g} to {trend.values[-1]:.3g} after epoch {trend.epochs[int(np.argmax(trend.values))]} "
            f"while the validation ELBO improved from {trend.elbo[int(np.argmax(trend.values))]:.4g} to {trend.elbo[-1]:.4g}"
        )
        return CollapseDiagnosis("lagging guide", reason, sites, mi, ceiling, trend)
    if informative < dims:
        reason = f"{informative} of {dims} dimensions carry information (KL_d > {INFORMATIVE_NATS} nats and active); the others do not"
        return CollapseDiagnosis("partly collapsed", reason, sites, mi, ceiling, trend)
    return CollapseDiagnosis("healthy", f"all {dims} dimensions carry information (KL_d > {INFORMATIVE_NATS} nats and active)", sites, mi, ceiling, trend)
