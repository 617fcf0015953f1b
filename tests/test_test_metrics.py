"""Test metrics follow the configured objective (its own metrics with a ``test_`` prefix, unannealed),
and an objective refusing a pair reaches the command line as one line."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.nn import functional as F

from pyrovae import Guide, LatentSite, Model
from pyrovae.cli import main
from pyrovae.config import dump_toml, resolve_config
from pyrovae.experiment import Experiment
from pyrovae.nn import MLP
from pyrovae.objectives import IWAE, Objective
from pyrovae.train import evaluate_objective
from pyrovae.traces import log_weights
from tests.conftest import tiny_experiment


def test_final_metrics_are_the_objectives_own_under_iwae(tmp_path):
    experiment = Experiment.from_config(
        tiny_experiment(objective={"name": "iwae", "particles": 4}, anneal={"name": "linear", "warmup_steps": 1000},
                        train={"epochs": 1}, evaluate={"particles": 20, "test_examples": 100})
    )
    final = experiment.train(tmp_path, progress=False)
    assert {"test_iwae", "test_elbo", "test_reconstruction", "test_kl/z", "test_log_likelihood"} <= set(final)
    # Unannealed (beta was far below 1 at the end of training): the bound, not the annealed loss.
    torch.manual_seed(0)
    direct = evaluate_objective(experiment.model, experiment.guide, IWAE(particles=4), experiment.data, "test", 100, limit=100)
    assert final["test_iwae"] == pytest.approx(direct["iwae"], abs=0.3)
    assert final["test_elbo"] == pytest.approx(final["test_reconstruction"] - final["test_kl/z"], abs=1e-4)
    assert final["test_elbo"] < final["test_iwae"] < final["test_log_likelihood"] + 0.5


def test_the_test_sets_standard_error_of_the_nll_is_the_spread_over_points_against_brute_force(tmp_path):
    """test_nll_test_set_standard_error: the spread of log p(x_n) over the 100 test points / 10, with
    the per-point Monte Carlo variance taken out, against per-point estimates with K = 2000; the
    Monte Carlo standard error (finite K) is far smaller."""
    from pyrovae.analysis.likelihood import importance_estimate

    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 3}, evaluate={"particles": 20, "test_examples": 100}))
    final = experiment.train(tmp_path, progress=False)
    torch.manual_seed(1)
    again = importance_estimate(experiment.model, experiment.guide, experiment.data.rows("test", 0, 100), particles=2000)
    assert final["test_nll_test_set_standard_error"] == pytest.approx(float(again.log_likelihood.std()) / 10, rel=0.05)
    assert final["test_nll_standard_error"] < final["test_nll_test_set_standard_error"] / 5


PRIOR_CLASSES = 10


class MixtureModel(Model):
    """A mixture of Bernoulli images with an enumerated class (no continuous latent):

        y_n ~ Categorical(1/C)   (summed out exactly)
        x_n ~ Bernoulli(sigmoid(theta_{y_n}))
    """

    def __init__(self, data):
        super().__init__(data)
        self.logits = torch.nn.Parameter(torch.randn(PRIOR_CLASSES, data.x_features) * 0.1)

    @property
    def latent_sites(self):
        return (LatentSite("y", (), discrete=True, enumerated=True),)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(x.new_full((PRIOR_CLASSES,), 1 / PRIOR_CLASSES)), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(logits=self.logits[y]).to_event(1), obs=x)


class NoGuide(Guide):
    """q is empty: the only latent is enumerated in the model."""

    def __init__(self, data, model):
        super().__init__(data)

    def forward(self, x, **batch):
        pass


class ExactEnumeratedELBO(Objective):
    """log p(x) with the enumerated sites summed out exactly (a stand-in for ``enum_elbo``): with
    no sampled latent, this ELBO is the marginal likelihood itself."""

    name = "exact_enumerated_elbo"
    sums_out_enumeration = True

    def __call__(self, model, guide, batch):
        model_trace, guide_trace = self._trace(model, guide, batch)
        nesting = self.max_plate_nesting
        bound = log_weights(model_trace, guide_trace, nesting, False, scaled=True)
        with torch.no_grad():
            reported = log_weights(model_trace, guide_trace, nesting, False, scaled=False).mean()
        return -bound.mean(), {"elbo": reported, "exact": reported}


def test_an_enumerated_pair_gets_its_test_elbo_from_its_own_objective(tmp_path):
    config = tiny_experiment(
        model={"name": "tests.test_test_metrics:MixtureModel"},
        guide={"name": "tests.test_test_metrics:NoGuide"},
        objective={"name": "tests.test_test_metrics:ExactEnumeratedELBO"},
        train={"epochs": 2, "lr": 0.03},
        evaluate={"particles": 2, "test_examples": 50},
    )
    final = Experiment.from_config(config).train(tmp_path, progress=False)
    assert final["test_exact"] == final["test_elbo"]
    # Both are the exact log p(x) (the importance sampler sums the class out too).
    assert final["test_elbo"] == pytest.approx(final["test_log_likelihood"], abs=1e-4)


class BinaryLatentVAE(Model):
    """z_n ~ Bernoulli(1/2) over 4 bits,  x_n ~ Bernoulli(decoder(z_n))."""

    def __init__(self, data):
        super().__init__(data)
        self.decoder = MLP(4, [16], data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z", (4,), discrete=True),)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((x.shape[0], 4), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class BinaryGuide(Guide):
    """q(z_n | x_n) = Bernoulli(sigmoid(encoder(x_n))) (no rsample)."""

    def __init__(self, data, model):
        super().__init__(data)
        self.encoder = MLP(data.x_features, [16], 4)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)).to_event(1))


def test_an_objective_refusing_the_pair_at_its_first_call_is_one_line_on_the_cli(tmp_path, capsys):
    config = tiny_experiment(
        model={"name": "tests.test_test_metrics:BinaryLatentVAE"},
        guide={"name": "tests.test_test_metrics:BinaryGuide"},
        objective={"name": "iwae", "particles": 3, "dreg": True},
        train={"epochs": 1},
    )
    experiment = tmp_path / "binary.toml"
    experiment.write_text(dump_toml(resolve_config(config)))
    code = main(["train", str(experiment), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pyrovae train: error: objective 'iwae' with dreg = true needs reparameterized guide sites")
    assert "'z' of BinaryLatentVAE" in lines[0] and "Traceback" not in captured.err
    # The same pair trains under VIMCO (dreg = false), and its test metrics are IWAE's.
    code = main(["train", str(experiment), "--out", str(tmp_path / "vimco"), "--no-progress", "--set", "objective.dreg=false",
                 "--set", "evaluate.particles=5", "--set", "evaluate.test_examples=40"])
    assert code == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    assert math.isfinite(final["test_iwae"]) and "test_kl/z" in final
