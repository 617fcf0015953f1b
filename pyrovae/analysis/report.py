"""One folder that says what a trained pair learned: the posterior as netCDF, the guide's PSIS
diagnostics, latent summaries, plots, and ``report.md`` tying them together (``pyrovae analyze``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from pyrovae.analysis.arviz_compat import ARVIZ_VERSION, group, has_group, to_netcdf
from pyrovae.analysis.collapse import INFORMATIVE_NATS, STRONG_NATS, diagnose_collapse, remedies_for, uses_free_bits
from pyrovae.analysis.diagnostics import MIN_PSIS_SAMPLES, PARETO_K_BAD, PARETO_K_GOOD, psis_diagnostics, weak_estimate_warnings
from pyrovae.analysis.active_units import active_units
from pyrovae.analysis.latents import (
    aggregate_posterior_moments,
    continuous_sites,
    kl_per_dimension,
    latent_summary,
    mutual_information,
)
from pyrovae.analysis.plots import sample_grid, sample_rows_figure, training_curves
from pyrovae.analysis.posterior import GUIDE_GROUP, check_footprint, draw_posterior, part_name, seeded, to_inference_data, whole_batch
from pyrovae.analysis.posterior_plots import forest_plot, kl_bars, latent_scatter, latent_traversals, pareto_k_plot, posterior_plot
from pyrovae.errors import ConfigError
from pyrovae.files import write_text_atomically

# Burda et al. 2016: a unit is active when Cov_x(E_q[z_d | x]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01
POSTERIOR_FILE = "posterior.nc"
REPORT_FILE = "report.md"


@dataclass
class Analysis:
    """What :func:`write_analysis` wrote: ``report`` (report.md), ``files`` (name -> path of every
    file, PNGs included) and ``numbers`` (the report's metrics, also in ``analysis.json``)."""

    report: Path
    files: dict[str, Path] = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)


def write_analysis(
    model,
    guide,
    data,
    out_dir: str | Path,
    *,
    samples: int = 1000,
    points: Sequence[int] | None = None,
    image_shape: Sequence[int] | None = None,
    inputs: Mapping[str, float] | None = None,
    history: list[dict] | None = None,
    metrics: Mapping[str, object] | None = None,
    attrs: Mapping[str, object] | None = None,
    seed: int | None = 0,
    batch_size: int = 100,
    progress: bool = False,
) -> Analysis:
    """Analyse the pair on ``data`` (the test rows: the whole batch contract) into ``out_dir``:

    - ``posterior.nc``: :func:`to_inference_data` with ``samples`` draws per datapoint;
    - ``diagnostics.csv``: per datapoint Pareto k-hat, IS and PSIS log p(x) (:func:`psis_diagnostics`);
    - ``analysis.json``: the numbers below; ``report.md``: them as tables, with the plots;
    - PNGs: ``curves.png`` (from ``history``, the run's metrics.jsonl), ``samples.png`` (prior samples
      and reconstructions: an image grid for image data, heat-map rows otherwise),
      ``traversals.png``, ``latent_scatter.png``, ``kl_per_dimension.png``, ``pareto_k.png``,
      ``forest.png`` and ``posterior.png`` (the chosen ``points``, default the first three).

    The numbers: mean IS and PSIS log p(x), the share of points with k-hat > 0.7, Kish's ESS of
    the importance weights, KL per site and dimension, active units, I(x; z), the aggregate
    posterior's moments, the collapse verdict (:func:`pyrovae.analysis.collapse.diagnose_collapse`),
    one-line ``warnings`` where a number is weak, and ``metrics`` (e.g. final.json). Before drawing,
    the memory and file size are estimated and a request that cannot fit is refused
    (:func:`pyrovae.analysis.posterior.check_footprint`). Draws come from ``seed``; the caller's
    random streams are left as they were.
    """
    tensors, extra = whole_batch(data, inputs)
    count = int(tensors["x"].shape[0])
    if samples < MIN_PSIS_SAMPLES:
        raise ConfigError(
            f"--samples {samples}: PSIS needs at least {MIN_PSIS_SAMPLES} importance samples per test point to fit the Pareto tail"
        )
    points = list(range(min(3, count))) if points is None else [int(p) for p in points]
    for point in points:
        if not 0 <= point < count:
            raise ConfigError(f"--points {point}: the analysed test set has {count} examples (indices 0..{count - 1})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    footprint = check_footprint(model, guide, tensors, extra, samples, out, batch_size=batch_size)
    files: dict[str, Path] = {}
    stages = tqdm(total=8, disable=not progress, desc="analysis", unit="step")

    def stage(name: str):
        stages.set_postfix_str(name)
        stages.update(1)

    draws = draw_posterior(model, guide, tensors, samples, inputs=extra, batch_size=batch_size, seed=seed, progress=progress)
    all_attrs = {"model": part_name(model), "guide": part_name(guide), **dict(attrs or {})}
    idata = to_inference_data(model, guide, tensors, inputs=extra, seed=seed, attrs=all_attrs, draws=draws)
    files["posterior"] = to_netcdf(idata, out / POSTERIOR_FILE)
    stage("posterior.nc")
    psis = psis_diagnostics(idata)
    files["diagnostics"] = _write_diagnostics(psis, out / "diagnostics.csv")
    stage("PSIS")
    kl = kl_per_dimension(draws=draws)
    with seeded(seed):
        units = active_units(model, guide, tensors, ACTIVE_UNIT_THRESHOLD, samples=20, inputs=extra, batch_size=batch_size)
    activity = _activity(units, idata)
    moments = aggregate_posterior_moments(idata)
    mi = mutual_information(model, guide, tensors, inputs=extra, batch_size=batch_size, seed=seed, progress=progress)
    stage("latents")
    ranking = {name: activity[name] for name in activity.data_vars}
    if history:
        files["curves"] = training_curves(history, out / "curves.png")
    if image_shape is not None:
        files["samples"] = sample_grid(model, guide, tensors, out / "samples.png", image_shape, count=16, inputs=extra)
    else:
        files["samples"] = sample_rows_figure(model, guide, tensors, out / "samples.png", count=16, inputs=extra)
    stage("samples")
    traversal = latent_traversals(
        model, idata, tensors, out / "traversals.png", point=points[0] if points else 0, inputs=extra, image_shape=image_shape, ranking=ranking
    )
    if traversal is not None:
        files["traversals"] = traversal
    stage("traversals")
    for name, written in (
        ("latent_scatter", latent_scatter(idata, out / "latent_scatter.png")),
        ("kl_per_dimension", kl_bars(kl, out / "kl_per_dimension.png")),
        ("pareto_k", pareto_k_plot(psis, out / "pareto_k.png")),
    ):
        if written is not None:
            files[name] = written
    stage("maps")
    summary = latent_summary(idata, points) if points and continuous_sites(idata) else None
    if points:
        for name, written in (
            ("forest", forest_plot(idata, points, out / "forest.png", ranking=ranking)),
            ("posterior_plot", posterior_plot(idata, points, out / "posterior.png", ranking=ranking, psis=psis)),
        ):
            if written is not None:
                files[name] = written
    stage("ArviZ plots")
    k = psis["pareto_k"].values
    finite = k[np.isfinite(k)]
    ess = psis["importance_ess"].values
    objective = str(all_attrs["objective"]) if "objective" in all_attrs else None
    lengths = tensors.get("lengths")
    remedies = remedies_for(model, guide, objective, history, float(lengths.double().mean()) if lengths is not None and lengths.numel() else None)
    diagnosis = diagnose_collapse(
        kl,
        {name: activity[name].values for name in activity.data_vars},
        ACTIVE_UNIT_THRESHOLD,
        mi if kl else None,
        count,
        history,
        free_bits=uses_free_bits(objective, history),
        remedies=remedies,
    )
    warnings = weak_estimate_warnings(float(np.mean(k > PARETO_K_BAD)), mi if kl else None, count)
    numbers = {
        "test_examples": count,
        "samples": samples,
        "is_log_likelihood": psis.attrs["is_log_likelihood_mean"],
        "psis_log_likelihood": psis.attrs["psis_log_likelihood_mean"],
        "share_pareto_k_above_0.7": float(np.mean(k > PARETO_K_BAD)),
        "share_pareto_k_below_0.5": float(np.mean(k < PARETO_K_GOOD)),
        # None where no point has a finite k-hat: a pair without latents has constant weights.
        "pareto_k_median": float(np.median(k)) if finite.size else None,
        "pareto_k_max": float(finite.max()) if finite.size else None,
        "importance_ess_median": float(np.median(ess)),
        "importance_ess_min": float(ess.min()),
        "importance_ess_share_below_10": float(np.mean(ess < 10)),
        "active_units": activity.attrs["active"],
        "latent_dims": activity.attrs["dims"],
        "mutual_information": mi,
        "mutual_information_upper_bound": math.log(count),
        "kl": {name: value.attrs["total"] for name, value in kl.items()},
        "kl_per_dimension": {name: np.atleast_1d(value.values).reshape(-1).round(5).tolist() for name, value in kl.items()},
        "activity": {name: np.atleast_1d(activity[name].values).reshape(-1).round(5).tolist() for name in activity.data_vars},
        "aggregate_posterior": {
            name: {"mean": np.atleast_1d(m["mean"].values).reshape(-1).round(5).tolist(), "std": np.atleast_1d(m["std"].values).reshape(-1).round(5).tolist()}
            for name, m in moments.items()
        },
        "informative_dims": diagnosis.as_dict()["informative_dims"],
        "dims_above_0.5_nats": diagnosis.as_dict()["strong_dims"],
        "collapse": diagnosis.as_dict(),
        "warnings": warnings,
        "posterior_file_bytes": files["posterior"].stat().st_size,
        "estimated_memory_bytes": footprint["memory"],
        "estimated_file_bytes": footprint["file"],
        "arviz": ARVIZ_VERSION,
        "points": points,
        "seed": seed,
        "inputs": extra,
        "attrs": {key: str(value) for key, value in all_attrs.items()},
    }
    write_text_atomically(out / "analysis.json", json.dumps({**numbers, "run_metrics": _plain(metrics or {})}, indent=2) + "\n")
    files["analysis"] = out / "analysis.json"
    report = out / REPORT_FILE
    write_text_atomically(report, _report_text(numbers, metrics or {}, kl, activity, moments, summary, idata, psis, points, files, diagnosis))
    files["report"] = report
    stage("report.md")
    stages.close()
    return Analysis(report=report, files=files, numbers=numbers)


def _activity(units, idata):
    """Cov_x(E_q[z_d | x]) of :func:`active_units` as an ``xarray.Dataset`` shaped like the sites'
    dims in ``idata.posterior`` (continuous sites only), with the counts in ``attrs``."""
    import xarray as xr

    variables, active, dims = {}, 0, 0
    for name in continuous_sites(idata):
        if name not in units:
            continue
        var = group(idata, GUIDE_GROUP)[name]
        event = [dim for dim in var.dims if dim not in ("chain", "draw", "obs")]
        shape = [var.sizes[dim] for dim in event]
        values = units[name].variance.numpy().reshape(shape)
        variables[name] = xr.DataArray(values, dims=event, coords={dim: var.coords[dim] for dim in event})
        active += units[name].active
        dims += units[name].dims
    return xr.Dataset(variables, attrs={"threshold": ACTIVE_UNIT_THRESHOLD, "active": active, "dims": dims})


def _plain(values: Mapping) -> dict:
    return {key: value for key, value in values.items() if isinstance(value, (int, float, str, bool)) or value is None}


def _write_diagnostics(psis, path: Path) -> Path:
    columns = ["obs"] + (["label"] if "label" in psis.coords else []) + ["pareto_k", "importance_ess", "is_log_likelihood", "psis_log_likelihood"]
    cells = [[str(value) for value in psis.coords[name].values] for name in columns[:-4]]
    cells += [[f"{value:.6g}" for value in psis[name].values.astype(float)] for name in columns[-4:]]
    rows = [",".join(columns)] + [",".join(row) for row in zip(*cells)]
    write_text_atomically(path, "\n".join(rows) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "inf" if value == math.inf else "-inf" if value == -math.inf else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(header) for header in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _image(files, name: str, caption: str) -> str:
    path = files.get(name)
    return f"![{caption}]({path.name})\n\n" if path is not None else ""


def _report_text(numbers, metrics, kl, activity, moments, summary, idata, psis, points, files, diagnosis) -> str:
    attrs = numbers["attrs"]
    title = attrs.get("run_dir", "a model/guide pair")
    parts = [f"# Analysis of {title}\n\n"]
    described = [f"{key} `{attrs[key]}`" for key in ("model", "guide", "objective", "data", "checkpoint", "step") if key in attrs]
    size = numbers["posterior_file_bytes"]
    parts.append(
        ", ".join(described) + f". {numbers['test_examples']} test points, {numbers['samples']} importance samples from the "
        f"guide per point (seed {numbers['seed']}). The posterior is in `{POSTERIOR_FILE}` ({size / 1e6:.1f} MB, float32, "
        f"zlib-compressed netCDF; `az.from_netcdf`, ArviZ {numbers['arviz']}): `posterior` is the PSIS-weighted posterior "
        "(approximately p(z | x)), `guide_draws` the guide's raw q(z | x) draws with their log-weights, `sample_stats` "
        "log p(x), k-hat and the weights' ESS per point. It has no `log_likelihood` group: `az.loo`, `az.waic` and "
        "`az.compare` refuse it, because per-point latent draws make their numbers meaningless; compare runs with "
        "`pyrovae compare RUN_A RUN_B`. Per-point diagnostics are in `diagnostics.csv`, every number below in "
        "`analysis.json`.\n\n"
    )
    if numbers["warnings"]:
        parts.append("".join(f"> **{line}**\n>\n" for line in numbers["warnings"]).rstrip(">\n") + "\n\n")
    if numbers["inputs"]:
        parts.append("Scheduled inputs at the checkpoint's step: " + ", ".join(f"`{k} = {v:.4g}`" for k, v in numbers["inputs"].items()) + ".\n\n")
    rows = [
        ("test log p(x), importance sampling (nats)", numbers["is_log_likelihood"]),
        ("test log p(x), PSIS (nats)", numbers["psis_log_likelihood"]),
        ("share of test points with Pareto k-hat > 0.7", f"{numbers['share_pareto_k_above_0.7']:.1%}"),
        ("share with k-hat < 0.5", f"{numbers['share_pareto_k_below_0.5']:.1%}"),
        (
            "k-hat: median / max",
            f"{numbers['pareto_k_median']:.3g} / {numbers['pareto_k_max']:.3g}"
            if numbers["pareto_k_max"] is not None
            else "none finite (constant weights: no latent to sample)",
        ),
        (
            f"Kish ESS of the weights: median / min (of {numbers['samples']})",
            f"{numbers['importance_ess_median']:.1f} / {numbers['importance_ess_min']:.1f}",
        ),
        (f"active units (Cov_x E_q[z_d] > {ACTIVE_UNIT_THRESHOLD})", f"{numbers['active_units']} of {numbers['latent_dims']}"),
        (
            f"dimensions carrying information (KL_d > {INFORMATIVE_NATS} nats, active) / with KL_d > {STRONG_NATS} nats",
            f"{numbers['informative_dims']} / {numbers['dims_above_0.5_nats']}",
        ),
        ("mutual information I(x; z) (nats; at most log N = %.2f)" % numbers["mutual_information_upper_bound"], numbers["mutual_information"]),
    ]
    rows += [(f"KL(q({site} | x) || p({site})) (nats)", total) for site, total in numbers["kl"].items()]
    rows += [(f"run: `{key}`", value) for key, value in _plain(metrics).items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    parts.append("## Numbers\n\n" + markdown_table(["quantity", "value"], rows) + "\n")
    parts.append(
        "## The guide as an importance sampler (PSIS)\n\n"
        "Pareto k-hat (Yao et al. 2018) of the weights p(x, z) / q(z | x) per test point: below 0.5 q(z | x) covers the "
        "posterior and the importance-sampled log p(x) is reliable; above 0.7 it is not. The PSIS estimate smooths the "
        "largest weights; where it departs from the plain one, the plain one is noisy. Kish's ESS (sum w)^2 / sum w^2 "
        "counts how many of the draws carry the weight: the PSIS-weighted posterior of a point is made of about that many "
        "distinct draws. The draws are independent, so `az.ess` and r-hat (chain diagnostics) do not apply: they "
        "report about S whatever the weights.\n\n"
    )
    parts.append(_image(files, "pareto_k", "Pareto k-hat per test point and the weights' ESS"))
    parts.append(_collapse_section(diagnosis, numbers))
    if "curves" in files:
        parts.append("## Training curves\n\n" + _image(files, "curves", "ELBO, reconstruction, KL per site and schedules by epoch"))
    parts.append("## Samples and reconstructions\n\n" + _image(files, "samples", "prior samples, test rows and their reconstructions"))
    parts.append("## Latents\n\n")
    if not continuous_sites(idata) and not _enumerated_sites(idata):
        parts.append("The pair has no latent sites: each log-weight is log p(x) itself, exactly.\n\n")
    parts.append(_image(files, "kl_per_dimension", "KL per latent dimension"))
    table = []
    for site in activity.data_vars:
        act = np.atleast_1d(activity[site].values).reshape(-1)
        klv = np.atleast_1d(kl[site].values).reshape(-1) if site in kl else np.full(1, np.nan)
        mean = np.atleast_1d(moments[site]["mean"].values).reshape(-1)
        std = np.atleast_1d(moments[site]["std"].values).reshape(-1)
        for d in range(act.size):
            table.append((site, d, float(klv[d]) if klv.size == act.size else "", float(act[d]), "yes" if act[d] > ACTIVE_UNIT_THRESHOLD else "no", float(mean[d]), float(std[d])))
    if table:
        parts.append(
            "Per dimension: KL(q(z_d | x) || p(z_d)) averaged over the test points, activity Cov_x(E_q[z_d | x]), and the "
            "aggregate posterior q(z) = mean_n q(z | x_n)'s mean and standard deviation (a standard-normal prior has 0 and 1).\n\n"
        )
        parts.append(markdown_table(["site", "dim", "KL (nats)", "activity", "active", "q(z) mean", "q(z) std"], table) + "\n")
    parts.append(_image(files, "latent_scatter", "guide means E_q[z | x] coloured by label"))
    parts.append(_image(files, "traversals", "latent traversals"))
    if points:
        parts.append(f"## Chosen test points: {', '.join(str(p) for p in points)}\n\n")
        if summary is not None:
            parts.append(
                "The PSIS-weighted posterior (approximately p(z | x)): mean, sd and the equal-tailed 94% interval, beside the "
                "guide's mean and sd. Where the two means differ by more than sd, the guide is off; the weighted columns are "
                "as good as the point's k-hat.\n\n"
            )
            headers = ["variable"] + list(summary.columns)
            parts.append(markdown_table(headers, [[index, *[float(v) for v in row]] for index, row in zip(summary.index, summary.values)]) + "\n")
        parts.append(_enumerated_table(idata, psis, points))
        parts.append(_image(files, "forest", "forest plot: q(z | x) and the PSIS-weighted posterior"))
        parts.append(_image(files, "posterior_plot", "PSIS-weighted posterior of the chosen points"))
    return "".join(parts)


def _collapse_section(diagnosis, numbers) -> str:
    info = diagnosis.as_dict()
    mi = diagnosis.mutual_information
    text = "## Is the latent used?\n\n"
    text += f"**Verdict: {diagnosis.verdict}.** {diagnosis.reason}.\n\n"
    rows = [
        (site.site, f"{site.kl:.4g}", f"{site.informative} of {site.dims}", f"{site.strong} of {site.dims}", f"{site.active} of {site.dims}")
        for site in diagnosis.sites
    ]
    if rows:
        headers = ["site", "KL (nats)", f"dims carrying information (KL_d > {INFORMATIVE_NATS}, active)", f"dims with KL_d > {STRONG_NATS}", "active units"]
        text += markdown_table(headers, rows) + "\n"
    if mi is not None:
        ceiling = diagnosis.mutual_information_ceiling
        text += (
            f"I(x; z) = {mi:.3g} nats against its ceiling log N = {ceiling:.3g} ({mi / ceiling:.0%} of it) on N = "
            f"{numbers['test_examples']} points; it is at most the KL ({info['kl']:.3g} nats).\n\n"
            if ceiling > 0
            else ""
        )
    text += (
        "Active units and KL count different things. A unit is active when its guide mean moves with x at all "
        f"(Cov_x E_q[z_d | x] > {ACTIVE_UNIT_THRESHOLD}); its KL_d = E_x KL(q(z_d | x) || p(z_d)) is how many nats it "
        "carries, and bounds its share of I(x; z). A mean that moves by 0.2 prior sd between points is active yet carries "
        "about 0.02 nats; a dimension needs a posterior clearly narrower than the prior, or means spread over the prior, "
        f"to carry {STRONG_NATS} nats. So many units can be active while few carry much.\n\n"
    )
    trend = diagnosis.trend
    if trend is not None:
        values = ", ".join(f"{epoch}: {value:.3g}" for epoch, value in zip(trend.epochs, trend.values))
        text += f"Over training (epochs after the KL weight settled), `{trend.measure}`: {values}.\n\n"
    else:
        text += "No training trend: `metrics.jsonl` holds fewer than three validation records after the KL weight settled.\n\n"
    if diagnosis.verdict != "healthy" and diagnosis.remedies:
        text += "Remedies pyrovae has for this run, with the TOML to try (one at a time; its keys go into the experiment file's table of that name):\n\n"
        for number, remedy in enumerate(diagnosis.remedies, 1):
            # a paragraph and a fenced block at the top level: fenced blocks inside list items break in some renderers
            text += f"**{number}.** {remedy.about}" + (":\n\n```toml\n" + remedy.toml + "\n```\n\n" if remedy.toml else ".\n\n")
    return text


def _enumerated_sites(idata) -> list[str]:
    if not has_group(idata, GUIDE_GROUP):
        return []
    return [name for name in str(group(idata, GUIDE_GROUP).attrs.get("enumerated_sites", "")).split(",") if name]


def _enumerated_table(idata, psis, points) -> str:
    """P(e | x) of each enumerated site for the chosen points: the PSIS-weighted frequencies of
    the guide's draws, sum_s w~_s 1[e_s = e]; the three most probable values."""
    text = ""
    draws_group = group(idata, GUIDE_GROUP) if has_group(idata, GUIDE_GROUP) else None
    for name in _enumerated_sites(idata):
        rows = []
        for point in points:
            draws = draws_group[name].sel(obs=point).values.reshape(-1)
            weights = np.exp(psis["psis_log_weight"].sel(obs=point).values.reshape(-1))
            if (draws < 0).all():
                rows.append((point, "", "hidden by a mask"))
                continue
            values = np.unique(draws[draws >= 0])
            probs = np.array([weights[draws == v].sum() for v in values])
            order = np.argsort(-probs)[:3]
            label = draws_group.coords["label"].sel(obs=point).item() if "label" in draws_group.coords else ""
            rows.append((point, label, ", ".join(f"{values[i]}: {probs[i]:.3f}" for i in order)))
        text += (
            f"Posterior of the enumerated site `{name}` (PSIS-weighted frequencies of its draws from the exact conditional "
            "posterior; the three most probable values):\n\n"
        )
        text += markdown_table(["point", "label", f"P({name} | x)"], rows) + "\n"
    return text
