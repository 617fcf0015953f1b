"""Pictures of a trained pair: samples from the prior, reconstructions, training curves; for data
that are not images, the same samples and reconstructions as JSON rows."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402

from pyrovae.pair import Model  # noqa: E402
from pyrovae.files import save_figure, write_text_atomically


def _first_rows(data, count: int, inputs: Mapping[str, float] | None) -> dict:
    """The first ``count`` examples of every tensor of a batch (a tensor is taken as ``x``),
    plus the scheduled inputs: the whole batch the pair is called with."""
    tensors = {"x": data} if torch.is_tensor(data) else dict(data)
    rows = {key: value[:count] if torch.is_tensor(value) else value for key, value in tensors.items()}
    return {**rows, **dict(inputs or {})}


def observation_distributions(model: Model, guide, batch: Mapping) -> tuple:
    """p(x | z) at the model's observed site, with z from the prior and with z from q(z | x),
    both run on the whole ``batch``."""
    with torch.no_grad():
        prior_trace = poutine.trace(model).get_trace(**batch)
        guide_trace = poutine.trace(guide).get_trace(**batch)
        posterior_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    site = getattr(model, "observed_site", "x")
    return prior_trace.nodes[site]["fn"], posterior_trace.nodes[site]["fn"]


def observation_means(model: Model, guide, batch, from_prior: bool) -> torch.Tensor:
    """Mean of p(x | z) at the model's observed site, with z from the prior or from q(z | x).
    ``batch`` is the whole batch dict (``x``, labels, masks ..., scheduled inputs)."""
    with torch.no_grad():
        if from_prior:
            trace = poutine.trace(model).get_trace(**batch)
        else:
            guide_trace = poutine.trace(guide).get_trace(**batch)
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        # Inside no_grad: a distribution's lazily computed mean (probs from logits) would track gradients.
        return trace.nodes[getattr(model, "observed_site", "x")]["fn"].mean.detach()


@contextlib.contextmanager
def evaluation_mode(*parts):
    """The parts that are torch modules in evaluation mode (dropout off, batch-norm statistics
    used) inside the block, each back in its own mode after it."""
    modules = [part for part in parts if isinstance(part, torch.nn.Module)]
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def sample_grid(
    model: Model,
    guide,
    data,
    path: str | Path,
    image_shape: Sequence[int],
    count: int = 16,
    inputs: Mapping[str, float] | None = None,
) -> Path:
    """One PNG: a row block of prior samples, then test images above their reconstructions.

    ``data`` is a batch dict (``x`` and whatever else the model and guide read, e.g. labels)
    or a tensor of x; its first ``count`` rows are used, with ``inputs`` (scheduled inputs) added."""
    batch = _first_rows(data, count, inputs)
    x = batch["x"]
    count = min(count, int(x.shape[0]))
    with evaluation_mode(model, guide):
        prior = observation_means(model, guide, batch, from_prior=True)
        reconstructions = observation_means(model, guide, batch, from_prior=False)
    rows = [("prior sample", prior), ("data", x), ("reconstruction", reconstructions)]
    # One mosaic drawn as a single image (a grid of subplots takes seconds to render).
    height, width = int(image_shape[-2]), int(image_shape[-1])
    mosaic = torch.ones(len(rows) * (height + 1) - 1, count * (width + 1) - 1)
    for row, (_, images) in enumerate(rows):
        for column in range(count):
            tile = images[column].reshape(*image_shape).float().cpu().reshape(-1, height, width)[0]
            mosaic[row * (height + 1) : row * (height + 1) + height, column * (width + 1) : column * (width + 1) + width] = tile
    figure, axis = plt.subplots(figsize=(1.2 + count * 0.8, len(rows) * 0.95))
    axis.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([row * (height + 1) + height / 2 for row in range(len(rows))], [label for label, _ in rows], fontsize=8)
    axis.set_xticks([])
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path


def decoded_value(fn) -> torch.Tensor:
    """What a picture of p(x | z) shows: its mean, or for categorical observations (whose mean is
    undefined) the most probable value."""
    try:
        mean = fn.mean
    except NotImplementedError:
        mean = None
    if mean is not None and bool(torch.isfinite(mean).all()):
        return mean
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    # The most probable value: from logits where the distribution keeps only those (argmax is the same).
    scores = getattr(base, "logits", None) if "probs" not in base.__dict__ and hasattr(base, "logits") else getattr(base, "probs", None)
    if scores is None:
        raise ValueError(f"cannot draw {type(fn).__name__}: it has neither a finite mean nor probabilities")
    return scores.argmax(-1).to(torch.get_default_dtype())


def sample_rows_figure(
    model: Model,
    guide,
    data,
    path: str | Path,
    count: int = 16,
    inputs: Mapping[str, float] | None = None,
) -> Path:
    """The PNG of :func:`sample_rows` for data that are not images: three heat maps, one row per
    example and one column per feature (or sequence position): prior samples, test rows and their
    reconstructions, each the mean of p(x | z) (the most probable value for categorical data), on
    the whole batch. Positions past a row's ``lengths`` are left blank."""
    batch = _first_rows(data, count, inputs)
    with evaluation_mode(model, guide):
        prior, posterior = observation_distributions(model, guide, batch)
        with torch.no_grad():
            panels = [("prior samples", decoded_value(prior)), ("test rows", batch["x"]), ("reconstructions", decoded_value(posterior))]
    lengths = batch.get("lengths") if torch.is_tensor(batch.get("lengths")) else None
    figure, axes = plt.subplots(1, 3, figsize=(12, 0.3 * min(count, int(batch["x"].shape[0])) + 1.5), squeeze=False)
    values = [panel.detach().float().cpu().reshape(panel.shape[0], -1) for _, panel in panels]
    low = min(float(v.nan_to_num(0).min()) for v in values)
    high = max(float(v.nan_to_num(0).max()) for v in values)
    for axis, (label, _), rows in zip(axes[0], panels, values):
        rows = rows.clone()
        if lengths is not None and rows.shape[1] == int(batch["x"].shape[1]):
            positions = torch.arange(rows.shape[1]).unsqueeze(0)
            rows[positions >= lengths.cpu().unsqueeze(1)] = float("nan")
        image = axis.imshow(rows.numpy(), aspect="auto", interpolation="nearest", vmin=low, vmax=high, cmap="viridis")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("feature" if lengths is None else "position")
        axis.set_ylabel("example")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path = Path(path)
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path


def _is_discrete(fn) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except (AttributeError, NotImplementedError):
        return False


def _rows(values: torch.Tensor, discrete: bool, lengths) -> list:
    values = values.detach().cpu()
    values = values.round().long() if discrete else values.double()
    rows = values.tolist()
    if not discrete:
        rows = rounded(rows)
    if lengths is not None:
        rows = [row[: int(length)] for row, length in zip(rows, lengths.tolist())]
    return rows


def rounded(value):
    """Nested lists of floats to 5 significant digits (the JSON sample files)."""
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return float(f"{value:.5g}")


def sample_rows(
    model: Model,
    guide,
    data,
    path: str | Path,
    count: int = 16,
    inputs: Mapping[str, float] | None = None,
    about: Mapping | None = None,
) -> Path:
    """JSON for data that are not images: prior samples, the first ``count`` test rows and their
    reconstructions, on the whole batch (labels, masks, scheduled inputs included).

    For a discrete observation (integer tokens, categories, binary) the rows are integer
    values drawn from p(x | z); otherwise they are the means of p(x | z). Rows are cut to the
    batch's ``lengths`` where it has them. The file's keys: ``values`` (which of the two),
    ``prior_samples``, ``test_rows``, ``reconstructions``, and ``about`` (e.g. data set, step)."""
    batch = _first_rows(data, count, inputs)
    with evaluation_mode(model, guide):
        prior, posterior = observation_distributions(model, guide, batch)
        discrete = _is_discrete(posterior) or not batch["x"].is_floating_point()
        with torch.no_grad():
            if discrete:
                prior_values, reconstructions = prior.sample(), posterior.sample()
            else:
                prior_values, reconstructions = prior.mean, posterior.mean
    lengths = batch.get("lengths") if torch.is_tensor(batch.get("lengths")) else None
    content = {
        "about": dict(about or {}),
        "values": "integer draws from p(x | z)" if discrete else "means of p(x | z)",
        "prior_samples": _rows(prior_values, discrete, lengths),
        "test_rows": _rows(batch["x"], discrete, lengths),
        "reconstructions": _rows(reconstructions, discrete, lengths),
    }
    if inputs:
        content["about"]["inputs"] = dict(inputs)
    path = Path(path)
    write_text_atomically(path, json.dumps(content, indent=1) + "\n")
    return path


def training_curves(history: list[dict], path: str | Path) -> Path:
    """Four panels by epoch from ``metrics.jsonl`` records: the ELBO (train, valid, and the
    objective's own bound such as ``valid/iwae``), the reconstruction term E_q[log p(x | z)], the
    KL per latent site (``train/kl/<site>`` dashed, ``valid/kl/<site>`` solid: the curves that show
    collapse), and every schedule (``beta``, ``beta/<site>``, ``schedule/<input>``)."""
    epochs = [record["epoch"] for record in history]
    keys = sorted({key for record in history for key in record})

    def series(key):
        return [record.get(key, float("nan")) for record in history]

    figure, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    elbo, reconstruction, kl, schedules = axes
    for key in ("train/elbo", "valid/elbo"):
        if key in keys:
            elbo.plot(epochs, series(key), label=key.replace("/", " "))
    for key in keys:
        if key.startswith("valid/") and key.count("/") == 1 and key not in ("valid/elbo", "valid/reconstruction", "valid/loss"):
            elbo.plot(epochs, series(key), "--", label=f"{key.replace('/', ' ')} bound")
    elbo.set_title("ELBO")
    for key in ("train/reconstruction", "valid/reconstruction"):
        if key in keys:
            reconstruction.plot(epochs, series(key), label=key.replace("/", " "))
    reconstruction.set_title("reconstruction E_q[log p(x | z)]")
    for key in keys:
        if key.startswith("valid/kl/") or key.startswith("train/kl/"):
            kl.plot(epochs, series(key), "-" if key.startswith("valid/") else "--", label=key)
    kl.set_title("KL per latent site")
    for key in keys:
        if key == "beta" or key.startswith("beta/") or key.startswith("schedule/"):
            schedules.plot(epochs, series(key), label=key)
    schedules.set_title("schedules")
    for axis, unit in zip(axes, ("nats per example", "nats per example", "nats per example", "value")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(unit)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path
