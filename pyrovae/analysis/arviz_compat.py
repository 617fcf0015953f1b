"""The few ArviZ calls pyrovae makes, written once for both release lines.

ArviZ 0.x keeps the groups of a fit in ``arviz.InferenceData``; ArviZ 1.x (Python >= 3.12) in an
``xarray.DataTree`` and splits into arviz-base, arviz-stats and arviz-plots. Everything else in
``pyrovae.analysis`` reads groups as ``xarray.Dataset`` through :func:`group` and never touches
either container directly, so one code path serves both lines.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import xarray as xr

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its 1.0 refactor on import
    import arviz as az

ARVIZ_VERSION = str(az.__version__)
ARVIZ_1 = int(ARVIZ_VERSION.split(".")[0]) >= 1


def inference_data(groups: Mapping[str, xr.Dataset], attrs: Mapping[str, object] | None = None):
    """The groups as ArviZ's container: ``InferenceData`` (0.x) or ``xarray.DataTree`` (1.x).
    Groups outside ArviZ's schema (``guide_draws``, ``guide_log_likelihood``) are kept as they are."""
    if ARVIZ_1:
        tree = xr.DataTree.from_dict({f"/{name}": dataset for name, dataset in groups.items()})
        tree.attrs.update(dict(attrs or {}))
        return tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "group ... not defined in the InferenceData scheme"
        idata = az.InferenceData(**groups)
    if attrs:
        idata.attrs = dict(attrs) if not hasattr(idata, "attrs") else {**idata.attrs, **dict(attrs)}
    return idata


def group_names(idata) -> list[str]:
    """The names of the groups (``posterior``, ``sample_stats`` ...), on either line."""
    if isinstance(idata, xr.DataTree):
        return [str(name) for name in idata.children]
    return list(idata.groups())


def has_group(idata, name: str) -> bool:
    return name in group_names(idata)


def group(idata, name: str) -> xr.Dataset:
    """One group as an ``xarray.Dataset`` (a DataTree node's dataset under ArviZ 1.x)."""
    if not has_group(idata, name):
        raise KeyError(f"the posterior file has no group {name!r} (it has {', '.join(group_names(idata))})")
    if isinstance(idata, xr.DataTree):
        return idata[name].to_dataset()
    return getattr(idata, name)


def to_netcdf(idata, path: str | Path, complevel: int = 1) -> Path:
    """Write ``idata`` to ``path``: netCDF-4 (h5netcdf), one netCDF group per group, numbers
    zlib-compressed (level ``complevel``, byte shuffle) as ArviZ itself writes them, on either line;
    ``az.from_netcdf`` reads it back."""
    path = Path(path)
    if path.exists():
        path.unlink()
    root = idata.attrs if isinstance(idata, xr.DataTree) else getattr(idata, "attrs", {})
    xr.Dataset(attrs={key: value for key, value in dict(root or {}).items()}).to_netcdf(str(path), mode="w", engine="h5netcdf")
    for name in group_names(idata):
        data = group(idata, name)
        encoding = {
            var: {"zlib": True, "complevel": complevel, "shuffle": True}
            for var, array in data.variables.items()
            if array.dtype.kind in "fiub" and array.ndim > 0
        }
        if name == "posterior":
            # A resample repeats each kept draw in a run along `draw`: one chunk per point holds the
            # runs together, so zlib stores a repeat in a few bytes (fewer distinct draws, smaller file).
            for var, array in data.data_vars.items():
                if array.dims[:3] == ("chain", "draw", "obs") and var in encoding:
                    encoding[var]["chunksizes"] = (1, array.sizes["draw"], 1, *array.shape[3:])
        data.to_netcdf(str(path), mode="a", group=name, engine="h5netcdf", encoding=encoding)
    return path


def from_netcdf(path: str | Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.from_netcdf(str(path))


def dataset(variables: Mapping[str, np.ndarray], coords, dims, attrs, sampled: bool = True) -> xr.Dataset:
    """``az.dict_to_dataset`` on either line: ``sampled`` variables lead with (chain, draw)."""
    used = {dim for name in variables for dim in dims.get(name, [])}
    coords = {dim: values for dim, values in coords.items() if dim in used}
    dims = {name: dims[name] for name in variables}
    if ARVIZ_1:
        return az.dict_to_dataset(
            dict(variables), attrs=dict(attrs), coords=coords, dims=dims, sample_dims=None if sampled else [], check_conventions=False
        )
    return az.dict_to_dataset(dict(variables), attrs=dict(attrs), library=None, coords=coords, dims=dims, default_dims=None if sampled else [])


def psislw(log_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed log-weights, Pareto k-hat) of rows of log-weights (N, S), relative efficiency 1
    (the draws are independent); ArviZ's ``psislw`` on either line, its warnings left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # psislw warns once when some k > 0.7: pyrovae reports k per point
        if ARVIZ_1:
            from arviz_stats.base.array import array_stats

            raw = np.asarray(log_weight, dtype=np.float64)
            # 1.x's psislw takes log-likelihoods (it smooths exp(-ary)) and returns normalized
            # log-weights: give it -log w, and put the weights back on the raw scale (the draws
            # below the tail keep their raw values, so the median shift is the normalizer).
            smoothed, k = array_stats.psislw(-raw, r_eff=1.0, axis=-1)
            smoothed = np.asarray(smoothed)
            smoothed = smoothed + np.median(raw - smoothed, axis=-1, keepdims=True)
            return smoothed, np.asarray(k)
        array = xr.DataArray(np.asarray(log_weight, dtype=np.float64), dims=("obs", "__sample__"))
        smoothed, k = az.psislw(array, reff=1.0, normalize=False)
        return smoothed.values, k.values


def elpd_data(pointwise: xr.DataArray, pareto_k: xr.DataArray, num_samples: int, good_k: float = 0.7):
    """ArviZ's own comparison object (``ELPDData``, kind ``loo``) for a model whose global
    parameters are point estimates: elpd = sum_n log p(x_n), p = 0 (no posterior over the
    parameters to pay for), se = sqrt(N) sd_n(log p(x_n)), the pointwise values ``pointwise`` and,
    as ``pareto_k``, the k-hat of the importance weights that estimated each log p(x_n).
    ``az.compare`` takes a dict of them and ``az.plot_compare`` draws its result, on either line."""
    values = np.asarray(pointwise.values, dtype=np.float64)
    count = values.size
    total, se = float(values.sum()), float(np.sqrt(count) * values.std()) if count > 1 else 0.0
    warning = bool(np.any(np.asarray(pareto_k.values) > good_k))
    if ARVIZ_1:
        return az.ELPDDataLOO(
            elpd=total, se=se, p=0.0, n_samples=int(num_samples), n_data_points=count, scale="log", warning=warning,
            good_k=float(good_k), elpd_i=pointwise, pareto_k=pareto_k,
        )
    return az.ELPDData(
        data=[total, se, 0.0, int(num_samples), count, warning, pointwise, pareto_k, "log", float(good_k)],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k", "scale", "good_k"],
    )


def compare(elpds: Mapping[str, object]):
    """``az.compare`` of precomputed ``ELPDData`` (stacking weights; ranks, elpd_diff, dse),
    unrounded. ``elpd_diff`` is best minus this run under ArviZ 0.x, this run minus best under
    1.x: its size is the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        if ARVIZ_1:
            return az.compare(dict(elpds), round_to="none")
        return az.compare(dict(elpds))


def plot_compare(table, title: str):
    """``az.plot_compare`` of :func:`compare`'s table on matplotlib; returns the figure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            collection = az.plot_compare(table, backend="matplotlib")
            figure = collection.viz["figure"].item()
        else:
            axis = az.plot_compare(table, insample_dev=False)
            figure = axis.figure
    figure.suptitle(title, fontsize=9)
    return figure
