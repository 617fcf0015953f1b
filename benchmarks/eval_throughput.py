"""Evaluation throughput: the importance-sampled log-likelihood, in images x particles per second.

Times :func:`pyrovae.analysis.importance_log_likelihood` (the estimate behind ``final.json``'s
``test_log_likelihood`` and ``pyrovae evaluate``) for the 784-400-50 VAE of
``benchmarks/overhead.py`` on random binary images, at each particle count K, on each device:
the CPU always, CUDA when it is available. One warm-up call on a few images precedes each
measurement; the measurement is the best of ``--repeats`` calls.

    throughput = images * K / seconds

    python benchmarks/eval_throughput.py                          # K = 100 and 1000, 200 images
    python benchmarks/eval_throughput.py --particles 5000 --images 100 --batch-size 100
    python benchmarks/eval_throughput.py --run runs/mnist_vae     # a trained run's model, guide and test images

**Sentences** (``--sentences``): the sentence VAE at the reviews experiments' sizes (embedding 128,
LSTM 256, z = 32, vocabulary of the reviews words seen 5 times, rows of at most 40 ids; the first
``--images`` test reviews of ../shared/data/reviews, or random words of that shape without it),
K = 500, one process, both paths of :func:`pyrovae.analysis.likelihood.importance_estimate`:

- ``old``: the traced path, as every run evaluated before the sentence path existed, at the
  reviews TOMLs' settings (``evaluate.batch_size = 50``, ``evaluate.max_rows = 1000``);
- ``new``: the sentence path (encoder once per sentence, particles folded into the decoder's
  rows, the output layer at real positions a slice at a time) within ``--memory-gb``.

Each prints sentences per second and its peak resident memory above the process's size before it
(VmHWM, reset between the two; Linux), the two estimates' mean log p(x) and standard errors (they
must agree within them), then ``sentence_speedup=new/old``. ``--tiny``: tiny networks and data.
With CUDA (``--devices auto`` finds it, or ``--devices cpu,cuda``) both paths also run there (peak:
memory allocated on the device), and ``sentence_speedup_cuda_against_cpu_old`` compares the sentence
path on the GPU with the old path on this machine's CPU.

    python benchmarks/eval_throughput.py --sentences --images 20 --particles 500
    python benchmarks/eval_throughput.py --sentences --images 200 --particles 500 --devices cpu,cuda --memory-gb 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import pyrovae  # noqa: F401
from pyrovae.analysis import importance_log_likelihood


def build(args):
    from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
    from pyrovae.models import GaussianVAE, GaussianVAEConfig
    from pyrovae.pair import DataSpec

    if args.run:
        from pyrovae.experiment import Experiment

        experiment = Experiment.from_run(args.run)
        experiment.load_parameters(args.run)
        return experiment.model, experiment.guide, {k: v.cpu() for k, v in experiment.data.rows("test", 0, args.images).items()}
    torch.manual_seed(0)
    spec = DataSpec("random", (784,), "binary", image_shape=(28, 28))
    model = GaussianVAE(GaussianVAEConfig(latent_dim=50, hidden=[400], likelihood="bernoulli"), spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[400]), spec, model)
    x = torch.bernoulli(torch.full((args.images, 784), 0.3))
    return model, guide, {"x": x}


def measure(model, guide, data, device, particles, batch_size, repeats) -> float:
    model.to(device)
    guide.to(device)
    data = {key: value.to(device) for key, value in data.items()}
    warm = {key: value[: min(4, value.shape[0])] for key, value in data.items()}
    importance_log_likelihood(model, guide, warm, particles=min(particles, 50), batch_size=batch_size)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        importance_log_likelihood(model, guide, data, particles=particles, batch_size=batch_size)  # returns on the CPU: synchronised
        best = min(best, time.perf_counter() - started)
    return best


def resident_peak_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_resident_peak() -> float:
    """Reset VmHWM to the current resident size (Linux: clear_refs 5); returns that size in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return resident_peak_mb()


def sentence_pair(args):
    """The sentence VAE at the reviews sizes (or tiny) and the first ``args.images`` test rows."""
    from pyrovae.data import reviews
    from pyrovae.data.text import EOS, PAD
    from pyrovae.data.sequences import sequence_splits
    from pyrovae.guides import SentenceLSTMGuide, SentenceLSTMGuideConfig
    from pyrovae.models import SentenceVAE, SentenceVAEConfig

    sizes = dict(embedding_dim=8, hidden=8, latent_dim=2) if args.tiny else dict(embedding_dim=128, hidden=256, latent_dim=32)
    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "reviews"
    if corpus.exists() and not args.tiny:
        data, source = reviews(dir=corpus, max_length=40, min_count=5, max_size=5000), "reviews test split"
    else:
        generator = torch.Generator().manual_seed(0)
        vocabulary, longest = (30, 8) if args.tiny else (4592, 40)
        rows = [
            torch.randint(EOS + 1, vocabulary, (int(n),), generator=generator).tolist() + [EOS]
            for n in torch.randint(1, 2 * longest, (args.images,), generator=generator).clamp(max=longest - 1)
        ]
        data = sequence_splits(rows, rows, valid=rows, num_categories=vocabulary, max_length=longest, padding_index=PAD)
        source = "random words"
    torch.manual_seed(0)
    model = SentenceVAE(SentenceVAEConfig(**sizes, decoder="lstm"), data.spec)
    guide = SentenceLSTMGuide(SentenceLSTMGuideConfig(embedding_dim=sizes["embedding_dim"], hidden=sizes["hidden"]), data.spec, model)
    return model, guide, data.rows("test", 0, min(args.images, data.size("test"))), source


def sentence_main(args, devices: list[str]) -> None:
    from pyrovae.analysis.likelihood import importance_estimate

    model, guide, test, source = sentence_pair(args)
    count, particles = int(test["x"].shape[0]), int(args.particles.split(",")[0])
    tokens = int(test["lengths"].sum())
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} sentences={count} ({source}, {tokens} tokens) "
        f"K={particles} vocabulary={model.decoder.output.out_features}"
    )
    paths = {
        "old": dict(method="traced", batch_size=50, max_rows=1000),
        "new": dict(method="sentence", batch_size=50, memory_gb=args.memory_gb),
    }
    results = {}
    for device_name in devices:  # the old path on the CPU is "today" for the speed-up; each device runs both
        device = torch.device(device_name)
        model.to(device), guide.to(device)
        rows = {key: value.to(device) for key, value in test.items()}
        for name, options in paths.items():
            torch.manual_seed(1)
            warm = {key: value[:2] for key, value in rows.items()}
            importance_estimate(model, guide, warm, particles=min(particles, 20), **options)
            before = reset_peak(device)
            started = time.perf_counter()
            estimate = importance_estimate(model, guide, rows, particles=particles, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            peak = peak_mb(device) - before
            results[device_name, name] = (seconds, estimate)
            print(
                f"{device_name} {name}: {seconds:8.2f} s  {count / seconds:8.3f} sentences/s  peak memory +{peak:7.0f} MB "
                f"({'resident' if device.type == 'cpu' else 'allocated on the device'})  "
                f"mean log p(x) {estimate.mean:.3f} +- {estimate.standard_error:.3f}  ({options})",
                flush=True,
            )
    baseline_device = "cpu" if "cpu" in devices else devices[0]
    old_seconds, old = results[baseline_device, "old"]
    for device_name in devices:
        new_seconds, new = results[device_name, "new"]
        spread = 4 * math.sqrt(old.standard_error**2 + new.standard_error**2) + 1e-3
        if abs(old.mean - new.mean) > spread:
            raise SystemExit(f"the two paths disagree: {old.mean:.4f} and {new.mean:.4f} (more than {spread:.4f} apart)")
        suffix = "" if device_name == baseline_device else f"_{device_name.replace(':', '')}_against_{baseline_device}_old"
        print(f"sentence_speedup{suffix}={old_seconds / new_seconds:.3f}")


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory measurement: the CPU's resident peak (VmHWM) or CUDA's allocated peak, in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return reset_resident_peak()


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident_peak_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", default="100,1000", help="comma-separated K values (default 100,1000)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100, help="images per call of the pair (evaluate.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="auto", help="comma-separated, or auto: cpu, and cuda when available")
    parser.add_argument("--run", help="a run folder: use its model, guide and test images instead of random ones")
    parser.add_argument("--sentences", action="store_true", help="the sentence VAE at the reviews sizes: old against new path")
    parser.add_argument("--memory-gb", type=float, default=0.25, help="the sentence path's memory budget (evaluate.memory_gb)")
    parser.add_argument("--tiny", action="store_true", help="with --sentences: tiny networks and data (a smoke run)")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
    if args.sentences:
        sentence_main(args, devices)
        return
    model, guide, data = build(args)
    images = int(data["x"].shape[0])
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} cuda={torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'} "
        f"images={images} batch_size={args.batch_size}"
    )
    if not torch.cuda.is_available():
        print("(no CUDA device on this machine: CPU only)")
    rows = []
    for name in devices:
        device = torch.device(name)
        for particles in [int(k) for k in args.particles.split(",")]:
            seconds = measure(model, guide, data, device, particles, args.batch_size, args.repeats)
            rows.append({"device": name, "particles": particles, "images": images, "seconds": round(seconds, 3),
                         "images_x_particles_per_second": images * particles / seconds})
            print(f"{name:>5} K={particles:<6} {seconds:8.3f} s  {images * particles / seconds:12.0f} images x particles / s", flush=True)
    print("json=" + json.dumps(rows))


if __name__ == "__main__":
    main()
