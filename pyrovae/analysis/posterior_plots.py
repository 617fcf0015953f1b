"""Pictures of the posterior: latent traversals, a 2-D map of the latents coloured by label, KL
per dimension, the guide's Pareto k-hat, and ArviZ forest and posterior plots of chosen
datapoints. Every function writes one PNG (matplotlib, Agg) and returns its path."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from pyro import poutine
from torch.distributions import constraints

from pyrovae.analysis.diagnostics import PARETO_K_BAD, PARETO_K_GOOD
from pyrovae.analysis.latents import continuous_sites
from pyrovae.analysis.plots import evaluation_mode, decoded_value, plt
from pyrovae.analysis.posterior import az, whole_batch
from pyrovae.traces import latent_sites


@contextlib.contextmanager
def _quiet():
    """ArviZ 0.x's deprecation notices (arrays for plot_khat, matplotlib's normalize_kwargs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _save(figure, path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _enumerated(idata) -> set[str]:
    if "posterior" not in idata.groups():
        return set()
    return set(str(idata.posterior.attrs.get("enumerated_sites", "")).split(",")) - {""}


def ranked_dimensions(idata, ranking: Mapping[str, xr.DataArray] | None, sites: Sequence[str], limit: int) -> list[tuple[str, dict]]:
    """The ``limit`` (site, {dim: index}) pairs with the largest ``ranking`` value (e.g. activity
    or KL per dimension), over the given sites; in order of the sites' dims without a ranking."""
    candidates = []
    for name in sites:
        var = idata.posterior[name]
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
    position = int(np.flatnonzero(idata.posterior.coords["obs"].values == point)[0])
    row = {key: value[position : position + 1] for key, value in tensors.items()}
    with torch.no_grad(), evaluation_mode(model):
        trace = poutine.trace(model).get_trace(**row, **extra)
    supports = {name: site["fn"].support for name, site in latent_sites(trace)}
    device = tensors["x"].device
    movable = [name for name in continuous_sites(idata) if name in supports and _is_real(supports[name])]
    if not movable:
        return None
    fixed = {}
    posterior = idata.posterior.sel(obs=point)
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
    spread = {name: idata.posterior[name].std(("chain", "draw", "obs")) for name in movable}
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
    for name in sites:
        means = idata.posterior[name].mean(("chain", "draw"))
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
    if "label" in idata.posterior.coords:
        classes = idata.posterior.coords["label"].values
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
    """The guide's Pareto k-hat per test point (``arviz.plot_khat``) and their histogram, with the
    0.5 and 0.7 thresholds of Yao et al. 2018."""
    k = psis["pareto_k"].values
    finite = k[np.isfinite(k)]
    exact = int(np.sum(np.isneginf(k)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    shown = np.where(np.isneginf(k), np.nan, k)
    with _quiet():
        az.plot_khat(shown, ax=left, show_hlines=True, markersize=6)
    left.set_title("Pareto k-hat per test point", fontsize=9)
    right.hist(finite, bins=30, color="C0")
    for line, style in ((PARETO_K_GOOD, ":"), (PARETO_K_BAD, "--")):
        right.axvline(line, color="k", linestyle=style, label=f"k = {line}")
    right.legend(fontsize=8)
    share = psis.attrs["share_above_threshold"]
    note = f"; {exact} with equal weights (exact)" if exact else ""
    right.set_title(f"k-hat > {psis.attrs['threshold']}: {share:.1%} of {k.size} points{note}", fontsize=9)
    right.set_xlabel("k-hat")
    right.set_ylabel("test points")
    figure.tight_layout()
    return _save(figure, path)


def _selection(idata, points, ranking, max_dims, with_enumerated) -> xr.Dataset:
    sites = continuous_sites(idata)
    chosen = ranked_dimensions(idata, ranking, sites, max_dims)
    variables = {}
    for name in sites:
        indices = [selection for site, selection in chosen if site == name]
        if not indices:
            continue
        var = idata.posterior[name].sel(obs=list(points))
        for dim in indices[0]:
            var = var.isel({dim: sorted({selection[dim] for selection in indices})})
        variables[name] = var
    if with_enumerated:
        for name in sorted(_enumerated(idata)):
            variables[name] = idata.posterior[name].sel(obs=list(points))
    return xr.Dataset(variables)


def forest_plot(idata, points: Sequence[int], path: str | Path, ranking=None, max_dims: int = 8) -> Path | None:
    """``arviz.plot_forest`` of the chosen datapoints' continuous latents (the ``max_dims``
    dimensions with the largest ``ranking``): the guide draws' mean and 94% HDI per dimension."""
    selected = _selection(idata, points, ranking, max_dims, with_enumerated=False)
    if not selected.data_vars:
        return None
    with _quiet():
        axes = az.plot_forest(selected, combined=True, textsize=8)
    figure = np.ravel(axes)[0].figure
    figure.suptitle(f"q(z | x) of test points {', '.join(str(p) for p in points)}: mean and 94% HDI", fontsize=9)
    return _save(figure, path)


def posterior_plot(idata, points: Sequence[int], path: str | Path, ranking=None, max_dims: int = 3) -> Path | None:
    """``arviz.plot_posterior`` of the chosen datapoints: the ``max_dims`` continuous dimensions
    with the largest ``ranking``, and enumerated sites (their draws from the exact conditional
    posterior)."""
    selected = _selection(idata, points, ranking, max_dims, with_enumerated=True)
    if not selected.data_vars:
        return None
    with _quiet():
        axes = az.plot_posterior(selected, textsize=8)
    figure = np.ravel(axes)[0].figure
    return _save(figure, path)
