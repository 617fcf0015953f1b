"""Pictures of a trained pair: samples from the prior, reconstructions, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402

from pyrovae.pair import Model  # noqa: E402


def observation_means(model: Model, guide, batch, from_prior: bool) -> torch.Tensor:
    """Mean of p(x | z) at the model's observed site, with z from the prior or from q(z | x)."""
    with torch.no_grad():
        if from_prior:
            trace = poutine.trace(model).get_trace(**batch)
        else:
            guide_trace = poutine.trace(guide).get_trace(**batch)
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    return trace.nodes[model.observed_site]["fn"].mean


def sample_grid(model: Model, guide, x: torch.Tensor, path: str | Path, image_shape: Sequence[int], count: int = 16) -> Path:
    """One PNG: a row block of prior samples, then test images above their reconstructions."""
    model.eval()
    guide.eval()
    x = x[:count]
    prior = observation_means(model, guide, {"x": x}, from_prior=True)
    reconstructions = observation_means(model, guide, {"x": x}, from_prior=False)
    rows = [("prior sample", prior), ("data", x), ("reconstruction", reconstructions)]
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.8, len(rows) * 0.95))
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
    right.set_xlabel("epoch")
    right.set_ylabel("KL (nats) / beta")
    right.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
