"""Model comparison on the same test points (``pyrovae compare RUN_A RUN_B ...``).

Each run's ``analysis/posterior.nc`` (from ``pyrovae analyze``) holds, per test point n, the
importance-sampled log p(x_n) (``sample_stats.log_marginal_likelihood``) and the Pareto k-hat of
the weights behind it. A VAE's decoder parameters are point estimates and its latents are local,
so the expected log predictive density of a new point is E log p(x), estimated on the N test
points by

    elpd = sum_n log p(x_n),   se = sqrt(N) sd_n(log p(x_n)),

and two runs A, B on the same points differ by sum_n d_n, d_n = log p_A(x_n) - log p_B(x_n),
with the paired standard error sqrt(N) sd_n(d_n) (much smaller than se_A and se_B together when
the runs agree on which points are hard). :func:`elpd_data` wraps a run's numbers in ArviZ's own
comparison object, so ``az.compare`` ranks the runs (its ``elpd_diff`` and ``dse`` are the sums
and paired standard errors above) and ``az.plot_compare`` draws them, on ArviZ 0.x and 1.x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pyrovae.analysis import arviz_compat
from pyrovae.analysis.arviz_compat import from_netcdf, group, has_group
from pyrovae.analysis.diagnostics import PARETO_K_BAD
from pyrovae.analysis.plots import plt
from pyrovae.errors import ConfigError
from pyrovae.files import save_figure, write_text_atomically

POSTERIOR_PATH = Path("analysis") / "posterior.nc"
# A run whose share of points with k-hat > 0.7 exceeds this gets a warning: its log p(x) is unreliable.
UNRELIABLE_SHARE = 0.1


def elpd_data(idata, good_k: float = PARETO_K_BAD):
    """ArviZ's ``ELPDData`` of a ``posterior.nc`` written by pyrovae: elpd = sum_n log p(x_n)
    (``sample_stats.log_marginal_likelihood``), p = 0, se, pointwise values and the importance
    weights' k-hat per point as ``pareto_k``. For ``az.compare({name: elpd_data(idata), ...})``."""
    if not has_group(idata, "sample_stats") or "log_marginal_likelihood" not in group(idata, "sample_stats"):
        raise ValueError("not a pyrovae posterior file: no sample_stats.log_marginal_likelihood (write it with pyrovae analyze)")
    stats = group(idata, "sample_stats")
    pointwise = stats["log_marginal_likelihood"].astype("float64").reset_coords(drop=True)
    pareto_k = stats["pareto_k"].astype("float64").reset_coords(drop=True)
    samples = int(group(idata, "guide_draws").attrs.get("num_samples", 0)) if has_group(idata, "guide_draws") else 0
    return arviz_compat.elpd_data(pointwise, pareto_k, samples, good_k)


@dataclass
class RunScores:
    name: str
    path: Path
    log_p: np.ndarray  # (N,) importance-sampled log p(x_n)
    pareto_k: np.ndarray
    samples: int
    idata: object

    @property
    def share_unreliable(self) -> float:
        return float(np.mean(self.pareto_k > PARETO_K_BAD))


@dataclass
class Comparison:
    """What :func:`compare_runs` wrote: ``rows`` (one dict per run, best first), ``table`` (the
    ``az.compare`` DataFrame), ``warnings`` and the files."""

    rows: list[dict]
    table: object
    warnings: list[str]
    markdown: Path
    csv: Path
    figure: Path


def _names(paths: Sequence[Path]) -> list[str]:
    names = [path.name or str(path) for path in paths]
    if len(set(names)) < len(names):
        names = [str(path) for path in paths]
    return names


def load_scores(run_dirs: Sequence[str | Path]) -> list[RunScores]:
    """Each run's per-point log p(x) and k-hat from ``RUN/analysis/posterior.nc``; refuses (one
    line) a missing file, or runs that were not analysed on the same test points (the same
    ``obs`` indices and the same observed ``x``)."""
    paths = [Path(run) for run in run_dirs]
    if len(paths) < 2:
        raise ConfigError("compare needs at least two runs")
    seen: dict = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{path} is given twice (also as {seen[key]}); compare needs different runs")
        seen[key] = path
    scores = []
    reference = None
    for name, path in zip(_names(paths), paths):
        posterior = path / POSTERIOR_PATH
        if not posterior.exists():
            raise ConfigError(f"{path}: no {POSTERIOR_PATH}; run `pyrovae analyze {path}` first")
        idata = from_netcdf(posterior)
        stats = group(idata, "sample_stats")
        if "log_marginal_likelihood" not in stats:
            raise ConfigError(f"{posterior}: written by an older pyrovae (no sample_stats.log_marginal_likelihood); run `pyrovae analyze {path}` again")
        observed = group(idata, "observed_data")["x"]
        if reference is None:
            reference = (name, observed)
        else:
            first_name, first = reference
            same = observed.shape == first.shape and np.array_equal(observed.coords["obs"].values, first.coords["obs"].values)
            if not same or not np.array_equal(observed.values, first.values):
                raise ConfigError(
                    f"{name} and {first_name} were analysed on different test points; analyse both with the same data and --test-examples"
                )
        samples = int(group(idata, "guide_draws").attrs.get("num_samples", 0))
        scores.append(
            RunScores(name, path, stats["log_marginal_likelihood"].values.astype(np.float64), stats["pareto_k"].values.astype(np.float64), samples, idata)
        )
    return scores


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(sum_n d_n, sqrt(N) sd_n(d_n)) of d = a - b: the difference of the summed log p(x) and its
    paired standard error."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.sum()), float(math.sqrt(d.size) * d.std()) if d.size > 1 else 0.0


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Comparison:
    """Compare runs on the same test points into ``out_dir``: ``compare.md`` (the table, the
    warnings and the plot), ``compare.csv`` and ``compare.png`` (``az.plot_compare``). Per run:
    N, the sum and mean of log p(x_n) with their standard errors, the paired difference to the
    best run with its standard error, the share of points with k-hat > 0.7 and ArviZ's stacking
    weight. A run with more than ``UNRELIABLE_SHARE`` of its points above 0.7 gets a warning."""
    scores = load_scores(run_dirs)
    elpds = {score.name: elpd_data(score.idata) for score in scores}
    table = arviz_compat.compare(elpds)
    order = [str(name) for name in table.index]
    by_name = {score.name: score for score in scores}
    best = by_name[order[0]]
    rows, warnings = [], []
    for name in order:
        score = by_name[name]
        count = score.log_p.size
        total = float(score.log_p.sum())
        se = float(math.sqrt(count) * score.log_p.std())
        difference, difference_se = paired_difference(score.log_p, best.log_p)
        weight = float(table.loc[name, "weight"]) if "weight" in table.columns else math.nan
        rows.append(
            {
                "run": name,
                "path": str(score.path),
                "points": count,
                "samples": score.samples,
                "sum_log_p": total,
                "se_sum": se,
                "mean_log_p": total / count,
                "se_mean": se / count,
                "diff_to_best": difference,
                "se_diff": difference_se,
                "share_k_above_0.7": score.share_unreliable,
                "weight": weight,
            }
        )
        if score.samples != best.samples:
            warnings.append(
                f"warning: {name} was analysed with {score.samples} samples per point and {best.name} with {best.samples}: "
                "importance-sampled log p(x) rises with the samples (and k-hat changes), so the difference mixes the "
                "models with the estimators; analyse both with the same --samples"
            )
        if score.share_unreliable > UNRELIABLE_SHARE:
            warnings.append(
                f"warning: {name}: {score.share_unreliable:.1%} of the points have Pareto k-hat > {PARETO_K_BAD}; its log p(x) "
                "is unreliable (likely too low), so its rank may be wrong"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "compare.csv"
    columns = list(rows[0])
    write_text_atomically(csv, ",".join(columns) + "\n" + "".join(",".join(_csv_cell(row[column]) for column in columns) + "\n" for row in rows))
    figure = arviz_compat.plot_compare(table, f"log p(x) summed over {rows[0]['points']} test points (ArviZ plot_compare)")
    image = out / "compare.png"
    save_figure(figure, image, dpi=100, bbox_inches="tight")
    plt.close(figure)
    markdown = out / "compare.md"
    write_text_atomically(markdown, _markdown(rows, warnings, image))
    return Comparison(rows, table, warnings, markdown, csv, image)


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return f'"{text}"' if "," in text else text


def _markdown(rows, warnings, image: Path) -> str:
    from pyrovae.analysis.report import markdown_table

    count = rows[0]["points"]
    text = "# Comparison of runs on the same test points\n\n"
    text += (
        f"{count} test points. log p(x_n) is each run's importance-sampled marginal likelihood (`pyrovae analyze`, "
        "`sample_stats.log_marginal_likelihood`); higher is better. `se` = sqrt(N) sd_n; the difference to the best run "
        "is paired, sum_n (log p_run(x_n) - log p_best(x_n)), with standard error sqrt(N) sd_n of the pointwise "
        "differences. A difference within about 2 se of 0 does not separate the runs. k-hat > 0.7 marks points whose "
        "log p(x) cannot be trusted.\n\n"
    )
    for line in warnings:
        text += f"> **{line}**\n\n"
    table = [
        (
            row["run"],
            row["samples"],
            f"{row['sum_log_p']:.2f}",
            f"{row['se_sum']:.2f}",
            f"{row['mean_log_p']:.4f}",
            f"{row['se_mean']:.4f}",
            f"{row['diff_to_best']:.2f}",
            f"{row['se_diff']:.2f}",
            f"{row['share_k_above_0.7']:.1%}",
            f"{row['weight']:.3f}",
        )
        for row in rows
    ]
    headers = ["run", "samples", "sum log p(x)", "se", "mean log p(x)", "se of mean", "diff to best", "se of diff", "k-hat > 0.7", "stacking weight"]
    text += markdown_table(headers, table) + "\n"
    text += f"![ArviZ plot_compare of the runs]({image.name})\n"
    return text
