"""pyrovae's fit loop against its peers on one VAE epoch, in one process, interleaved.

Every implementation trains the same 784-400-50 VAE (tanh, Bernoulli decoder, diagonal-Normal
encoder) for one epoch over the same statically binarized MNIST training images (or, without
../shared/data/mnist, random binary images of that shape), batch 128, Adam at 1e-3, and then makes
one pass over the same 1,000 validation images:

- ``plain``: a hand-written PyTorch loop (``PlainVAE`` of ``overhead.py``): the reference, 1.00x.
  Beyond the bare loop it clips the gradient norm, like pyrovae does by default.
- ``plain_fused_adam``: the same loop with ``torch.optim.Adam(fused=True)``, the optimizer pyrovae
  builds by default (``train.fused_optimizer``): it shows how much of a ratio is the optimizer.
- ``pyrovae``: :func:`pyrovae.train.fit` with ``GaussianVAE`` + ``DiagonalNormalGuide`` and the
  ``elbo`` objective (or ``iwae`` with K=5). Beyond the bare loop it checks every split and the pair
  before the first step, validates Pyro's and torch's arguments on that step, clips, snapshots the
  state for non-finite recovery, reads the device once every 50 steps, and logs per-site metrics.
- ``pyrovae_trace``: the same fit loop with ``train.compile = "trace"``: after the first step it
  captures the objective's tensor operations once per batch shape (two here: the full batch and
  the last, partial one), checks each capture against the eager step, and replays it. The capture costs are inside its epoch time.
- ``pyro_svi``: stock Pyro, written as Pyro's own VAE example writes it: ``pyro.module`` in the model
  and the guide, ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO())``, ``svi.step`` per batch (which
  reads the loss to the host every step) and ``svi.evaluate_loss`` for validation; argument validation
  off. ELBO only (Pyro has no vectorized per-datapoint IWAE with ``differentiable_loss``).
- ``pythae``: pythae's ``BaseTrainer`` with its ``VAE`` and these networks, when ``pythae`` is
  installed (``pip install -e ".[bench]"``). Beyond the bare loop it builds a DataLoader over the
  data, evaluates every epoch, logs, and writes its final model to a temporary folder. ELBO only;
  its KL term is analytic (as in ``meanfield_elbo``).

Each repeat runs every implementation once, in a rotated order. An implementation's ratio is the
median over repeats of its epoch time divided by the plain epoch time of the same repeat (the CPU
speed of a shared machine drifts; that drift hits one repeat's epochs alike). After each epoch the
trained encoder and decoder are scored with one common estimator of the test ELBO (the analytic-KL
ELBO averaged over 10 draws, on 1,000 test images), so the implementations are seen to learn alike.

    python benchmarks/peers.py [--data ../shared/data/mnist] [--repeats 3] [--objective elbo|iwae|both] [--train-examples N]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import BATCH, CLIP, HIDDEN, LATENT, LR, PlainVAE  # noqa: E402

import pyrovae  # noqa: E402,F401
from pyrovae.data import DataSplits, make_splits, mnist  # noqa: E402
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig  # noqa: E402
from pyrovae.models import GaussianVAE, GaussianVAEConfig  # noqa: E402
from pyrovae.objectives import ELBO, IWAE  # noqa: E402
from pyrovae.pair import DataSpec  # noqa: E402
from pyrovae.train import TrainConfig, fit  # noqa: E402

VALID, TEST = 1000, 1000


def load_data(directory: Path) -> DataSplits:
    if (directory / "train-images-idx3-ubyte.gz").exists():
        return mnist(dir=str(directory), validation=VALID, binarize="static")
    print(f"(no MNIST in {directory}: using random binary images of the same shape)")
    spec = DataSpec("random", (784,), "unit_interval", image_shape=(28, 28))
    generator = torch.Generator().manual_seed(0)
    train, test = torch.rand(60000, 784, generator=generator), torch.rand(TEST, 784, generator=generator)
    return make_splits(spec, {"x": train}, {"x": test}, validation=VALID, binarize="static", seed=0)


def common_test_elbo(encode, decode, x: torch.Tensor, draws: int = 10) -> float:
    """E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) per image, averaged over ``draws`` reparameterized
    draws; ``encode(x) -> (loc, scale)``, ``decode(z) -> logits``. The same for every implementation."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loc, scale = encode(x)
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum(-1)
        total = 0.0
        for _ in range(draws):
            z = loc + scale * torch.randn(loc.shape, generator=generator)
            total = total - F.binary_cross_entropy_with_logits(decode(z), x, reduction="none").sum(-1)
        return float((total / draws - kl).mean())


def plain_softplus_encoder(encoder: nn.Module):
    def encode(x):
        loc, raw = encoder(x).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4

    return encode


# --- implementations: each returns (seconds, common test ELBO) ---------------------------------


def run_plain(data: DataSplits, particles: int, iwae: bool, fused: bool = False) -> tuple[float, float]:
    started = time.perf_counter()
    network = PlainVAE()
    optimizer = torch.optim.Adam(network.parameters(), lr=LR, fused=fused or None)
    for batch in data.batches("train", BATCH, shuffle=True):
        loss = network.loss(batch["x"], particles, iwae)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(network.parameters(), CLIP)
        optimizer.step()
    with torch.no_grad():
        valid = sum(float(network.loss(b["x"], particles, iwae)) * len(b["x"]) for b in data.batches("valid", BATCH))
    assert math.isfinite(valid)
    seconds = time.perf_counter() - started
    return seconds, common_test_elbo(plain_softplus_encoder(network.encoder), network.decoder, data.test["x"][:TEST])


def run_plain_fused_adam(data: DataSplits, particles: int, iwae: bool) -> tuple[float, float]:
    return run_plain(data, particles, iwae, fused=True)


def run_pyrovae(data: DataSplits, particles: int, iwae: bool, compile: str = "none") -> tuple[float, float]:
    started = time.perf_counter()
    model = GaussianVAE(GaussianVAEConfig(latent_dim=LATENT, hidden=[HIDDEN]), data.spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[HIDDEN]), data.spec, model)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, clip_norm=CLIP, device="cpu", compile=compile)
    fit(model, guide, IWAE(particles) if iwae else ELBO(), data, config, progress=False)
    seconds = time.perf_counter() - started
    encoder = guide.encoder
    return seconds, common_test_elbo(plain_softplus_encoder(encoder), model.decoder, data.test["x"][:TEST])


def run_pyrovae_trace(data: DataSplits, particles: int, iwae: bool) -> tuple[float, float]:
    return run_pyrovae(data, particles, iwae, compile="trace")


class StockPyroVAE(nn.Module):
    """Pyro's examples/vae/vae.py shape: pyro.module in model and guide, Normal/Bernoulli sites."""

    def __init__(self):
        super().__init__()
        self.network = PlainVAE()

    def model(self, x):
        pyro.module("decoder", self.network.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.network.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.network.encoder)
        loc, raw = self.network.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))


def run_pyro_svi(data: DataSplits, particles: int, iwae: bool) -> tuple[float, float]:
    assert not iwae
    started = time.perf_counter()
    pyro.clear_param_store()
    vae = StockPyroVAE()
    with pyro.settings.context(module_local_params=False), pyro.validation_enabled(False):
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.ClippedAdam({"lr": LR, "clip_norm": CLIP}), pyro.infer.Trace_ELBO())
        for batch in data.batches("train", BATCH, shuffle=True):
            svi.step(batch["x"])
        valid = sum(svi.evaluate_loss(b["x"]) for b in data.batches("valid", BATCH))
    assert math.isfinite(valid)
    seconds = time.perf_counter() - started
    network = vae.network
    return seconds, common_test_elbo(plain_softplus_encoder(network.encoder), network.decoder, data.test["x"][:TEST])


def run_pythae(data: DataSplits, particles: int, iwae: bool) -> tuple[float, float]:
    assert not iwae
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(784, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2 * LATENT))

        def forward(self, x):
            loc, log_variance = self.net(x.reshape(x.shape[0], -1)).chunk(2, -1)
            return ModelOutput(embedding=loc, log_covariance=log_variance)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 784))

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).reshape(z.shape[0], 1, 28, 28))

    logging.getLogger("pythae").setLevel(logging.WARNING)  # its per-epoch report is not part of the timing's point
    started = time.perf_counter()
    encoder, decoder = Encoder(), Decoder()
    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce"), encoder=encoder, decoder=decoder)
    with tempfile.TemporaryDirectory() as folder:
        config = BaseTrainerConfig(
            output_dir=folder, num_epochs=1, learning_rate=LR, per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=BATCH, no_cuda=True,
        )
        train = BaseDataset(data.train["x"].reshape(-1, 1, 28, 28), torch.zeros(data.size("train")))
        valid = BaseDataset(data.valid["x"].reshape(-1, 1, 28, 28), torch.zeros(data.size("valid")))
        BaseTrainer(model=model, train_dataset=train, eval_dataset=valid, training_config=config).train()
    seconds = time.perf_counter() - started

    def encode(x):
        loc, log_variance = encoder.net(x).chunk(2, -1)
        return loc, (0.5 * log_variance).exp()

    return seconds, common_test_elbo(encode, decoder.net, data.test["x"][:TEST])


def available() -> dict:
    runs = {
        "plain": run_plain,
        "plain_fused_adam": run_plain_fused_adam,
        "pyrovae": run_pyrovae,
        "pyrovae_trace": run_pyrovae_trace,
        "pyro_svi": run_pyro_svi,
    }
    try:
        import pythae  # noqa: F401

        runs["pythae"] = run_pythae
    except ImportError:
        print("(pythae is not installed: pip install -e '.[bench]' to include it)")
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objective", choices=["elbo", "iwae", "both"], default="both")
    parser.add_argument("--train-examples", type=int, default=0, help="use only this many training images (0: all; for a smoke run)")
    args = parser.parse_args(argv)
    data = load_data(args.data)
    if args.train_examples:
        data = replace(data, train={key: value[: args.train_examples] for key, value in data.train.items()})
    print(f"threads={torch.get_num_threads()} train={data.size('train')} batch={BATCH} torch={torch.__version__} pyro={pyro.__version__}")
    results = {}
    objectives = [("elbo", 1, False), ("iwae_k5", 5, True)]
    objectives = [o for o in objectives if args.objective == "both" or o[0].startswith(args.objective)]
    for label, particles, iwae in objectives:
        runs = {name: run for name, run in available().items() if not iwae or name in ("plain", "plain_fused_adam", "pyrovae", "pyrovae_trace")}
        times = {name: [] for name in runs}
        elbos = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                seconds, elbo = runs[name](data, particles, iwae)
                times[name].append(seconds)
                elbos[name].append(elbo)
        print(f"{label}:")
        for name in names:
            ratio = statistics.median(ours / plain for ours, plain in zip(times[name], times["plain"]))
            results[f"{label}/{name}"] = ratio
            print(
                f"  {name:16s} median epoch {statistics.median(times[name]):6.2f} s  ratio {ratio:.3f}  "
                f"test ELBO {statistics.median(elbos[name]):8.2f}  (times {[round(t, 2) for t in times[name]]})"
            )
    print("ratios: " + " ".join(f"{key}={value:.3f}" for key, value in results.items()))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
