"""One training epoch of the output-side VAE at extreme-multi-label scale, on the CPU.

The data are the synthetic generator's (``pyrovae.data.multilabel.synthetic_xml``): 100,000 sparse
TF-IDF features, 30,000 power-law labels, 10,000 training rows (plus ``--held-out`` validation and
as many test rows), held as CSR on the host and made dense a batch at a time
(:class:`pyrovae.data.sparse.SparseSplits`). The pair is ``output_vae`` / ``output_vae_encoder``,
X -> 600 -> 200 ~ z -> 600 -> Y with a Bernoulli (or ``--likelihood multinomial``) over the
labels, trained by the engine's own loop (``pyrovae.train.fit``, Adam, one epoch, then the
validation pass). The target is a peak resident set within 8 GB.

    OMP_NUM_THREADS=1 python benchmarks/sparse_scale.py [--batch 256] [--likelihood bernoulli]

Smaller settings (``--features``, ``--labels``, ``--epochs``, ``--lr``, ``--positive-weight``, ``--beta``) compare
the label likelihoods on sparse labels in minutes.

It prints the time to draw the data, the epoch's time (training steps and validation), P@1/P@5 of
the trained pair on the test rows beside those of the label frequencies (the ranking that ignores the
features), and the process's peak resident memory (``ru_maxrss``); the last line is ``peak_rss_gb=...``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

import pyrovae  # noqa: F401
from pyrovae.analysis.multilabel import multilabel_metrics, pair_multilabel_metrics
from pyrovae.data.multilabel import synthetic_xml
from pyrovae.guides import OutputVAEEncoder, OutputVAEEncoderConfig
from pyrovae.models import OutputVAE, OutputVAEConfig
from pyrovae.objectives import ELBO
from pyrovae.schedules import Constant
from pyrovae.train import TrainConfig, fit

TARGET_GB = 8.0


def peak_rss_gb() -> float:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=10000)
    parser.add_argument("--held-out", type=int, default=500, help="validation rows, and as many test rows")
    parser.add_argument("--features", type=int, default=100000)
    parser.add_argument("--labels", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--likelihood", default="bernoulli", choices=("bernoulli", "multinomial"))
    parser.add_argument("--positive-weight", type=float, default=1.0, help="Bernoulli only: weight of the positive-label terms")
    parser.add_argument("--beta", type=float, default=1.0, help="the KL weight (constant)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    data = synthetic_xml(
        examples=args.train_rows + 2 * args.held_out,
        features=args.features,
        labels=args.labels,
        test=args.held_out,
        validation=args.held_out,
        seed=args.seed,
    )
    drawn = time.perf_counter() - started
    x = data.csr("train", "x")
    print(
        f"data: {data.size('train')} train / {data.size('valid')} valid / {data.size('test')} test rows, "
        f"{args.features} features ({x.nnz / x.shape[0]:.0f} nonzeros per row), {args.labels} labels "
        f"({data.csr('train', 'y').nnz / x.shape[0]:.2f} per row); drawn in {drawn:.1f} s"
    )

    torch.manual_seed(args.seed)
    model = OutputVAE(OutputVAEConfig(likelihood=args.likelihood, positive_weight=args.positive_weight), data.spec)
    guide = OutputVAEEncoder(OutputVAEEncoderConfig(), data.spec, model)
    parameters = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in guide.parameters())
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, device="cpu")
    started = time.perf_counter()
    result = fit(model, guide, ELBO(), data, config, anneal=Constant(args.beta), progress=False)
    seconds = time.perf_counter() - started
    record = result.state.history[-1]
    steps = data.num_batches("train", args.batch) * args.epochs
    print(
        f"model: {parameters / 1e6:.1f} M parameters; {args.epochs} epoch(s) ({steps} steps of {args.batch}) with validation: "
        f"{seconds:.1f} s ({seconds / steps * 1000:.0f} ms a step, threads {torch.get_num_threads()}); "
        f"train ELBO {record['train/elbo']:.1f}, valid ELBO {record['valid/elbo']:.1f}, valid KL(q(z|x) || p(z)) {record['valid/kl/z']:.2f}"
    )
    test = data.rows("test", 0, data.size("test"))
    metrics = pair_multilabel_metrics(model, guide, test, data.csr("train", "y"), batch_size=100)
    print(
        f"test: P@1 {metrics['precision@1']:.3f}, P@5 {metrics['precision@5']:.3f}, PSP@5 {metrics['psp@5']:.3f}, "
        f"tail recall {metrics['tail_recall']:.3f}, predicted labels per row {metrics['predicted_labels_per_row']:.2f} "
        f"(true {metrics['true_labels_per_row']:.2f}), mean label probability {metrics['mean_score']:.2g}"
    )
    # The ranking a model that ignores the features can reach: every row scored by the label frequencies.
    train_labels = data.csr("train", "y")
    frequencies = torch.as_tensor(train_labels.mean(0), dtype=torch.float32).expand(data.size("test"), -1)
    reference = multilabel_metrics(frequencies, data.csr("test", "y").toarray(), train_labels)
    print(f"label frequencies as scores: P@1 {reference['precision@1']:.3f}, P@5 {reference['precision@5']:.3f}, PSP@5 {reference['psp@5']:.3f}")
    peak = peak_rss_gb()
    print(f"peak resident memory {peak:.2f} GB (target: within {TARGET_GB:g} GB: {'met' if peak <= TARGET_GB else 'NOT met'})")
    print(f"peak_rss_gb={peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
