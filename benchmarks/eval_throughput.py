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
"""

from __future__ import annotations

import argparse
import json
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", default="100,1000", help="comma-separated K values (default 100,1000)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100, help="images per call of the pair (evaluate.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="auto", help="comma-separated, or auto: cpu, and cuda when available")
    parser.add_argument("--run", help="a run folder: use its model, guide and test images instead of random ones")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
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
