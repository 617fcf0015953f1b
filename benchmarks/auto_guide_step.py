"""One training step with ``guide.name = "auto"`` against the same step with the written guide, and
both against a hand-written PyTorch VAE step (the plain reference), all in one process.

Pairs (dynamically binarized MNIST-sized rows, batch 128):

- ``vae``: the 784-500-500-50 Gaussian VAE; written guide ``diag_normal`` against ``auto``
  (mean field, the same architecture); plain reference: the same networks in plain torch;
- ``ladder``: the two-layer ``ladder_vae`` (z1 64, z2 32); written guide ``ladder_bottom_up``
  (q(z1 | x) q(z2 | z1)) against ``auto`` with ``structure = "dependent"``.

Each step is the objective (``elbo``), backward and Adam, eager and with the compiled step
(``train.compile = "trace"``). Steps alternate between the contenders so that all see the same
machine speed; each ratio is the median over steps of the paired ratio.

    python benchmarks/auto_guide_step.py [--steps 150] [--pairs vae ladder]

Its last line is ``ratio=...``: the auto step over the written step of the ``vae`` pair, eager.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import pyro
import torch
from torch.nn import functional as F

import pyrovae  # noqa: F401
from pyrovae.guides import AutoGuide, AutoGuideConfig, BottomUpGuide, BottomUpGuideConfig, DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.models.ladder import LadderVAE, LadderVAEConfig
from pyrovae.objectives import ELBO
from pyrovae.pair import DataSpec, check_pair
from pyrovae.train.compiled import CompiledStep

FEATURES, BATCH, LR = 784, 128, 1e-3
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def plain_vae_step(model, guide):
    """The VAE's ELBO written in plain torch, on the pair's own networks (the reference)."""
    encoder, decoder, min_scale = guide.encoder, model.decoder, guide.config.min_scale

    def loss(x):
        loc, raw = encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + min_scale
        noise = torch.randn_like(loc)
        z = loc + scale * noise
        log_q = (-0.5 * noise.pow(2) - scale.log() - HALF_LOG_2PI).sum(-1)
        log_p_z = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)
        log_p_x = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        return -(log_p_x + log_p_z - log_q).mean()

    return loss


def build(pair: str, spec: DataSpec, batch: dict):
    if pair == "vae":
        model = GaussianVAE(GaussianVAEConfig(latent_dim=50, hidden=[500, 500]), spec)
        written = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[500, 500]), spec, model)
        options = {"hidden": [500, 500]}
    else:
        model = LadderVAE(LadderVAEConfig(latent_dims=[64, 32], hidden=[[512, 512], [256, 256]]), spec)
        written = BottomUpGuide(BottomUpGuideConfig(), spec, model)
        options = {"hidden": [512, 512], "dependent_hidden": [256, 256], "activation": "leaky_relu", "structure": "dependent"}
    model.describe(batch)
    automatic = AutoGuide(AutoGuideConfig(**options), spec, model)
    for guide in (written, automatic):
        check_pair(model, guide, batch)
    return model, written, automatic


def contender(model, guide, batch, compiled: bool):
    objective = ELBO()
    parameters = list(model.parameters()) + list(guide.parameters())
    optimizer = torch.optim.Adam(parameters, lr=LR)
    step = CompiledStep("trace", model, guide, objective) if compiled else None

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = step(batch, 1.0, {})[0] if step is not None else objective(model, guide, batch)[0]
        loss.backward()
        optimizer.step()

    return run


def timed(runs: dict, steps: int, warmup: int = 10) -> dict:
    times = {name: [] for name in runs}
    for index in range(steps + warmup):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def paired(times: dict, numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pairs", nargs="+", default=["vae", "ladder"], choices=["vae", "ladder"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    spec = DataSpec("binary", (FEATURES,), "binary")
    batch = {"x": torch.bernoulli(torch.full((BATCH, FEATURES), 0.3))}
    print(f"threads={torch.get_num_threads()} batch={BATCH} steps={args.steps} torch={torch.__version__} pyro={pyro.__version__}")
    headline = float("nan")
    for pair in args.pairs:
        model, written, automatic = build(pair, spec, batch)
        # The fit loop turns argument validation off after its first, checked step; so does this.
        pyro.enable_validation(False)
        torch.distributions.Distribution.set_default_validate_args(False)
        runs = {
            "written": contender(model, written, batch, compiled=False),
            "auto": contender(model, automatic, batch, compiled=False),
            "written_trace": contender(model, written, batch, compiled=True),
            "auto_trace": contender(model, automatic, batch, compiled=True),
        }
        if pair == "vae":
            plain_loss = plain_vae_step(model, written)
            plain_parameters = list(model.parameters()) + list(written.parameters())
            plain_optimizer = torch.optim.Adam(plain_parameters, lr=LR)

            def plain():
                plain_optimizer.zero_grad(set_to_none=True)
                plain_loss(batch["x"]).backward()
                plain_optimizer.step()

            runs["plain"] = plain
        times = timed(runs, args.steps)
        medians = " ".join(f"{name} {statistics.median(values) * 1e3:.2f} ms" for name, values in times.items())
        print(f"{pair}: {medians}")
        print(f"{pair}: auto/written eager {paired(times, 'auto', 'written'):.3f}  traced {paired(times, 'auto_trace', 'written_trace'):.3f}")
        if "plain" in times:
            print(
                f"{pair}: against plain PyTorch: written {paired(times, 'written', 'plain'):.3f}  auto {paired(times, 'auto', 'plain'):.3f}  "
                f"written traced {paired(times, 'written_trace', 'plain'):.3f}  auto traced {paired(times, 'auto_trace', 'plain'):.3f}"
            )
            headline = paired(times, "auto", "written")
    print(f"ratio={headline:.3f}")
    return headline


if __name__ == "__main__":
    main(sys.argv[1:])
