"""Is the latent used? A diagnosis of posterior collapse from the numbers ``pyrovae analyze``
measures (KL per dimension, active units, I(x; z)) and the run's training records
(``metrics.jsonl``), with the remedies pyrovae has that fit the run (:func:`remedies_for`) and the
TOML lines that switch them on.

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

# Free bits wrap these objectives only (pyrovae.objectives.regularized.WRAPPABLE).
FREE_BITS_INNER = ("elbo", "meanfield_elbo")
# The weaker decoder's dilations: the longest prefix whose receptive field is shorter than the sentences.
SHORT_DILATIONS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Remedy:
    """One remedy: what it does (``about``) and the TOML that switches it on for this run (None
    where it is a change of a value the report cannot read, said in ``about``)."""

    about: str
    toml: str | None = None


@dataclass(frozen=True)
class RunSteps:
    """The run's length from ``metrics.jsonl``: ``steps`` (the last record's ``step``) over
    ``epochs`` (its ``epoch``)."""

    steps: int
    epochs: int

    @property
    def per_epoch(self) -> int | None:
        return self.steps // self.epochs if self.epochs > 0 and self.steps % self.epochs == 0 else None


def run_steps(history: Sequence[Mapping] | None) -> RunSteps | None:
    """The steps and epochs of the last record of ``history`` that has both; None without one."""
    for record in reversed(list(history or [])):
        if isinstance(record.get("step"), int) and isinstance(record.get("epoch"), int) and record["step"] > 0:
            return RunSteps(record["step"], record["epoch"])
    return None


def uses_free_bits(objective: str | None, history: Sequence[Mapping] | None = None) -> bool:
    """Whether the run's objective is free bits: its name, or its metrics in ``metrics.jsonl``."""
    return objective == "free_bits" or any(key.endswith("free_bits/groups") for record in (history or []) for key in record)


def _final(history: Sequence[Mapping] | None, key: str) -> float | None:
    for record in reversed(list(history or [])):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _number(value: float) -> str:
    return repr(float(value)) if float(value) != int(value) else f"{float(value):.1f}"


def _free_bits_remedy(objective: str | None, history) -> Remedy | None:
    about = "free bits (Kingma et al. 2016): each dimension's KL counts as at least lambda nats, so the optimizer stops pushing it to 0"
    if uses_free_bits(objective, history):
        return Remedy(
            "the run already uses free bits: a larger `threshold` (nats per dimension) in its `[objective]` table holds each "
            "dimension's KL up further"
        )
    if objective == "enum_elbo":
        return None  # free bits wrap elbo / meanfield_elbo, which would sample the enumerated sites: refused
    inner = objective if objective in FREE_BITS_INNER else "elbo"
    if objective is not None and objective not in FREE_BITS_INNER:
        about += f"; free bits wrap `elbo` or `meanfield_elbo` only, so this trains with `elbo` instead of the run's `{objective}`"
    return Remedy(about, f'[objective]\nname = "free_bits"\nobjective = "{inner}"\nthreshold = 0.1\nper = "dimension"')


def _cyclical_remedy(history) -> Remedy:
    beta = _final(history, "beta")
    end = beta if beta is not None and beta > 0 else 1.0  # the run's KL weight (1 where it had none or 0)
    about = f"cyclical KL annealing (Fu et al. 2019): the KL weight ramps from 0 to {end:g} several times, so the guide relearns to encode x"
    length = run_steps(history)
    lines = ['[anneal]', 'name = "cyclical"']
    if length is None:
        about += "; set `total_steps` to the run's steps: epochs x steps per epoch (ceil(training rows / batch_size)), the last `step` in its metrics.jsonl"
        lines.append("# total_steps = epochs x steps per epoch")
    else:
        split = f": {length.epochs} epochs x {length.per_epoch} steps" if length.per_epoch is not None else f" in {length.epochs} epochs"
        lines.append(f"total_steps = {length.steps}   # this run's {length.steps} steps{split}")
    lines += ["cycles = 4", "ratio = 0.5"] + ([f"end = {_number(end)}   # this run's KL weight"] if end != 1.0 else [])
    return Remedy(about, "\n".join(lines))


def _weight_remedy(history) -> Remedy | None:
    beta = _final(history, "beta")
    if beta is None or beta <= 1.0:
        return None
    return Remedy(
        f"a KL weight of 1 (the ELBO): the run ends with beta = {beta:g}, and a weight above 1 pays for closeness to the prior "
        "with information about x (Higgins et al. 2017)",
        '[anneal]\nname = "constant"\nvalue = 1.0',
    )


def _aggressive_remedy(history) -> Remedy | None:
    if any("aggressive" in record for record in (history or [])):
        return None  # the run already trained so
    return Remedy(
        "aggressive guide updates (He et al. 2019): the guide is trained to convergence before each model step while I(x; z) rises",
        '[train]\nstrategy = "aggressive"\naggressive_check_every = 2\naggressive_max_steps = 10',
    )


def _word_dropout_remedy(model, guide, history) -> Remedy | None:
    from pyrovae.schedules import declared_inputs

    if "word_keep" not in declared_inputs(model, guide):
        return None  # the pair reads no word_keep: not a sentence model
    keep = _final(history, "schedule/word_keep")
    about = "word dropout (Bowman et al. 2016): the decoder sees only some of the previous words and must read z"
    value = 0.7
    if keep is not None and keep < 1.0:
        value = round(max(0.0, keep - 0.3), 2)
        about += f"; the run kept {keep:g} of the words, so keep fewer"
    return Remedy(about, f'[schedules.word_keep]\nname = "constant"\nvalue = {value}')


def _receptive_field(kernel_size: int, dilations) -> int:
    return 1 + (kernel_size - 1) * sum(dilations)


def _decoder_remedy(model, sentence_length: float | None) -> Remedy | None:
    """The dilated-CNN decoder, where the run's model has that option (its config accepts it) and
    its receptive field would be shorter than the model's present one."""
    import dataclasses

    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or not all(hasattr(config, name) for name in ("decoder", "dilations", "kernel_size")):
        return None
    kernel = int(config.kernel_size)
    dilations = [1]
    for dilation in SHORT_DILATIONS[1:]:
        if sentence_length is not None and _receptive_field(kernel, dilations + [dilation]) >= sentence_length:
            break
        dilations.append(dilation)
        if sentence_length is None and len(dilations) == 2:
            break
    field_now = _receptive_field(kernel, config.dilations) if config.decoder == "dilated_cnn" else math.inf
    if _receptive_field(kernel, dilations) >= field_now:
        return None  # the run's decoder is as weak already
    try:
        dataclasses.replace(config, decoder="dilated_cnn", dilations=dilations)
    except (TypeError, ValueError):
        return None  # the model's config refuses it
    width = _receptive_field(kernel, dilations)
    about = (
        f"a weaker decoder (Yang et al. 2017): a dilated CNN that sees only the last {width} words (1 + (kernel_size - 1) "
        "x sum of dilations) cannot model the sentence alone"
    )
    if sentence_length is not None:
        about += f"; the test sentences average {sentence_length:.1f} tokens"
    lines = ["[model]"] + ([] if config.decoder == "dilated_cnn" else ['decoder = "dilated_cnn"']) + [f"dilations = {dilations}"]
    return Remedy(about, "\n".join(lines))


def remedies_for(model, guide, objective: str | None = None, history: Sequence[Mapping] | None = None, sentence_length: float | None = None) -> list[Remedy]:
    """The remedies that fit this run: the pair (``model``, ``guide``), its objective's name, its
    ``metrics.jsonl`` records (steps, the KL weight, scheduled inputs) and, for sentences, the test
    rows' mean length. Each TOML is valid for the run: word dropout only where the pair reads
    ``word_keep``, the decoder only where the model's config has that option."""
    found = [
        _free_bits_remedy(objective, history),
        _weight_remedy(history),
        _cyclical_remedy(history),
        _aggressive_remedy(history),
        _word_dropout_remedy(model, guide, history),
        _decoder_remedy(model, sentence_length),
    ]
    return [remedy for remedy in found if remedy is not None]


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
    remedies: list[Remedy] = field(default_factory=list)

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
            "remedies": [{"about": remedy.about, "toml": remedy.toml} for remedy in self.remedies],
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
    *,
    free_bits: bool = False,
    remedies: Sequence[Remedy] = (),
) -> CollapseDiagnosis:
    """The verdict (see the module docstring) from ``kl`` (site -> KL per dimension, nats: the
    values of :func:`pyrovae.analysis.kl_per_dimension`), ``activity`` (site -> Cov_x E_q[z_d | x]
    per dimension), I(x; z) on ``count`` points, and the run's ``metrics.jsonl`` records;
    ``free_bits``: the run's objective holds the KL up (:func:`uses_free_bits`); ``remedies`` (of
    :func:`remedies_for`) go with a verdict other than healthy."""
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
                f"the prior alike for every x{' (free bits allow this)' if free_bits else ''} instead of encoding x"
            )
        if trend is not None and trend.fell_while_elbo_improved():
            reason += f"; {trend.measure} fell from {trend.peak:.3g} while the ELBO improved (a lagging guide, He et al. 2019)"
        return CollapseDiagnosis("collapsed", reason, sites, mi, ceiling, trend, list(remedies))
    if trend is not None and trend.fell_while_elbo_improved():
        reason = (
            f"{trend.measure} fell from {trend.peak:.3g} to {trend.values[-1]:.3g} after epoch {trend.epochs[int(np.argmax(trend.values))]} "
            f"while the validation ELBO improved from {trend.elbo[int(np.argmax(trend.values))]:.4g} to {trend.elbo[-1]:.4g}"
        )
        return CollapseDiagnosis("lagging guide", reason, sites, mi, ceiling, trend, list(remedies))
    if informative < dims:
        reason = f"{informative} of {dims} dimensions carry information (KL_d > {INFORMATIVE_NATS} nats and active); the others do not"
        return CollapseDiagnosis("partly collapsed", reason, sites, mi, ceiling, trend, list(remedies))
    return CollapseDiagnosis("healthy", f"all {dims} dimensions carry information (KL_d > {INFORMATIVE_NATS} nats and active)", sites, mi, ceiling, trend)
