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
    return trace.nodes[getattr(model, "observed_site", "x")]["fn"].mean


@contextlib.contextmanager
def _evaluation_mode(*parts):
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
    with _evaluation_mode(model, guide):
        prior = observation_means(model, guide, batch, from_prior=True)
        reconstructions = observation_means(model, guide, batch, from_prior=False)
    rows = [("prior sample", prior), ("data", x), ("reconstruction", reconstructions)]
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.8, len(rows) * 0.95), squeeze=False)
    for row, (label, images) in enumerate(rows):
        for column in range(count):
            axis = axes[row, column]
            axis.imshow(images[column].reshape(*image_shape).float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
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
        rows = _rounded(rows)
    if lengths is not None:
        rows = [row[: int(length)] for row, length in zip(rows, lengths.tolist())]
    return rows


def _rounded(value):
    if isinstance(value, list):
        return [_rounded(v) for v in value]
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
    with _evaluation_mode(model, guide):
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
    path.write_text(json.dumps(content, indent=1) + "\n")
    return path


def training_curves(history: list[dict], path: str | Path) -> Path:
    """Validation ELBO and per-site KL by epoch: the curves that show learning and collapse."""
    epochs = [record["epoch"] for record in history]
    kl_keys = sorted({key for record in history for key in record if key.startswith("valid/kl/")})
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for split in ("train", "valid"):
        left.plot(epochs, [record.get(f"{split}/elbo") for record in history], label=f"{split} ELBO")
    if any("valid/iwae" in record for record in history):
        left.plot(epochs, [record.get("valid/iwae") for record in history], label="valid IWAE bound")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per example")
    left.legend()
    for key in kl_keys:
        right.plot(epochs, [record.get(key) for record in history], label=key.removeprefix("valid/"))
    right.plot(epochs, [record.get("beta") for record in history], "k:", label="beta")
    for key in sorted({key for record in history for key in record if key.startswith("beta/")}):
        right.plot(epochs, [record.get(key) for record in history], ":", label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("KL (nats) / beta")
    right.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
