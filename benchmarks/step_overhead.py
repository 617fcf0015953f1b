"""Per-step overhead of pyrovae's objective against the hand-written one, step by step.

A diagnostic beside ``overhead.py``: it times single optimizer steps (objective, backward,
clipping, Adam) on one fixed binary batch, alternating pyrovae's step and the plain step so
that both see the same machine speed, and prints the median over ``--steps`` of each and
their ratio. ``pyrovae_trace`` is the same step through ``train.compile = "trace"``'s
:class:`~pyrovae.train.compiled.CompiledStep` (captured once, then replayed). ``--tiny`` shrinks the networks to nothing (batch 2, hidden 4, latent 2), so
what remains is each step's fixed Python cost.

    python benchmarks/step_overhead.py [--steps 1500] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch

from overhead import BATCH, CLIP, HIDDEN, LATENT, LR, PlainVAE

import pyrovae  # noqa: F401
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.objectives import ELBO, IWAE
from pyrovae.pair import DataSpec
from pyrovae.train.compiled import CompiledStep


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    batch, hidden, latent = (2, 4, 2) if args.tiny else (BATCH, HIDDEN, LATENT)
    # The fit loop turns argument validation off after its first step; so do both sides here.
    pyro.enable_validation(False)
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((batch, 784), 0.3))
    spec = DataSpec("binary", (784,), "binary")
    model = GaussianVAE(GaussianVAEConfig(latent_dim=latent, hidden=[hidden]), spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[hidden]), spec, model)
    ours = [p for part in (model, guide) for p in part.parameters()]
    ours_optimizer = torch.optim.Adam([{"params": list(model.parameters())}, {"params": list(guide.parameters())}], lr=LR)
    plain = PlainVAE(hidden, latent)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=LR)

    def step(loss, optimizer, parameters):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()

    ratios = {}
    print(f"threads={torch.get_num_threads()} batch={batch} hidden={hidden} latent={latent} steps={args.steps}")
    for label, particles, iwae, objective in (("elbo", 1, False, ELBO()), ("iwae_k5", 5, True, IWAE(5))):
        compiled = CompiledStep("trace", model, guide, objective)
        runs = {
            "pyrovae": lambda: step(objective(model, guide, {"x": x})[0], ours_optimizer, ours),
            "pyrovae_trace": lambda: step(compiled({"x": x}, 1.0, {})[0], ours_optimizer, ours),
            "plain": lambda: step(plain.loss(x, particles, iwae), plain_optimizer, list(plain.parameters())),
        }
        times = {name: [] for name in runs}
        for index in range(args.steps + 50):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                if index >= 50:  # warm-up steps are not timed
                    times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        ratios[label] = median["pyrovae"] / median["plain"]
        ratios[f"{label}_trace"] = median["pyrovae_trace"] / median["plain"]
        print(
            f"{label}: pyrovae {median['pyrovae']:.3f} ms  pyrovae_trace {median['pyrovae_trace']:.3f} ms  "
            f"plain {median['plain']:.3f} ms  ratio {ratios[label]:.3f}  trace ratio {ratios[f'{label}_trace']:.3f}"
        )
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
