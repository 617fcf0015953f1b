"""The categorical VAE family (Jang et al. 2017): relaxed, straight-through and score-function
estimators, the log-space Concrete density, and evaluation as the discrete model."""

from __future__ import annotations

import itertools
import json
import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae import DataSpec, check_pair
from pyrovae.analysis import importance_log_likelihood, observation_means
from pyrovae.cli import main
from pyrovae.config import dump_toml, load_toml
from pyrovae.experiment import Experiment
from pyrovae.guides import CategoricalGuide, CategoricalGuideConfig
from pyrovae.models import CategoricalVAE, CategoricalVAEConfig
from pyrovae.objectives import ELBO, IWAE
from pyrovae.relaxed import LOG_VALUE, RelaxedOneHot, straight_through
from pyrovae.traces import trace_pair

ESTIMATORS = ["relaxed", "straight_through", "score_function"]


def innermost(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


# --- the relaxed distribution ------------------------------------------------------------------


def test_density_equals_pyros_relaxed_one_hot_categorical():
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    for temperature in (2.0, 0.7, 0.3):
        ours = RelaxedOneHot(temperature, logits)
        pyros = dist.RelaxedOneHotCategorical(torch.tensor(temperature), logits=logits)
        drawn = ours.rsample((3,))
        # From the attached log value, and from the plain value (a copy without it).
        assert torch.allclose(ours.log_prob(drawn), pyros.log_prob(drawn), atol=1e-4, rtol=1e-5)
        assert torch.allclose(ours.log_prob(drawn.clone()), pyros.log_prob(drawn), atol=1e-4, rtol=1e-5)
        other = pyros.sample((4,))
        assert torch.allclose(ours.log_prob(other), pyros.log_prob(other), atol=1e-4, rtol=1e-5)


def test_relaxed_draws_tend_to_one_hot_as_the_temperature_goes_to_zero():
    """The max coordinate tends to 1, and the argmax is Categorical(softmax(logits)) at any
    temperature (the Gumbel-max trick)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    probs = torch.softmax(logits, -1)
    means = []
    for temperature in (1.0, 0.5, 0.1, 0.01):
        torch.manual_seed(0)
        draws = RelaxedOneHot(temperature, logits).rsample((20000,))
        assert torch.allclose(draws.sum(-1), torch.ones(20000), atol=1e-5)
        means.append(float(draws.max(-1).values.mean()))
        frequencies = torch.bincount(draws.argmax(-1), minlength=4).double() / 20000
        # Binomial sd of a frequency is at most 0.0036 here: 5 sd.
        assert torch.allclose(frequencies, probs.double(), atol=0.018)
    assert means == sorted(means) and means[0] < 0.8
    assert means[-1] > 0.995


def test_confident_logits_at_low_temperature_keep_a_finite_density():
    """Coordinates of z underflow to 0 here, so log z is -inf; the draw's own log value keeps
    log q and log p finite, and equal to the formula evaluated in float64 on that log value."""
    torch.manual_seed(0)
    logits = torch.tensor([[60.0, 0.0, -60.0]]).expand(50, 3)
    q = RelaxedOneHot(0.5, logits)
    prior = RelaxedOneHot(0.5, torch.zeros(50, 3))
    z = q.rsample()
    assert (z == 0).any()  # underflow happened
    log_q, log_p = q.log_prob(z), prior.log_prob(z)
    assert torch.isfinite(log_q).all() and torch.isfinite(log_p).all()
    y = getattr(z, LOG_VALUE).double()
    score = torch.log_softmax(logits.double(), -1) - 0.5 * y
    formula = math.lgamma(3) + 2 * math.log(0.5) + score.sum(-1) - 3 * score.logsumexp(-1) - y.sum(-1)
    assert torch.allclose(log_q.double(), formula, rtol=1e-5)


def test_straight_through_forward_is_exactly_one_hot_and_gradients_flow():
    torch.manual_seed(0)
    logits = torch.randn(64, 6, requires_grad=True)
    q = RelaxedOneHot(0.7, logits, straight_through=True)
    z = q.rsample()
    assert set(z.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(z.sum(-1), torch.ones(64))
    soft = getattr(z, LOG_VALUE).exp()
    assert torch.equal(z.argmax(-1), soft.argmax(-1))
    # Its density is the relaxed density of the draw behind it.
    relaxed = RelaxedOneHot(0.7, logits)
    assert torch.allclose(q.log_prob(z), relaxed.log_prob(soft.detach().clone()), atol=1e-4)
    # The gradient reaches the logits, and it is the relaxed draw's (identity backward).
    weights = torch.randn(6)
    (grad_hard,) = torch.autograd.grad((z * weights).sum(), logits, retain_graph=True)
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert grad_hard.abs().sum() > 0
    assert torch.allclose(grad_hard, grad_soft)
    assert torch.equal(straight_through(torch.tensor([0.2, 0.5, 0.3])), torch.tensor([0.0, 1.0, 0.0]))


# --- the pair ---------------------------------------------------------------------------------


def tiny_pair(estimator="relaxed", groups=3, categories=4, features=12, discrete_eval=True):
    spec = DataSpec("binary", (features,), "binary")
    model = CategoricalVAE(
        CategoricalVAEConfig(groups=groups, categories=categories, hidden=[16], estimator=estimator, discrete_eval=discrete_eval), spec
    )
    return model, CategoricalGuide(CategoricalGuideConfig(hidden=[16]), spec, model)


@pytest.fixture
def batch():
    x = torch.bernoulli(torch.full((32, 12), 0.3), generator=torch.Generator().manual_seed(0))
    return {"x": x, "temperature": 0.6}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_site_consistency_in_training_and_in_evaluation(estimator, batch):
    model, guide = tiny_pair(estimator)
    check_pair(model, guide, batch)
    model.eval(), guide.eval()
    check_pair(model, guide, batch)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sampling_shapes_and_values(estimator, batch):
    model, guide = tiny_pair(estimator)
    model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=1, particles=5)
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (5, 32, 3, 4)
    assert torch.allclose(z.sum(-1), torch.ones(5, 32, 3))
    if estimator == "relaxed":
        assert ((z > 0) & (z < 1)).all()  # a point inside the simplex
    else:
        assert set(z.unique().tolist()) <= {0.0, 1.0}  # one-hot: straight-through or exact
    assert model_trace.nodes["x"]["fn"].batch_shape == (5, 32)
    assert observation_means(model, guide, batch, from_prior=True).shape == batch["x"].shape
    # In evaluation the prior's draws are one-hot whatever the estimator.
    model.eval()
    prior_z = poutine.trace(model).get_trace(**batch).nodes["z"]["value"]
    assert prior_z.shape == (32, 3, 4) and set(prior_z.unique().tolist()) == {0.0, 1.0}


def test_training_mode_relaxes_and_evaluation_mode_scores_the_discrete_model(batch):
    model, guide = tiny_pair("relaxed")
    trace = poutine.trace(guide).get_trace(**batch)
    assert isinstance(innermost(trace.nodes["z"]["fn"]), RelaxedOneHot)
    guide.eval()
    trace = poutine.trace(guide).get_trace(**batch)
    fn = innermost(trace.nodes["z"]["fn"])
    assert isinstance(fn, dist.OneHotCategorical)
    # The same logits define both: q's probabilities are softmax(encoder(x)).
    assert torch.allclose(fn.probs, torch.softmax(guide.logits(batch["x"]), -1), atol=1e-6)
    # discrete_eval = false keeps the relaxed pair in evaluation.
    _, relaxed_guide = tiny_pair("relaxed", discrete_eval=False)
    relaxed_guide.eval()
    assert isinstance(innermost(poutine.trace(relaxed_guide).get_trace(**batch).nodes["z"]["fn"]), RelaxedOneHot)


def test_discrete_evaluation_gives_the_exact_log_likelihood_of_the_discrete_model():
    """Two 3-way latents have 9 joint values: log p(x) = log sum_z p(z) p(x | z) exactly. The
    importance-sampled estimate of the evaluated (discrete) pair converges to it, with the
    guide's categorical probabilities as proposal; the training-mode (relaxed) pair would score
    a different, continuous model."""
    torch.manual_seed(0)
    model, guide = tiny_pair("relaxed", groups=2, categories=3)
    x = torch.bernoulli(torch.full((10, 12), 0.4), generator=torch.Generator().manual_seed(1))
    model.eval(), guide.eval()
    with torch.no_grad():
        values = torch.stack([torch.eye(3)[list(v)] for v in itertools.product(range(3), repeat=2)])  # (9, 2, 3)
        log_lik = model.likelihood(model.decoder(values.flatten(-2))).log_prob(x.unsqueeze(1))  # (10, 9)
        exact = torch.logsumexp(log_lik + 2 * math.log(1 / 3), -1)
    estimate = importance_log_likelihood(model, guide, {"x": x}, particles=3000, inputs={"temperature": 0.5}, batch_size=10)
    # Measured: largest error 0.010 over the 10 rows (K = 3000).
    assert torch.allclose(estimate, exact, atol=0.03)
    assert abs(float((estimate - exact).mean())) < 0.01
    # The ELBO of the discrete model is below it (by KL(q || p(z | x)) > 0).
    with torch.no_grad():
        _, metrics = ELBO(particles=500)(model, guide, {"x": x, "temperature": 0.5})
    assert float(metrics["elbo"]) < float(exact.mean()) - 1e-3


@pytest.mark.parametrize("estimator, objective", [("relaxed", ELBO), ("straight_through", ELBO), ("score_function", IWAE)])
def test_one_step_lowers_the_loss_on_a_fixed_batch(estimator, objective, batch):
    torch.manual_seed(0)
    model, guide = tiny_pair(estimator)
    loss_fn = objective(particles=32)
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-3)

    def loss():
        torch.manual_seed(1)  # the same draws each time
        return loss_fn(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())  # the estimator reaches the guide
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach()) - 1e-3


def test_score_function_pair_gets_vimco_and_relaxed_pairs_pathwise_gradients(batch):
    from pyrovae.traces import inspect_pair

    for estimator, sampled in (("relaxed", ()), ("straight_through", ()), ("score_function", ("z",))):
        model, guide = tiny_pair(estimator)
        assert inspect_pair(model, guide, batch).score_function_sites == sampled
        assert model.latent_sites[0].discrete == (estimator == "score_function")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"groups": 0}, "groups"),
        ({"categories": 1}, "at least 2 classes"),
        ({"estimator": "reinforce"}, "estimator"),
        ({"hidden": [0]}, "hidden"),
        ({"activation": "swish"}, "unknown activation"),
    ],
)
def test_config_bounds(options, message):
    with pytest.raises(ValueError, match=message):
        CategoricalVAEConfig(**options)


def test_relaxed_distribution_refuses_a_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature > 0"):
        RelaxedOneHot(0.0, torch.zeros(3))


# --- end to end through the CLI -----------------------------------------------------------------


def test_a_temperature_of_zero_is_a_one_line_error_of_the_command(tmp_path, capsys):
    experiment = {
        "data": {"name": "digits"},
        "model": {"name": "categorical_vae", "groups": 2, "categories": 3, "hidden": [8]},
        "guide": {"name": "categorical", "hidden": [8]},
        "schedules": {"temperature": {"name": "constant", "value": 0.0}},
        "train": {"epochs": 1},
    }
    path = tmp_path / "zero.toml"
    path.write_text(dump_toml(experiment))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "pyrovae train: error: the relaxed estimator needs a temperature > 0, and [schedules.temperature] gives 0.0: "
        "set its value, or its initial and minimum, above 0"
    )


@pytest.mark.parametrize(
    "estimator, objective",
    [("relaxed", {"name": "elbo"}), ("straight_through", {"name": "elbo"}), ("score_function", {"name": "iwae", "particles": 4})],
)
def test_trains_from_toml_with_an_annealed_temperature_then_evaluates_and_samples(tmp_path, capsys, estimator, objective):
    experiment = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": {"name": "categorical_vae", "groups": 6, "categories": 5, "hidden": [64], "estimator": estimator},
        "guide": {"name": "categorical", "hidden": [64]},
        "objective": objective,
        "schedules": {"temperature": {"name": "exponential_decay", "rate": 0.02, "initial": 1.0, "minimum": 0.5}},
        "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3},
        "evaluate": {"particles": 50, "test_examples": 100},
    }
    path = tmp_path / "gumbel.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["schedule/temperature"] for r in records] == pytest.approx([max(0.5, math.exp(-0.02 * r["step"])) for r in records])
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    # Reported numbers are the discrete model's: a log-likelihood estimate above its ELBO, and a
    # KL(q || uniform) between 0 and N log K (Monte Carlo, so a little slack below 0).
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert -0.5 < final["test_kl/z"] < 6 * math.log(5)
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["test_log_likelihood"])
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 100


def test_experiment_files_build():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for name, estimator in (
        ("gumbel_mnist.toml", "relaxed"),
        ("gumbel_mnist_straight_through.toml", "straight_through"),
        ("gumbel_mnist_vimco.toml", "score_function"),
    ):
        raw = load_toml(root / name)
        raw["data"] = {"name": "digits"}
        experiment = Experiment.from_config(raw)
        assert experiment.model.config.estimator == estimator
        assert experiment.model.config.groups == 30 and experiment.model.config.categories == 10
