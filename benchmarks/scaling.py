"""Data-parallel scaling of pyrovae's fit loop: training steps per second at 1, 2, ... processes.

Each configuration is one ``torchrun --standalone`` job on this machine running pyrovae's own
``fit`` (gloo on the CPU, nccl on CUDA, chosen by the loop). Weak scaling: every process takes
``--per-rank-batch`` images per step, so the global batch (``train.batch_size``) is that times
the number of processes and every configuration takes the same number of steps per epoch. The
model is the 784-400-50 VAE of ``benchmarks/overhead.py`` (Bernoulli decoder, diagonal-Normal
encoder, single-sample ELBO or IWAE), trained on random binary images (the speed does not depend
on their content). Each job trains 2 epochs of ``--steps`` steps; the second epoch's time (from
``metrics.jsonl``'s ``seconds``, which includes one 128-image validation batch) is the measurement,
the first is warm-up.

    images/s   = steps * global batch / seconds
    efficiency = images/s at N processes / (N * images/s of the first configuration per process)

On the CPU each process gets ``--threads`` threads (``OMP_NUM_THREADS``, default 1), so on a
machine with C cores up to C processes do not compete for cores. Configurations are written
``PROCESSESxTHREADS``; the default on the CPU is ``1x1,2x1,1x2`` (the last: one process using both
threads of a 2-core machine, for comparison). With CUDA (``--device cuda``) the default is 1, 2,
4, ... processes up to the number of GPUs, one GPU each.

    python benchmarks/scaling.py                      # CPU: 1x1, 2x1, 1x2
    python benchmarks/scaling.py --device cuda        # every GPU count up to torch.cuda.device_count()
    python benchmarks/scaling.py --configs 1x1,2x1 --steps 100 --objective iwae
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_configs(text: str | None, device: str) -> list[tuple[int, int]]:
    if text:
        pairs = []
        for item in text.split(","):
            processes, _, threads = item.strip().partition("x")
            pairs.append((int(processes), int(threads or 1)))
        return pairs
    if device == "cuda":
        import torch

        count, n, pairs = torch.cuda.device_count(), 1, []
        while n <= count:
            pairs.append((n, 1))
            n *= 2
        if pairs and pairs[-1][0] != count:
            pairs.append((count, 1))
        return pairs
    return [(1, 1), (2, 1), (1, 2)]


def worker(args) -> None:
    """One rank of one configuration (run under torchrun)."""
    import torch

    import pyrovae  # noqa: F401
    from pyrovae.data import make_splits
    from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
    from pyrovae.models import GaussianVAE, GaussianVAEConfig
    from pyrovae.objectives import ELBO, IWAE
    from pyrovae.pair import DataSpec
    from pyrovae.train import TrainConfig, distributed, fit

    context = distributed.setup(args.device)
    world = context.world_size
    global_batch = args.per_rank_batch * world
    rows = args.steps * global_batch
    generator = torch.Generator().manual_seed(0)
    spec = DataSpec("random", (784,), "unit_interval", image_shape=(28, 28))
    data = make_splits(
        spec,
        {"x": torch.rand(rows + 128, 784, generator=generator)},
        {"x": torch.rand(128, 784, generator=generator)},
        validation=128,
        binarize="dynamic",
        seed=0,
    )
    torch.manual_seed(0)
    model = GaussianVAE(GaussianVAEConfig(latent_dim=args.latent, hidden=[args.hidden], likelihood="bernoulli"), data.spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[args.hidden]), data.spec, model)
    objective = IWAE(particles=args.particles) if args.objective == "iwae" else ELBO()
    config = TrainConfig(epochs=2, batch_size=global_batch, lr=1e-3, device=args.device, log_every=50)
    with tempfile.TemporaryDirectory() as folder:
        result = fit(model, guide, objective, data, config, run_dir=folder if context.is_main else None, progress=False)
    if context.is_main:
        seconds = result.state.history[-1]["seconds"]
        print("RESULT " + json.dumps({"processes": world, "seconds": seconds, "steps": args.steps, "global_batch": global_batch,
                                      "device": str(result.device)}), flush=True)
    distributed.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", help="comma-separated PROCESSESxTHREADS, e.g. 1x1,2x1 (default: see the module docstring)")
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch (default 60)")
    parser.add_argument("--per-rank-batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--latent", type=int, default=50)
    parser.add_argument("--objective", choices=["elbo", "iwae"], default="elbo")
    parser.add_argument("--particles", type=int, default=5, help="IWAE particles (default 5)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    configs = parse_configs(args.configs, args.device)
    print(
        f"device={args.device} cpus={os.cpu_count()} gpus={torch.cuda.device_count() if torch.cuda.is_available() else 0} "
        f"torch={torch.__version__} model=784-{args.hidden}-{args.latent} objective={args.objective} "
        f"per_rank_batch={args.per_rank_batch} steps={args.steps}",
        flush=True,
    )
    rows = []
    for processes, threads in configs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", __file__,
                   "--worker", "--device", args.device, "--steps", str(args.steps), "--per-rank-batch", str(args.per_rank_batch),
                   "--hidden", str(args.hidden), "--latent", str(args.latent), "--objective", args.objective, "--particles", str(args.particles)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{processes}x{threads}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        result = json.loads(lines[-1][len("RESULT ") :])
        result.update(threads=threads, images_per_second=result["steps"] * result["global_batch"] / result["seconds"],
                      steps_per_second=result["steps"] / result["seconds"], job_seconds=time.perf_counter() - started)
        rows.append(result)
    base = rows[0]["images_per_second"] / rows[0]["processes"]
    print(f"{'config':>7} {'global batch':>12} {'steps/s':>8} {'images/s':>9} {'efficiency':>10}")
    for row in rows:
        efficiency = row["images_per_second"] / (row["processes"] * base)
        row["efficiency"] = efficiency
        print(f"{row['processes']}x{row['threads']:<5} {row['global_batch']:>12} {row['steps_per_second']:>8.2f} "
              f"{row['images_per_second']:>9.0f} {efficiency:>10.2f}")
    print("json=" + json.dumps(rows))


if __name__ == "__main__":
    main()
