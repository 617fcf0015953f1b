"""Pictures of the posterior: latent traversals, a 2-D map of the latents coloured by label, KL
per dimension, the guide's Pareto k-hat, and forest and posterior plots of chosen datapoints
(the PSIS-weighted posterior beside the guide's q(z | x); categorical sites as probabilities per
class). Every function writes one PNG (matplotlib, Agg) and returns its path; none depends on
the ArviZ release line."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from matplotlib.ticker import MaxNLocator
from pyro import poutine
from torch.distributions import constraints

from pyrovae.analysis.diagnostics import PARETO_K_BAD, PARETO_K_GOOD
from pyrovae.analysis.latents import continuous_sites
from pyrovae.analysis.plots import evaluation_mode, decoded_value, plt
from pyrovae.analysis.arviz_compat import group, has_group
from pyrovae.analysis.posterior import GUIDE_GROUP, whole_batch
from pyrovae.traces import latent_sites
from pyrovae.files import save_figure


def _save(figure, path, tight: bool = True) -> Path:
    """Write and close ``figure``; ``tight=False`` for figures laid out by hand (no second draw
    to measure the bounding box)."""
    path = Path(path)
    save_figure(figure, path, dpi=100, bbox_inches="tight" if tight else None)
    plt.close(figure)
    return path


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _enumerated(idata) -> set[str]:
    if not has_group(idata, GUIDE_GROUP):
        return set()
    return set(str(group(idata, GUIDE_GROUP).attrs.get("enumerated_sites", "")).split(",")) - {""}


def ranked_dimensions(idata, ranking: Mapping[str, xr.DataArray] | None, sites: Sequence[str], limit: int) -> list[tuple[str, dict]]:
    """The ``limit`` (site, {dim: index}) pairs with the largest ``ranking`` value (e.g. activity
    or KL per dimension), over the given sites; in order of the sites' dims without a ranking."""
    candidates = []
    draws = group(idata, GUIDE_GROUP)
    for name in sites:
        var = draws[name]
        event = [dim for dim in var.dims if dim not in ("chain", "draw", "obs")]
        shape = [var.sizes[dim] for dim in event]
        score = ranking.get(name) if ranking else None
        for flat, index in enumerate(np.ndindex(*shape) if shape else [()]):
            selection = {dim: int(i) for dim, i in zip(event, index)}
            value = -flat
            if score is not None and set(score.dims) == set(event):
                value = float(score.sel(selection)) if selection else float(score)
            candidates.append((value, name, selection))
    candidates.sort(key=lambda item: -item[0])
    return [(name, selection) for _, name, selection in candidates[:limit]]


def latent_traversals(
    model,
    idata,
    data,
    path: str | Path,
    *,
    point: int = 0,
    inputs: Mapping[str, float] | None = None,
    image_shape: Sequence[int] | None = None,
    ranking: Mapping[str, xr.DataArray] | None = None,
    steps: int = 7,
    max_dims: int = 8,
) -> Path | None:
    """Decode z while one latent dimension d moves and the rest stay at datapoint ``point``'s
    posterior mean: z_d = m_d + t sd_d, t in linspace(-3, 3, steps), where m is the point's mean
    over its draws and sd_d the aggregate posterior's standard deviation. Each row is one
    dimension (the ``max_dims`` with the largest ``ranking``, e.g. activity); each picture is the
    mean of p(x | z) (images) or a heat map of it (other data; most probable values for categorical
    data; sequence models are teacher-forced on the point's own tokens). Only real-valued sites
    move; discrete sites stay at the point's most frequent draw, other sites at the draw nearest
    their mean. Returns None when the model has no real-valued latent to move."""
    if not continuous_sites(idata):
        return None
    tensors, extra = whole_batch(data, inputs)
    guide_draws = group(idata, GUIDE_GROUP)
    position = int(np.flatnonzero(guide_draws.coords["obs"].values == point)[0])
    row = {key: value[position : position + 1] for key, value in tensors.items()}
    with torch.no_grad(), evaluation_mode(model):
        trace = poutine.trace(model).get_trace(**row, **extra)
    supports = {name: site["fn"].support for name, site in latent_sites(trace)}
    device = tensors["x"].device
    movable = [name for name in continuous_sites(idata) if name in supports and _is_real(supports[name])]
    if not movable:
        return None
    fixed = {}
    posterior = group(idata, "posterior").sel(obs=point)  # the PSIS-weighted posterior of the point
    enumerated = _enumerated(idata)
    for name, var in posterior.data_vars.items():
        draws = var.stack(__sample__=("chain", "draw")).transpose("__sample__", ...).values
        if name in movable:
            value = draws.mean(0)
        elif var.dtype.kind in "iu" or name in enumerated:
            seen = draws[draws >= 0] if var.dtype.kind in "iu" else draws
            if seen.size == 0:
                continue  # hidden by a mask for this point: the model does not use it
            values, counts = np.unique(seen, return_counts=True)
            value = values[counts.argmax()]
        else:
            mean = draws.mean(0)
            value = draws[np.argmin(((draws - mean) ** 2).reshape(draws.shape[0], -1).sum(1))]
        value = np.asarray(value)
        dtype = torch.get_default_dtype() if value.dtype.kind == "f" else torch.long
        fixed[name] = torch.as_tensor(value, device=device, dtype=dtype)
    chosen = ranked_dimensions(idata, ranking, movable, max_dims)
    spread = {name: guide_draws[name].std(("chain", "draw", "obs")) for name in movable}
    offsets = torch.linspace(-3.0, 3.0, steps)
    total = len(chosen) * steps
    values = {name: value.expand((total,) + tuple(value.shape)).clone() for name, value in fixed.items()}
    for row_index, (name, selection) in enumerate(chosen):
        sd = float(spread[name].sel(selection)) if selection else float(spread[name])
        index = tuple(selection.values())
        for step, offset in enumerate(offsets):
            flat = row_index * steps + step
            values[name][(flat,) + index] = values[name][(flat,) + index] + float(offset) * sd
    batch = {key: value.expand((total,) + tuple(value.shape[1:])) for key, value in row.items()}
    site = getattr(model, "observed_site", "x")
    with torch.no_grad(), evaluation_mode(model):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(**batch, **extra)
        pictures = decoded_value(trace.nodes[site]["fn"]).float().cpu()
    titles = [f"{name}[{', '.join(str(i) for i in selection.values())}]" if selection else name for name, selection in chosen]
    if image_shape is not None:
        # one mosaic (rows: dimensions, columns: offsets) drawn as a single image: fast to render
        height, width = int(image_shape[-2]), int(image_shape[-1])
        mosaic = np.ones((len(chosen) * (height + 1) - 1, steps * (width + 1) - 1))
        for r in range(len(chosen)):
            for c in range(steps):
                tile = pictures[r * steps + c].reshape(*image_shape).numpy().reshape(-1, height, width)[0]
                mosaic[r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width] = tile
        figure, axis = plt.subplots(figsize=(1.0 + steps * 0.75, 0.6 + len(chosen) * 0.75))
        axis.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_yticks([r * (height + 1) + height / 2 for r in range(len(chosen))], titles, fontsize=8)
        axis.set_xticks([c * (width + 1) + width / 2 for c in range(steps)], [f"{float(o):+.0f} sd" for o in offsets], fontsize=7)
        axis.tick_params(length=0)
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.set_title(f"latent traversals around test point {point}", fontsize=9)
    else:
        figure, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 2.4), squeeze=False)
        flat_pictures = pictures.reshape(total, -1).clone()
        lengths = row.get("lengths")
        if torch.is_tensor(lengths) and flat_pictures.shape[1] == int(row["x"].shape[1]):
            flat_pictures[:, int(lengths[0]) :] = float("nan")  # past the point's own length
        low, high = float(flat_pictures.nan_to_num(0).min()), float(flat_pictures.nan_to_num(0).max())
        for r, axis in enumerate(axes[0]):
            axis.imshow(flat_pictures[r * steps : (r + 1) * steps].numpy(), aspect="auto", interpolation="nearest", vmin=low, vmax=high)
            axis.set_yticks(range(steps), [f"{float(o):+.0f}" for o in offsets], fontsize=6)
            axis.set_title(titles[r], fontsize=8)
            axis.set_xlabel("position" if torch.is_tensor(lengths) else "feature", fontsize=7)
        axes[0, 0].set_ylabel("offset (sd)", fontsize=7)
        figure.suptitle(f"latent traversals around test point {point}: decoded p(x | z)", fontsize=9, y=1.04)
    return _save(figure, path)


def latent_scatter(idata, path: str | Path) -> Path | None:
    """Each datapoint's posterior mean E_q[z | x] (the continuous sites concatenated) in 2-D: the
    two coordinates themselves when there are two, else the first two principal components
    (scikit-learn's PCA, with the share of variance each explains), coloured by the ``label``
    coordinate where the data have labels. None when there is no continuous latent."""
    sites = continuous_sites(idata)
    if not sites:
        return None
    columns = []
    guide_draws = group(idata, GUIDE_GROUP)
    for name in sites:
        means = guide_draws[name].mean(("chain", "draw"))
        columns.append(means.values.reshape(means.sizes["obs"], -1))
    points = np.concatenate(columns, 1)
    if points.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0)
        points = pca.fit_transform(points)
        labels = [f"PC{i + 1} ({share:.0%} of the variance)" for i, share in enumerate(pca.explained_variance_ratio_)]
        title = f"posterior means, PCA of {sum(c.shape[1] for c in columns)} dims"
    elif points.shape[1] == 2:
        labels, title = ["dim 0", "dim 1"], "posterior means"
    else:
        points = np.concatenate([points, np.zeros_like(points)], 1)
        labels, title = ["dim 0", ""], "posterior means"
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    if "label" in guide_draws.coords:
        classes = guide_draws.coords["label"].values
        if len(np.unique(classes)) <= 20:
            for value in np.unique(classes):
                chosen = classes == value
                axis.scatter(points[chosen, 0], points[chosen, 1], s=8, label=str(value), alpha=0.8)
            axis.legend(title="label", fontsize=7, markerscale=2, loc="best")
        else:
            image = axis.scatter(points[:, 0], points[:, 1], s=8, c=classes, cmap="viridis")
            figure.colorbar(image, ax=axis, label="label")
    else:
        axis.scatter(points[:, 0], points[:, 1], s=8)
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title, fontsize=9)
    return _save(figure, path)


def kl_bars(kl: Mapping[str, xr.DataArray], path: str | Path) -> Path | None:
    """KL(q(z_d | x) || p(z_d)) per dimension (from :func:`kl_per_dimension`) as bars, one panel
    per site; a site whose densities do not factorize has a single bar."""
    if not kl:
        return None
    figure, axes = plt.subplots(1, len(kl), figsize=(max(4.0, 0.18 * sum(v.size for v in kl.values()) + 2.5 * len(kl)), 3.2), squeeze=False)
    for axis, (name, values) in zip(axes[0], kl.items()):
        flat = np.atleast_1d(values.values).reshape(-1)
        axis.bar(np.arange(flat.size), flat, color="C0")
        axis.set_title(f"{name}: total {values.attrs.get('total', flat.sum()):.2f} nats", fontsize=9)
        axis.set_xlabel("dimension" if values.dims else "(the whole site)")
        axis.set_ylabel("KL (nats)")
    figure.tight_layout()
    return _save(figure, path)


def pareto_k_plot(psis: xr.Dataset, path: str | Path) -> Path:
    """The guide's Pareto k-hat per test point and their histogram, with the 0.5 and 0.7
    thresholds of Yao et al. 2018, and Kish's ESS of the weights per point."""
    k = psis["pareto_k"].values
    finite = k[np.isfinite(k)]
    exact = int(np.sum(np.isneginf(k)))
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.5))
    shown = np.where(np.isneginf(k), np.nan, k)
    left.scatter(np.arange(k.size), shown, s=6, c=np.where(shown > PARETO_K_BAD, "C3", np.where(shown > PARETO_K_GOOD, "C1", "C0")))
    for line, style in ((PARETO_K_GOOD, ":"), (PARETO_K_BAD, "--")):
        left.axhline(line, color="k", linestyle=style, linewidth=0.8)
        middle.axvline(line, color="k", linestyle=style, label=f"k = {line}")
    left.set_xlabel("test point")
    left.set_ylabel("k-hat")
    left.set_title("Pareto k-hat per test point", fontsize=9)
    middle.hist(finite, bins=30, color="C0")
    middle.legend(fontsize=8)
    share = psis.attrs["share_above_threshold"]
    note = f"; {exact} with equal weights (exact)" if exact else ""
    middle.set_title(f"k-hat > {psis.attrs['threshold']}: {share:.1%} of {k.size} points{note}", fontsize=9)
    middle.set_xlabel("k-hat")
    middle.set_ylabel("test points")
    if "importance_ess" in psis:
        ess = psis["importance_ess"].values
        right.hist(ess, bins=np.logspace(0, np.log10(max(2.0, psis.attrs["num_samples"])), 30), color="C2")
        right.set_xscale("log")
        right.set_title(f"Kish ESS of the weights: median {np.median(ess):.1f} of {psis.attrs['num_samples']}", fontsize=9)
        right.set_xlabel("effective samples (log scale)")
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
    return _save(figure, path, tight=False)


def _chosen_dimensions(idata, ranking, max_dims) -> list[tuple[str, dict]]:
    return ranked_dimensions(idata, ranking, continuous_sites(idata), max_dims)


def _label(name: str, selection: dict) -> str:
    return f"{name}[{', '.join(str(i) for i in selection.values())}]" if selection else name


def forest_plot(idata, points: Sequence[int], path: str | Path, ranking=None, max_dims: int = 8) -> Path | None:
    """Mean and 94% interval of the chosen datapoints' continuous latents (the ``max_dims``
    dimensions with the largest ``ranking``): the guide's q(z | x) beside the PSIS-weighted
    posterior (approximately p(z | x)), one row per point and dimension."""
    chosen = _chosen_dimensions(idata, ranking, max_dims)
    if not chosen:
        return None
    guide_draws, weighted = group(idata, GUIDE_GROUP), group(idata, "posterior")
    rows = [(point, name, selection) for point in points for name, selection in chosen]
    figure, axis = plt.subplots(figsize=(6.5, 0.9 + 0.28 * len(rows)))
    for offset, (source, colour, title) in enumerate(((guide_draws, "C0", "guide q(z | x)"), (weighted, "C3", "PSIS-weighted posterior"))):
        for row, (point, name, selection) in enumerate(rows):
            values = source[name].sel(obs=point, **selection).values.reshape(-1).astype(np.float64)
            low, mid, high = np.quantile(values, [0.03, 0.5, 0.97])
            y = row + (offset - 0.5) * 0.3
            axis.plot([low, high], [y, y], color=colour, linewidth=1.5, label=title if row == 0 else None)
            axis.plot([values.mean()], [y], "o", color=colour, markersize=3)
    axis.set_yticks(range(len(rows)), [f"point {point}: {_label(name, selection)}" for point, name, selection in rows], fontsize=7)
    axis.invert_yaxis()
    axis.legend(fontsize=7, loc="best")
    axis.set_xlabel("latent value (mean and 94% interval)")
    axis.set_title(f"test points {', '.join(str(p) for p in points)}: q(z | x) and the PSIS-weighted posterior", fontsize=9)
    return _save(figure, path)


def posterior_plot(idata, points: Sequence[int], path: str | Path, ranking=None, max_dims: int = 3, psis=None) -> Path | None:
    """One row per chosen datapoint: the PSIS-weighted posterior (approximately p(z | x)) of the
    ``max_dims`` continuous dimensions with the largest ``ranking`` as histograms, the guide's
    q(z | x) drawn as a line over them, and every enumerated site as P(class | x) per class
    (its draws weighted by the PSIS weights ``psis["psis_log_weight"]``, or counted in the
    resampled posterior without ``psis``). Each panel's title names the point, the site, the
    weighted mean and the point's k-hat."""
    chosen = _chosen_dimensions(idata, ranking, max_dims)
    categorical = sorted(_enumerated(idata))
    if not chosen and not categorical:
        return None
    guide_draws, weighted = group(idata, GUIDE_GROUP), group(idata, "posterior")
    columns = len(chosen) + len(categorical)
    figure, axes = plt.subplots(len(points), columns, figsize=(3.2 * columns, 2.5 * len(points)), squeeze=False)
    for r, point in enumerate(points):
        k = float(psis["pareto_k"].sel(obs=point)) if psis is not None else None
        note = f", k-hat {k:.2f}" if k is not None and np.isfinite(k) else ""
        for c, (name, selection) in enumerate(chosen):
            axis = axes[r, c]
            values = weighted[name].sel(obs=point, **selection).values.reshape(-1).astype(np.float64)
            proposal = guide_draws[name].sel(obs=point, **selection).values.reshape(-1).astype(np.float64)
            bins = np.histogram_bin_edges(np.concatenate([values, proposal]), bins=30)
            axis.hist(values, bins=bins, density=True, color="C3", alpha=0.6, label="PSIS-weighted")
            counts, edges = np.histogram(proposal, bins=bins, density=True)
            axis.step(edges[:-1], counts, where="post", color="C0", label="guide q(z | x)")
            axis.set_title(f"point {point}: {_label(name, selection)}\nweighted mean {values.mean():.2f}{note}", fontsize=8)
            axis.set_yticks([])
            axis.xaxis.set_major_locator(MaxNLocator(4))
            axis.tick_params(labelsize=7)
            if r == 0 and c == 0:
                axis.legend(fontsize=6)
        for c, name in enumerate(categorical, start=len(chosen)):
            axis = axes[r, c]
            draws = guide_draws[name].sel(obs=point).values.reshape(-1)
            if psis is not None:
                weights = np.exp(psis["psis_log_weight"].sel(obs=point).values.reshape(-1))
            else:
                draws = weighted[name].sel(obs=point).values.reshape(-1)
                weights = np.full(draws.shape, 1.0 / draws.size)
            if (draws < 0).all():
                axis.text(0.5, 0.5, "hidden by a mask\n(the label is observed)", ha="center", va="center", fontsize=8)
                axis.set_axis_off()
                axis.set_title(f"point {point}: {name}", fontsize=8)
                continue
            classes = np.arange(int(guide_draws[name].max()) + 1)
            probabilities = np.array([weights[draws == value].sum() for value in classes])
            probabilities = probabilities / probabilities.sum()
            axis.bar(classes, probabilities, color="C3")
            axis.set_xticks(classes)
            axis.set_ylim(0, 1)
            best = int(probabilities.argmax())
            axis.set_title(f"point {point}: P({name} | x)\nmost probable {best} ({probabilities[best]:.3f}){note}", fontsize=8)
            axis.set_xlabel("class", fontsize=7)
            axis.set_yticks([0, 0.5, 1])
            axis.tick_params(labelsize=7)
    figure.suptitle("PSIS-weighted posterior p(z | x) of the chosen test points (line: the guide's q(z | x))", fontsize=9)
    figure.subplots_adjust(left=0.04, right=0.98, bottom=0.08, hspace=0.75, wspace=0.25, top=1 - 0.45 / len(points))
    return _save(figure, path, tight=False)
