"""The synthetic LSTM sentences of He et al. 2019, section 3 (pyrovae.data.synthetic_sequences), and
the grid posterior that experiments/synthetic_collapse.py plots."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.analysis import grid_posterior, importance_log_likelihood
from pyrovae.config import load_experiment, resolve_config
from pyrovae.data import EOS, PAD, LatentLSTMGenerator, synthetic_lstm
from pyrovae.data.synthetic_sequences import FIRST_WORD, generator_of
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.registry import DATASETS

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocabulary_size=60, length=10, train=300, valid=50, test=60, embedding_dim=16, hidden=16)


def _script():
    spec = importlib.util.spec_from_file_location("synthetic_collapse", ROOT / "experiments" / "synthetic_collapse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("synthetic_collapse", module)
    spec.loader.exec_module(module)
    return module


collapse = _script()


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    first, again, other = synthetic_lstm(**SMALL, seed=3), synthetic_lstm(**SMALL, seed=3), synthetic_lstm(**SMALL, seed=4)
    for split in ("train", "valid", "test"):
        assert torch.equal(first.split(split)["x"], again.split(split)["x"])
        assert torch.equal(first.split(split)["true_z"], again.split(split)["true_z"])
    assert (first.train["x"] != other.train["x"]).float().mean() > 0.5
    assert DATASETS.resolve("synthetic_lstm") is synthetic_lstm


def test_rows_are_words_then_eos_with_lengths_mask_and_spec_right():
    data = synthetic_lstm(**SMALL, seed=0)
    spec = data.spec
    assert (spec.name, spec.x_shape, spec.support, spec.num_categories) == ("synthetic_lstm", (11,), "categorical", 60)
    assert spec.variable_length and spec.padding_index == PAD
    for split, size in (("train", 300), ("valid", 50), ("test", 60)):
        tensors = data.split(split)
        x = tensors["x"]
        assert x.shape == (size, 11) and x.dtype == torch.int64
        assert (x[:, -1] == EOS).all()
        assert ((x[:, :-1] >= FIRST_WORD) & (x[:, :-1] < 60)).all()  # words only, never a special id
        assert (tensors["lengths"] == 11).all()
        assert torch.equal(tensors["mask"], torch.arange(11) < tensors["lengths"].unsqueeze(-1))
        assert tensors["true_z"].shape == (size,)
        spec.check_batch(tensors)
    batch = next(data.batches("train", 32, shuffle=True))
    spec.check_batch(batch)
    assert data.vocabulary.decode(data.train["x"][0]) == [f"w{int(i)}" for i in data.train["x"][0, :-1]]
    # z ~ N(0, 1): 410 draws have mean within 4 standard errors of 0 and a variance near 1.
    z = torch.cat([data.split(s)["true_z"] for s in ("train", "valid", "test")])
    assert abs(float(z.mean())) < 4 / math.sqrt(len(z)) and 0.8 < float(z.var()) < 1.2


def test_sentences_depend_on_z():
    # Word frequencies of 1,000 sentences (10,000 words) at z = -2 and at z = +2 differ far more than
    # two samples at the same z do (sampling noise: total variation about 0.04 here).
    generator = LatentLSTMGenerator(60, 10, 16, 16, seed=0)

    def word_frequencies(z: float, seed: int) -> torch.Tensor:
        _, x = generator.sample(1000, torch.Generator().manual_seed(seed), torch.full((1000,), z))
        return torch.bincount(x[:, :-1].reshape(-1), minlength=60).float() / x[:, :-1].numel()

    def total_variation(p, q):
        return 0.5 * float((p - q).abs().sum())

    assert total_variation(word_frequencies(-2.0, 1), word_frequencies(2.0, 2)) > 0.3
    assert total_variation(word_frequencies(-2.0, 1), word_frequencies(-2.0, 2)) < 0.1


def test_the_experiments_true_posterior_is_narrow_so_x_tells_about_z():
    # The generator of experiments/synthetic_collapse_*.toml (only the split sizes made small).
    options = resolve_config(load_experiment(ROOT / "experiments" / "synthetic_collapse_basic.toml"))["data"]
    options = {**options, "train": 10, "valid": 10, "test": 40}
    data = synthetic_lstm(**{key: value for key, value in options.items() if key != "name"})
    test = data.rows("test", 0, 40)
    truth = grid_posterior(generator_of(options).model, test, torch.linspace(-8, 8, 321))
    assert truth.edge_weight < 1e-8
    # The prior's standard deviation is 1; the posterior's is a fraction of it (0.25 measured on 500
    # sentences), I(x; z) is well above 0 (1.5 nats measured), and the mean follows the true z.
    assert float(truth.std.mean()) < 0.4
    assert float(truth.kl_from_prior.mean()) > 1.0
    assert float(torch.corrcoef(torch.stack([truth.mean, test["true_z"]]))[0, 1]) > 0.9


def test_the_generator_scores_its_own_sentences_like_its_sampler():
    # log p(x | z) of the teacher-forced model equals the sum of the sampler's per-step log-probabilities.
    generator = LatentLSTMGenerator(30, 5, 8, 8, seed=2)
    z, x = generator.sample(4, torch.Generator().manual_seed(0))
    trace = pyro.poutine.trace(pyro.poutine.condition(generator.model, data={"z": z.view(-1, 1)})).get_trace(x=x)
    trace.compute_log_prob()
    state, tokens, stepwise = generator.core.start(z.view(-1, 1), 4), torch.full((4,), 2), torch.zeros(4)
    for position in range(5):
        logits, state = generator.core.step(tokens, state)
        logits[:, :FIRST_WORD] = -math.inf
        stepwise += torch.log_softmax(logits, -1).gather(1, x[:, position : position + 1]).squeeze(1)
        tokens = x[:, position]
    assert torch.allclose(trace.nodes["x"]["log_prob"], stepwise, atol=1e-4)


def gaussian_model(x, scale: float = 0.1, **batch):
    """z ~ N(0, 1), x_d | z ~ N(z, scale^2) for d = 1..D: the posterior is Gaussian in closed form."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.expand(z.shape[:-1] + x.shape[-1:]), scale).to_event(1), obs=x)


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_grid_posterior_equals_the_closed_form_of_a_gaussian_model(scale):
    torch.manual_seed(0)
    dims = 4
    x = torch.randn(7, dims) * 1.5 + torch.linspace(-2, 2, 7).unsqueeze(-1)
    posterior = grid_posterior(lambda **b: gaussian_model(**b, scale=scale), {"x": x}, torch.linspace(-20, 20, 1601))
    # p(z | x) = N(m, s^2): 1/s^2 = 1 + D/scale^2, m = s^2 sum_d x_d / scale^2.
    variance = 1 / (1 + dims / scale**2)
    mean = variance * x.sum(-1) / scale**2
    kl = 0.5 * (variance + mean**2 - 1 - math.log(variance))
    marginal = dist.MultivariateNormal(torch.zeros(dims), scale**2 * torch.eye(dims) + torch.ones(dims, dims)).log_prob(x)
    # The posterior std is 0.05 at scale 0.1: the grid spacing 0.025 still gives all four to 1e-4.
    assert torch.allclose(posterior.mean, mean, atol=1e-4)
    assert torch.allclose(posterior.std, torch.full_like(mean, math.sqrt(variance)), atol=1e-4)
    assert torch.allclose(posterior.kl_from_prior, kl, atol=1e-3)
    assert torch.allclose(posterior.log_marginal, marginal, atol=1e-3)
    assert posterior.edge_weight < 1e-12


def test_grid_posterior_of_a_sentence_vae_agrees_with_importance_sampling():
    # The plotted model: its grid log p(x) matches the importance-sampled one, and chunking the
    # grid (max_rows) changes nothing.
    experiment = Experiment.from_config(_tiny_config("synthetic_collapse_basic.toml"))
    test = experiment.data.rows("test", 0, 12)
    grid = torch.linspace(-10, 10, 401)
    whole = grid_posterior(experiment.model, test, grid)
    chunked = grid_posterior(experiment.model, test, grid, max_rows=12 * 7)
    assert torch.allclose(whole.mean, chunked.mean, atol=1e-5) and torch.allclose(whole.log_marginal, chunked.log_marginal, atol=1e-4)
    # At initialisation the posterior is close to the prior (std about 1), so importance sampling
    # from the prior is accurate: K = 5,000 leaves errors of about 0.005 nats (0.002 at K = 20,000).
    torch.manual_seed(1)
    sampled = importance_log_likelihood(experiment.model, prior_guide, test, particles=5000, batch_size=12)
    assert torch.allclose(whole.log_marginal, sampled, atol=0.03)
    assert not torch.allclose(whole.log_marginal, sampled + 0.1, atol=0.03)
    with pytest.raises(ValueError, match="scalar 'z'"):
        wide = Experiment.from_config(_tiny_config("synthetic_collapse_basic.toml", ["model.latent_dim=2"]))
        grid_posterior(wide.model, test, grid)


def prior_guide(x, **batch):
    """q(z | x) = p(z) = N(0, 1), a proposal that ignores x."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))


def _tiny_config(name: str, overrides=()):
    sizes = [f"data.{key}={value}" for key, value in SMALL.items()]
    return load_experiment(ROOT / "experiments" / name, sizes + ["model.embedding_dim=16", "model.hidden=16", "guide.embedding_dim=16", "guide.hidden=16", *overrides])


def test_both_experiments_resolve_and_differ_only_in_the_strategy():
    basic = resolve_config(load_experiment(ROOT / "experiments" / "synthetic_collapse_basic.toml"))
    aggressive = resolve_config(load_experiment(ROOT / "experiments" / "synthetic_collapse_aggressive.toml"))
    assert basic["data"]["name"] == "synthetic_lstm" and basic["model"]["latent_dim"] == 1
    assert basic["objective"]["name"] == "meanfield_elbo" and basic["anneal"]["name"] == "constant"
    assert (basic["train"]["strategy"], aggressive["train"]["strategy"]) == ("plain", "aggressive")
    for section in ("data", "model", "guide", "objective", "anneal", "evaluate"):
        assert basic[section] == aggressive[section]


def test_the_script_trains_with_resume_and_draws_every_stop(tmp_path):
    out = tmp_path / "run"
    figure = out / "posterior_means.png"  # the default, inside the run folder: drawn once training made it one
    sizes = [f"--set=data.{key}={value}" for key, value in SMALL.items()]
    collapse.main([
        str(ROOT / "experiments" / "synthetic_collapse_basic.toml"), "--out", str(out), "--epochs", "0", "1", "2",
        "--points", "20", "--grid", "-6", "6", "61", "--snapshot-particles", "2",
        *sizes, "--set=evaluate.particles=5", "--set=evaluate.test_examples=20",
        "--set=model.embedding_dim=8", "--set=model.hidden=8", "--set=guide.embedding_dim=8", "--set=guide.hidden=8",
    ])
    record = json.loads((out / collapse.SNAPSHOT_FILE).read_text())
    assert [snap["epoch"] for snap in record["snapshots"]] == [0, 1, 2]
    assert [snap["step"] for snap in record["snapshots"]] == [0, 6, 12]  # 300 training rows, batches of 50
    assert all(len(snap["guide_mean"]) == len(snap["model_mean"]) == 20 for snap in record["snapshots"])
    assert record["truth"]["mutual_information"] > 0.5
    assert figure.stat().st_size > 10000
    assert json.loads((out / "final.json").read_text())["particles"] == 5


def test_bad_options_and_a_foreign_vocabulary_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.latent_scale"):
        synthetic_lstm(**SMALL, latent_scale=-1.0)
    with pytest.raises(ConfigError, match="data.vocabulary_size"):
        synthetic_lstm(**{**SMALL, "vocabulary_size": 5})
    with pytest.raises(ConfigError, match="data.train"):
        synthetic_lstm(**{**SMALL, "train": 0})
    data = synthetic_lstm(**SMALL)
    saved = data.vocabulary.save(tmp_path / "vocabulary.json")
    assert torch.equal(synthetic_lstm(**SMALL, vocabulary=saved).train["x"], data.train["x"])
    with pytest.raises(DataError, match="not this data's vocabulary"):
        synthetic_lstm(**{**SMALL, "vocabulary_size": 61}, vocabulary=saved)
