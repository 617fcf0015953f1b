"""One sentence-VAE training step: pyrovae's pair against a hand-written PyTorch LSTM VAE step,
and the cost of an aggressive epoch against a plain one.

**Step.** Both sides train the sentence VAE of Bowman et al. 2016 at the size of the reviews
experiments (``experiments/reviews_*.toml``: embedding 128, LSTM state 256, z of 32, batch 64,
rows cut to 40 ids, vocabulary of the words seen 5 times, at most 5,000) on the same masked,
variable-length, trimmed batches of ``TextSplits`` (the reviews corpus in ../shared/data/reviews,
or random word ids of the same shape without it). The plain side holds fresh ``torch.nn`` layers
of the same sizes, with pyrovae's initial weights copied in, and writes the per-datapoint loss
out by hand:

    h_n     = LSTM_enc(e(x_{n,1}), ..., e(x_{n,L_n}))_{L_n}
    mu, s   = W_mu h_n + b_mu,  softplus(W_s h_n + b_s) + 1e-4
    z_n     = mu + s * eps,  eps ~ Normal(0, I)
    KL_n    = sum_d [ (s_d^2 + mu_d^2 - 1) / 2 - log s_d ]
    (h_0, c_0) = W_0 z_n + b_0,  h_t = LSTM_dec(h_{t-1}, [e(w_{t-1}), z_n]),  w_0 = <bos>
    loss    = (1/B) sum_n [ KL_n - sum_{t < L_n} log softmax(W_o h_t + b_o)_{x_{n,t}} ]

pyrovae's side is the registered pair ``sentence_vae`` + ``sentence_lstm`` with the objective
``meanfield_elbo``, called as the fit loop calls it: ``objective(model, guide, batch)``,
backward, gradient-norm clipping (5.0, as in the experiments) and a step of the loop's Adam
(:func:`pyrovae.train.make_optimizer`, model and guide parameter groups). The plain side has an
Adam over its parameters with the same settings. Before timing, both losses and gradients on the
first batch (same noise) are compared; they must agree to float tolerance, or the script stops.
The steps alternate (pyrovae first in even steps, plain first in odd ones), so both see the same
machine speed; ``step_ratio`` is the median over steps of the paired ratio pyrovae / plain.

**Aggressive epoch.** One epoch of :func:`pyrovae.train.fit` with ``strategy = "plain"`` and one
with ``strategy = "aggressive"`` (He et al. 2019; the settings of
``experiments/reviews_aggressive.toml``: a check every 2 inner steps, at most 10, I(x; z) on 1,000
validation rows), both with ``validate = false``, on the first ``--epoch-sentences`` training
sentences (same vocabulary). An aggressive epoch ends with an estimate of validation I(x; z),
timed on its own, so the ratio is given with and without it, with the mean number of guide-only
steps per model step (the run's ``train/guide_steps``).

    python benchmarks/sentence_step.py [--steps 40] [--epoch-sentences 2000] [--threads 1] [--device cpu]
    python benchmarks/sentence_step.py --tiny      # tiny networks and data: a smoke run of seconds

The aggressive epoch dominates the run time: at ``--steps 20 --epoch-sentences 640`` it took 5 of
the 7 minutes on a 2-core machine busy with other training runs (steps of about 1.5 s, 1 thread).

**Guide-only step.** One guide-only step (the model's parameters frozen, so no decoder weight
gradients) against one full step of the same pair on the same batches, alternating:
``guide_step_ratio`` is the median paired ratio (He et al.'s inner step; target <= 0.8), eager;
``guide_step_ratio_compiled`` the same with both steps replaying the compiled step (``train.compile =
"trace"``), as aggressive mode now does.

The last lines are ``aggressive_epoch_ratio=...``, ``aggressive_epoch_ratio_without_mi=...``,
``guide_steps_per_model_step=...``, ``guide_step_ratio=...``, ``guide_step_ratio_compiled=...`` and
``step_ratio=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyro
import torch
from torch import nn
from torch.nn import functional as F

import pyrovae  # noqa: F401
import pyrovae.analysis.latents  # noqa: F401  (the I(x; z) estimate imports ArviZ on first use: not a cost to time)
from pyrovae.data import BOS, EOS, PAD, TextSplits, reviews, sequence_splits
from pyrovae.guides import SentenceLSTMGuide, SentenceLSTMGuideConfig
from pyrovae.models import SentenceVAE, SentenceVAEConfig
from pyrovae.objectives import MeanFieldELBO
from pyrovae.train import TrainConfig, fit, make_optimizer, resolve_device
from pyrovae.train.strategies import AggressiveGuideUpdates

LR, CLIP = 1e-3, 5.0
FIRST_WORD = EOS + 1  # ids below are <pad>, <unk>, <bos>, <eos>
# Losses (hundreds of nats per sentence) and gradients agree to this relative tolerance in float32.
LOSS_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4


@dataclass(frozen=True)
class Sizes:
    embedding: int
    hidden: int
    latent: int
    batch: int
    max_length: int  # ids per row, <eos> included


FULL = Sizes(embedding=128, hidden=256, latent=32, batch=64, max_length=40)
TINY = Sizes(embedding=8, hidden=8, latent=2, batch=8, max_length=8)


def reviews_data(directory: Path, sizes: Sizes, min_count: int, max_size: int) -> TextSplits:
    """The reviews corpus as the experiments load it (``[data]`` of ``reviews_vae.toml``)."""
    return reviews(dir=directory, max_length=sizes.max_length, min_count=min_count, max_size=max_size)


def random_word_data(vocabulary: int, sizes: Sizes, sentences: int, seed: int = 0) -> TextSplits:
    """Random word ids shaped like the reviews: lengths 2..max_length, most rows cut to max_length."""
    generator = torch.Generator().manual_seed(seed)

    def rows(count: int) -> list[list[int]]:
        # Reviews average 60 words, so about 4 in 5 rows are cut to max_length - 1 words.
        words = torch.randint(1, 2 * sizes.max_length, (count,), generator=generator).clamp(max=sizes.max_length - 1)
        return [torch.randint(FIRST_WORD, vocabulary, (int(n),), generator=generator).tolist() + [EOS] for n in words]

    held_out = max(2, sentences // 10)
    splits = sequence_splits(
        rows(sentences), rows(held_out), valid=rows(held_out), num_categories=vocabulary, max_length=sizes.max_length, padding_index=PAD
    )
    return TextSplits(spec=splits.spec, train=splits.train, valid=splits.valid, test=splits.test)


def first_sentences(data: TextSplits, count: int) -> TextSplits:
    """The first ``count`` training sentences, with the full corpus's vocabulary and held-out splits."""
    return replace(data, train={key: value[:count] for key, value in data.train.items()})


def pyrovae_pair(data: TextSplits, sizes: Sizes, seed: int) -> tuple[SentenceVAE, SentenceLSTMGuide]:
    torch.manual_seed(seed)
    model = SentenceVAE(
        SentenceVAEConfig(embedding_dim=sizes.embedding, hidden=sizes.hidden, latent_dim=sizes.latent, decoder="lstm"), data.spec
    )
    guide = SentenceLSTMGuide(SentenceLSTMGuideConfig(embedding_dim=sizes.embedding, hidden=sizes.hidden), data.spec, model)
    return model, guide


class PlainSentenceVAE(nn.Module):
    """The hand-written LSTM VAE step (equations in the module text), with pyrovae's initial weights."""

    def __init__(self, model: SentenceVAE, guide: SentenceLSTMGuide):
        super().__init__()
        vocabulary, sizes = model.data.num_categories, model.config
        latent = sizes.latent_dim
        self.min_scale = guide.config.min_scale
        self.encoder_embedding = nn.Embedding(vocabulary, guide.config.embedding_dim, padding_idx=PAD)
        self.encoder_lstm = nn.LSTM(guide.config.embedding_dim, guide.config.hidden, batch_first=True)
        self.head = nn.Linear(guide.config.hidden, 2 * latent)
        self.decoder_embedding = nn.Embedding(vocabulary, sizes.embedding_dim, padding_idx=PAD)
        self.decoder_lstm = nn.LSTM(sizes.embedding_dim + latent, sizes.hidden, batch_first=True)
        self.initial_state = nn.Linear(latent, 2 * sizes.hidden)
        self.output = nn.Linear(sizes.hidden, vocabulary)
        for mine, theirs in self.counterparts(model, guide):
            mine.load_state_dict(theirs.state_dict())

    def counterparts(self, model: SentenceVAE, guide: SentenceLSTMGuide) -> list[tuple[nn.Module, nn.Module]]:
        """Each layer here with the pyrovae module it copies."""
        decoder = model.decoder
        return [
            (self.encoder_embedding, guide.encoder.embedding),
            (self.encoder_lstm, guide.encoder.lstm),
            (self.head, guide.head),
            (self.decoder_embedding, decoder.embedding),
            (self.decoder_lstm, decoder.lstm),
            (self.initial_state, decoder.initial_state),
            (self.output, decoder.output),
        ]

    def loss(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows, positions = x.shape
        encoded, _ = self.encoder_lstm(self.encoder_embedding(x))
        last = encoded[torch.arange(rows, device=x.device), lengths - 1]
        loc, raw_scale = self.head(last).chunk(2, -1)
        scale = F.softplus(raw_scale) + self.min_scale
        z = loc + scale * torch.randn_like(loc)
        kl = (0.5 * (scale.pow(2) + loc.pow(2) - 1) - scale.log()).sum(-1)
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
        embedded = torch.cat([self.decoder_embedding(inputs), z.unsqueeze(1).expand(-1, positions, -1)], -1)
        h, c = self.initial_state(z).unsqueeze(0).chunk(2, -1)
        decoded, _ = self.decoder_lstm(embedded, (h.contiguous(), c.contiguous()))
        logits = self.output(decoded)
        word_nll = F.cross_entropy(logits.reshape(rows * positions, -1), x.reshape(-1), reduction="none").view(rows, positions)
        return ((word_nll * mask).sum(-1) + kl).mean()


def adam_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor]) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, CLIP)
    optimizer.step()


def check_same_step(model, guide, plain: PlainSentenceVAE, objective, batch) -> tuple[float, float, float]:
    """(pyrovae loss, plain loss, largest relative gradient difference) on one batch with the same
    noise; exits when they disagree, since a timing of two different computations means nothing."""
    torch.manual_seed(1)
    ours, _ = objective(model, guide, batch)
    torch.manual_seed(1)
    theirs = plain.loss(batch["x"], batch["mask"], batch["lengths"])
    (ours + theirs).backward()  # the two sides share no parameters: one backward fills both
    worst = 0.0
    for mine, original in plain.counterparts(model, guide):
        for a, b in zip(original.parameters(), mine.parameters()):
            scale = max(float(a.grad.abs().max()), 1e-12)
            worst = max(worst, float((a.grad - b.grad).abs().max()) / scale)
    for part in (model, guide, plain):
        part.zero_grad(set_to_none=True)
    ours, theirs = float(ours.detach()), float(theirs.detach())
    if abs(ours - theirs) > LOSS_TOLERANCE * abs(theirs) or worst > GRADIENT_TOLERANCE:
        sys.exit(f"the two steps disagree on the first batch: loss {ours:.6f} vs {theirs:.6f}, relative gradient difference {worst:.2e}")
    return ours, theirs, worst


def paired_ratio(runs: dict, batches, steps: int, warmup: int, device) -> tuple[float, dict[str, float]]:
    """The two ``runs`` (first: numerator) timed alternately: the median of their paired time ratios,
    and each one's median time in milliseconds."""
    times = alternating_times(runs, batches, steps, warmup, device)
    first, second = runs
    ratio = statistics.median(a / b for a, b in zip(times[first], times[second]))
    return ratio, {name: statistics.median(values) * 1e3 for name, values in times.items()}


def alternating_times(runs: dict, batches: list, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (name -> step(batch)) on the same batches, after ``warmup``
    steps, the order alternating from one batch to the next, so both see the same machine speed."""
    times = {name: [] for name in runs}
    for index, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        for name in runs if index % 2 == 0 else reversed(runs):
            started = time.perf_counter()
            runs[name](batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def step_benchmark(data: TextSplits, sizes: Sizes, steps: int, warmup: int, device: torch.device) -> float:
    # The fit loop turns argument validation off after its first step; so do both sides here.
    pyro.enable_validation(False)
    torch.distributions.Distribution.set_default_validate_args(False)
    model, guide = pyrovae_pair(data, sizes, seed=0)
    model.to(device)
    guide.to(device)
    plain = PlainSentenceVAE(model, guide).to(device)
    objective = MeanFieldELBO()
    torch.manual_seed(0)
    batches = list(itertools.islice(data.batches("train", sizes.batch, shuffle=True), steps + warmup))
    lengths = [int(b["x"].shape[1]) for b in batches]
    ours_loss, plain_loss, gradient_gap = check_same_step(model, guide, plain, objective, batches[0])

    config = TrainConfig(epochs=1, batch_size=sizes.batch, lr=LR, clip_norm=CLIP, device=str(device))
    ours_optimizer = make_optimizer(model, guide, config)
    ours_parameters = [p for group in ours_optimizer.param_groups for p in group["params"]]
    plain_parameters = list(plain.parameters())
    plain_optimizer = torch.optim.Adam(plain_parameters, lr=LR)

    def ours_step(batch):
        ours_optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(model, guide, batch)
        adam_step(loss, ours_optimizer, ours_parameters)

    def plain_step(batch):
        plain_optimizer.zero_grad(set_to_none=True)
        adam_step(plain.loss(batch["x"], batch["mask"], batch["lengths"]), plain_optimizer, plain_parameters)

    ratio, median = paired_ratio({"pyrovae": ours_step, "plain": plain_step}, batches, steps, warmup, device)
    print(
        f"step: V={data.spec.num_categories} embedding={sizes.embedding} hidden={sizes.hidden} z={sizes.latent} "
        f"batch={sizes.batch} T median {statistics.median(lengths)} (range {min(lengths)}-{max(lengths)}) steps={steps}"
    )
    print(f"loss on the first batch (same noise): pyrovae {ours_loss:.6f}  plain {plain_loss:.6f}  "
          f"largest relative gradient difference {gradient_gap:.1e}")
    print(
        f"sentence step: pyrovae {median['pyrovae']:.1f} ms  plain {median['plain']:.1f} ms  "
        f"ratio of medians {median['pyrovae'] / median['plain']:.3f}  median paired ratio {ratio:.3f}"
    )
    return ratio


def guide_step_benchmark(data: TextSplits, sizes: Sizes, steps: int, warmup: int, device: torch.device, compile: str = "none") -> float:
    """One guide-only step of aggressive training against one full step of the same pair, on the
    same batches, alternating: the guide-only step runs with the model's parameters frozen
    (:func:`pyrovae.train.strategies.frozen`: no decoder weight gradients; the backward still
    passes through the decoder's activations to reach z), clips and steps the guide only.
    ``compile = "trace"``: both forwards replay the loop's compiled step (as the fit loop's
    aggressive mode does), each signature captured on its second sighting (within the warm-up)."""
    from pyrovae.train.compiled import CompiledStep
    from pyrovae.train.strategies import drop_gradients, frozen

    pyro.enable_validation(False)
    torch.distributions.Distribution.set_default_validate_args(False)
    model, guide = pyrovae_pair(data, sizes, seed=0)
    model.to(device)
    guide.to(device)
    objective = MeanFieldELBO()
    optimizer = make_optimizer(model, guide, TrainConfig(epochs=1, batch_size=sizes.batch, lr=LR, clip_norm=CLIP, device=str(device)))
    everything, model_parameters, guide_parameters = [*model.parameters(), *guide.parameters()], list(model.parameters()), list(guide.parameters())
    compiled = CompiledStep(compile, model, guide, objective, say=lambda message: print(f"({message})"))
    torch.manual_seed(0)
    # The batches of one length (rows cut to max_length), so a compiled step keeps one signature.
    full = [b for b in data.batches("train", sizes.batch, shuffle=True) if b["x"].shape == (sizes.batch, sizes.max_length)]
    batches = (full or list(data.batches("train", sizes.batch, shuffle=True)))[: steps + warmup]

    def forward(batch):
        return compiled(batch, 1.0, {})

    def full_step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward(batch)
        adam_step(loss, optimizer, everything)

    def guide_step(batch):
        optimizer.zero_grad(set_to_none=True)
        with frozen(model_parameters):
            loss, _ = forward(batch)
            loss.backward()
        drop_gradients(model_parameters)
        torch.nn.utils.clip_grad_norm_(guide_parameters, CLIP)
        optimizer.step()

    ratio, median = paired_ratio({"guide-only": guide_step, "full": full_step}, batches, steps, warmup, device)
    print(
        f"compile={compile}: guide-only step {median['guide-only']:.1f} ms  full step {median['full']:.1f} ms  median paired ratio "
        f"{ratio:.3f}  (compiled graphs held: {len(compiled.graphs)})"
    )
    return ratio


@contextlib.contextmanager
def timed_mutual_information(seconds: list[float]):
    """Time the I(x; z) estimate that ends an aggressive epoch: the loop's record of the epoch's
    seconds stops before it, and nothing else times it on its own."""
    original = AggressiveGuideUpdates.validation_mutual_information

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    AggressiveGuideUpdates.validation_mutual_information = timed
    try:
        yield
    finally:
        AggressiveGuideUpdates.validation_mutual_information = original


def one_epoch(
    data: TextSplits, sizes: Sizes, strategy: str, check_every: int, max_steps: int, mi_examples: int, device, compile: str = "none"
) -> dict:
    """One epoch of ``fit`` from the same initial weights: the epoch's own seconds, the I(x; z)
    estimate's, the whole call's, and the record of the epoch."""
    model, guide = pyrovae_pair(data, sizes, seed=0)
    config = TrainConfig(
        epochs=1, batch_size=sizes.batch, lr=LR, clip_norm=CLIP, device=str(device), validate=False, strategy=strategy,
        aggressive_check_every=check_every, aggressive_max_steps=max_steps, aggressive_mi_examples=mi_examples, compile=compile,
    )
    mutual_information_seconds: list[float] = []
    started = time.perf_counter()
    with timed_mutual_information(mutual_information_seconds):
        result = fit(model, guide, MeanFieldELBO(), data, config, progress=False)
    record = result.state.history[-1]
    return {
        "epoch": record["seconds"],
        "mutual_information": sum(mutual_information_seconds),
        "call": time.perf_counter() - started,
        "record": record,
    }


def epoch_benchmark(
    data: TextSplits, sizes: Sizes, repeats: int, check_every: int, max_steps: int, mi_examples: int, device: torch.device, compile: str = "none"
) -> dict[str, float]:
    runs = {strategy: [] for strategy in ("plain", "aggressive")}
    for repeat in range(repeats):
        for strategy in runs if repeat % 2 == 0 else reversed(runs):
            runs[strategy].append(one_epoch(data, sizes, strategy, check_every, max_steps, mi_examples, device, compile))
    steps = data.num_batches("train", sizes.batch)

    def median(strategy, key):
        return statistics.median(run[key] for run in runs[strategy])

    plain_epoch, aggressive_epoch, information = median("plain", "epoch"), median("aggressive", "epoch"), median("aggressive", "mutual_information")
    guide_steps = statistics.median(run["record"]["train/guide_steps"] for run in runs["aggressive"])
    # Taking a model-only step as a plain step puts the rest of an aggressive epoch on its guide-only
    # steps; a model-only step skips the encoder's backward, so this slightly underestimates them.
    per_guide_step = (aggressive_epoch - plain_epoch) / (guide_steps * steps)
    print(
        f"epochs: {data.size('train')} sentences, {steps} model steps of batch {sizes.batch}, validate = false, "
        f"aggressive check every {check_every}, at most {max_steps} inner steps, I(x; z) on {min(mi_examples, data.size('valid'))} "
        f"validation rows, repeats={repeats}"
    )
    print(f"plain epoch {plain_epoch:.2f} s  (fit call {median('plain', 'call'):.2f} s)")
    print(
        f"aggressive epoch {aggressive_epoch:.2f} s + I(x; z) {information:.2f} s  (fit call {median('aggressive', 'call'):.2f} s); "
        f"validation I(x; z) = {runs['aggressive'][-1]['record']['valid/mutual_information']:.3f}"
    )
    print(
        f"guide-only steps per model step {guide_steps:.2f}; about {per_guide_step * 1e3:.0f} ms per guide-only step "
        f"({per_guide_step / (plain_epoch / steps):.2f}x a plain step of {plain_epoch / steps * 1e3:.0f} ms)"
    )
    return {
        "aggressive_epoch_ratio": (aggressive_epoch + information) / plain_epoch,
        "aggressive_epoch_ratio_without_mi": aggressive_epoch / plain_epoch,
        "guide_steps_per_model_step": guide_steps,
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reviews")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--min-count", type=int, default=5, help="vocabulary: words seen this often (reviews experiments: 5)")
    parser.add_argument("--max-size", type=int, default=5000, help="vocabulary: at most this many ids (reviews experiments: 5000)")
    parser.add_argument("--epoch-sentences", type=int, default=2000)
    parser.add_argument("--epoch-repeats", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=2, help="as experiments/reviews_aggressive.toml")
    parser.add_argument("--max-inner-steps", type=int, default=10, help="as experiments/reviews_aggressive.toml")
    parser.add_argument("--mi-examples", type=int, default=1000)
    parser.add_argument("--skip-epochs", action="store_true", help="time the step only")
    parser.add_argument("--compile", default="none", choices=["none", "trace", "torch"], help="train.compile of the two epochs (both)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks on random words: a smoke run of seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # torch imports torch._dynamo the first time an optimizer is built (seconds): not a cost to time.
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    sizes = TINY if args.tiny else FULL
    if args.tiny:
        args.steps, args.warmup, args.epoch_sentences, args.mi_examples = 4, 1, 48, 8
        args.check_every, args.max_inner_steps = 2, 6
        data = random_word_data(vocabulary=40, sizes=sizes, sentences=args.epoch_sentences)
    elif (args.data / "train.tsv").exists():
        data = reviews_data(args.data, sizes, args.min_count, args.max_size)
    else:
        print(f"(no reviews in {args.data}: using random word ids of the same shape)")
        data = random_word_data(vocabulary=args.max_size, sizes=sizes, sentences=max(args.epoch_sentences, 2000))
    device = resolve_device(args.device)
    data = first_sentences(data, args.epoch_sentences).to(device)
    print(f"data={data.spec.name} device={device} threads={torch.get_num_threads()} torch={torch.__version__} pyro={pyro.__version__}")
    results = {}
    if not args.skip_epochs:
        # The epochs first, so the step's printout sits next to its ratio line.
        results = epoch_benchmark(
            data, sizes, args.epoch_repeats, args.check_every, args.max_inner_steps, args.mi_examples, device, args.compile
        )
    results["guide_step_ratio"] = guide_step_benchmark(data, sizes, args.steps, args.warmup, device)
    results["guide_step_ratio_compiled"] = guide_step_benchmark(data, sizes, args.steps, args.warmup, device, compile="trace")
    results["step_ratio"] = step_benchmark(data, sizes, args.steps, args.warmup, device)
    for key, value in results.items():
        print(f"{key}={value:.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
