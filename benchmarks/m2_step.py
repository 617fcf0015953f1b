"""One M2 training step: pyrovae's enumerated objective against a hand-written PyTorch M2 step.

Both sides train the same networks (the plain side holds copies of pyrovae's, with the same
weights) on the same semi-supervised batch: ``--batch`` MNIST-sized binary rows of which
``--labelled`` carry labels, the labels of the others summed out exactly over the 10 classes.
The plain step writes that sum with the classes as a batch dimension:

    L(x, c) = log p(x | c, z_c) + log p(c) + log p(z_c) - log q(z_c | x, c),  z_c ~ q(z | x, c), c = 0..9
    bound   = L(x, y) + alpha log q(y | x)                       labelled rows
            = sum_c q(c | x) [L(x, c) - log q(c | x)]            unlabelled rows

and pyrovae's step is ``EnumELBO()(model, guide, batch)`` on the registered ``m2`` pair (Pyro's
TraceEnum_ELBO with pyrovae's metrics). Each step is objective, backward, gradient clipping and
Adam. The steps alternate (pyrovae, plain, pyrovae, ...), so both see the same machine speed; the
result is the median over steps of the paired ratio pyrovae / plain.

    python benchmarks/m2_step.py [--steps 200] [--batch 110] [--labelled 10]

Its last line is ``ratio=...``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import pyro
import torch
from torch.nn import functional as F

import pyrovae  # noqa: F401
from pyrovae.guides import M2Guide, M2GuideConfig
from pyrovae.models import M2, M2Config
from pyrovae.objectives import EnumELBO
from pyrovae.pair import DataSpec

CLASSES, FEATURES, LATENT, HIDDEN, ALPHA, LR, CLIP = 10, 784, 50, 500, 50.0, 1e-3, 100.0
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class PlainM2(torch.nn.Module):
    """The hand-written step, on copies of the pair's networks."""

    def __init__(self, model: M2, guide: M2Guide):
        super().__init__()
        self.classifier = copy.deepcopy(model.classifier)
        self.decoder = copy.deepcopy(model.decoder)
        self.encoder = copy.deepcopy(guide.encoder)
        self.min_scale = guide.config.min_scale

    def loss(self, x, y, y_mask):
        rows = x.shape[0]
        log_q_y = self.classifier(x).log_softmax(-1)  # (B, C)
        every_class = torch.eye(CLASSES, dtype=x.dtype).unsqueeze(1).expand(CLASSES, rows, CLASSES)
        loc, raw_scale = self.encoder(x, every_class).chunk(2, -1)  # (C, B, D)
        scale = F.softplus(raw_scale) + self.min_scale
        noise = torch.randn_like(loc)
        z = loc + scale * noise
        log_q_z = (-0.5 * noise.pow(2) - scale.log() - HALF_LOG_2PI).sum(-1)
        log_p_z = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)
        logits = self.decoder(z, every_class)
        log_p_x = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        bound = log_p_x + log_p_z - log_q_z - math.log(CLASSES)  # L(x, c): (C, B)
        unlabelled = (log_q_y.exp().T * (bound - log_q_y.T)).sum(0)
        labelled = bound.gather(0, y.unsqueeze(0)).squeeze(0) + ALPHA * log_q_y.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return -torch.where(y_mask, labelled, unlabelled).mean()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=110)
    parser.add_argument("--labelled", type=int, default=10)
    args = parser.parse_args(argv)
    # The fit loop turns argument validation off after its first step; so do both sides here.
    pyro.enable_validation(False)
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(0)
    spec = DataSpec("binary", (FEATURES,), "binary", num_classes=CLASSES)
    model = M2(M2Config(latent_dim=LATENT, hidden=[HIDDEN], classifier_hidden=[HIDDEN], alpha=ALPHA), spec)
    guide = M2Guide(M2GuideConfig(hidden=[HIDDEN]), spec, model)
    plain = PlainM2(model, guide)
    x = torch.bernoulli(torch.full((args.batch, FEATURES), 0.3))
    y_mask = torch.arange(args.batch) >= args.batch - args.labelled
    y = torch.where(y_mask, torch.randint(0, CLASSES, (args.batch,)), 0)
    batch = {"x": x, "y": y, "y_mask": y_mask}
    objective = EnumELBO()
    ours = [*model.parameters(), *[p for p in guide.parameters() if all(p is not q for q in model.parameters())]]
    theirs = list(plain.parameters())
    ours_optimizer = torch.optim.Adam(ours, lr=LR)
    plain_optimizer = torch.optim.Adam(theirs, lr=LR)

    def step(loss, optimizer, parameters):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()

    runs = {
        "pyrovae": lambda: step(objective(model, guide, batch)[0], ours_optimizer, ours),
        "plain": lambda: step(plain.loss(x, y, y_mask), plain_optimizer, theirs),
    }
    # Same weights, same bound: the two losses agree in expectation (checked once, loosely).
    with torch.no_grad():
        torch.manual_seed(1)
        ours_loss = statistics.mean(float(objective(model, guide, batch)[0]) for _ in range(5))
        plain_loss = statistics.mean(float(plain.loss(x, y, y_mask)) for _ in range(5))
    times = {name: [] for name in runs}
    warmup = 10
    for index in range(args.steps + warmup):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    ratios = [a / b for a, b in zip(times["pyrovae"], times["plain"])]
    ratio = statistics.median(ratios)
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(
        f"threads={torch.get_num_threads()} batch={args.batch} labelled={args.labelled} classes={CLASSES} "
        f"hidden={HIDDEN} latent={LATENT} steps={args.steps} torch={torch.__version__}"
    )
    print(f"loss at the start (mean of 5 draws): pyrovae {ours_loss:.3f}  plain {plain_loss:.3f}")
    print(
        f"m2 step: pyrovae {median['pyrovae']:.2f} ms  plain {median['plain']:.2f} ms  "
        f"ratio of medians {median['pyrovae'] / median['plain']:.3f}  median paired ratio {ratio:.3f}"
    )
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
