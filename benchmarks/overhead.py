"""Overhead of pyrovae's fit loop against a hand-written PyTorch loop, in the same process.

Both train the same 784-400-50 VAE (Bernoulli decoder, diagonal-Normal encoder, tanh) on the
same dynamically binarized MNIST training set (or, without ../shared/data/mnist, random
images of the same shape), batch 128, Adam 1e-3, gradient-norm clipping at 100, data kept
as device tensors, and both end the epoch with one pass over the same 1,000 validation
examples. Objectives: the single-sample ELBO, and IWAE with K=5 particles per datapoint.

Each loop runs one full epoch, ``--repeats`` times. The two epochs of a repeat run back to
back (plain first in even repeats, pyrovae first in odd ones) and give one paired ratio,
pyrovae time / plain time. The CPU speed of a shared machine drifts by tens of percent over
seconds (``experiments/README.md`` shows it), and that drift hits both epochs of a pair
alike, so an objective's ratio is the median of its paired ratios. The ratio of the
minimum times is printed beside it. The last line is
``ratio=<max over objectives of the median paired ratio>``.

    python benchmarks/overhead.py [--data ../shared/data/mnist] [--repeats 7] [--device auto]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import pyrovae  # noqa: F401
from pyrovae.data import DataSplits, make_splits, mnist
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.objectives import ELBO, IWAE
from pyrovae.pair import DataSpec
from pyrovae.train import TrainConfig, fit, resolve_device

HIDDEN, LATENT, BATCH, LR, CLIP = 400, 50, 128, 1e-3, 100.0
LOG_2PI = math.log(2 * math.pi)


def load_data(directory: Path) -> DataSplits:
    if (directory / "train-images-idx3-ubyte.gz").exists():
        return mnist(dir=str(directory), validation=1000)
    print(f"(no MNIST in {directory}: using random images of the same shape)")
    spec = DataSpec("random", (784,), "unit_interval", image_shape=(28, 28))
    generator = torch.Generator().manual_seed(0)
    return make_splits(spec, {"x": torch.rand(60000, 784, generator=generator)}, {"x": torch.rand(100, 784, generator=generator)},
                       validation=1000, binarize="dynamic", seed=0)


class PlainVAE(nn.Module):
    """The same networks as GaussianVAE + DiagonalNormalGuide, with the ELBO and IWAE written by hand."""

    def __init__(self, hidden: int = HIDDEN, latent: int = LATENT):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, 784))

    def log_weights(self, x: torch.Tensor, particles: int) -> torch.Tensor:
        loc, raw_scale = self.encoder(x).chunk(2, -1)
        scale = F.softplus(raw_scale) + 1e-4
        noise = torch.randn((particles,) + loc.shape, device=x.device)
        z = loc + scale * noise
        log_q = (-0.5 * noise**2 - scale.log() - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        log_likelihood = -F.binary_cross_entropy_with_logits(self.decoder(z), x.expand(particles, *x.shape), reduction="none").sum(-1)
        return log_likelihood + log_prior - log_q  # (K, B)

    def loss(self, x: torch.Tensor, particles: int, iwae: bool) -> torch.Tensor:
        log_w = self.log_weights(x, particles)
        bound = torch.logsumexp(log_w, 0) - math.log(particles) if iwae else log_w.mean(0)
        return -bound.mean()


def plain_epoch(data: DataSplits, particles: int, iwae: bool, device) -> float:
    started = time.perf_counter()
    network = PlainVAE().to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=LR)
    for batch in data.batches("train", BATCH, shuffle=True):
        loss = network.loss(batch["x"], particles, iwae)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(network.parameters(), CLIP)
        optimizer.step()
    with torch.no_grad():
        total = sum(float(network.loss(b["x"], particles, iwae)) * len(b["x"]) for b in data.batches("valid", BATCH))
    assert math.isfinite(total)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def pyrovae_epoch(data: DataSplits, objective, device) -> float:
    started = time.perf_counter()
    spec = data.spec
    model = GaussianVAE(GaussianVAEConfig(latent_dim=LATENT, hidden=[HIDDEN]), spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[HIDDEN]), spec, model)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, clip_norm=CLIP, device=str(device))
    result = fit(model, guide, objective, data, config, progress=False)
    assert math.isfinite(result.state.history[-1]["valid/elbo"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    data = load_data(args.data).to(device)
    print(f"device={device} threads={torch.get_num_threads()} train={data.size('train')} batch={BATCH} torch={torch.__version__}")
    ratios = {}
    for label, particles, iwae, objective in (("elbo", 1, False, ELBO()), ("iwae_k5", 5, True, IWAE(5))):
        plain_times, pyrovae_times = [], []
        for repeat in range(args.repeats):
            pair = [lambda: plain_times.append(plain_epoch(data, particles, iwae, device)),
                    lambda: pyrovae_times.append(pyrovae_epoch(data, objective, device))]
            for run in pair if repeat % 2 == 0 else pair[::-1]:
                run()
        paired = [ours / plain for ours, plain in zip(pyrovae_times, plain_times)]
        ratios[label] = statistics.median(paired)
        print(f"{label}: median paired ratio {ratios[label]:.3f}  ratio of minimum times "
              f"{min(pyrovae_times) / min(plain_times):.3f}  (plain {[round(t, 2) for t in plain_times]} s, "
              f"pyrovae {[round(t, 2) for t in pyrovae_times]} s)")
    ratio = max(ratios.values())
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
