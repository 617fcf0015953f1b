"""The collapse signals in final.json: I(x; z), active units, perplexity per token."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.analysis.latents import mutual_information
from pyrovae.experiment import Experiment, sequence_metrics
from pyrovae.pair import Guide
from tests.conftest import tiny_experiment, tiny_pair


class BlindGuide(Guide):
    """q(z | x) = N(m, diag s^2) with the same m, s for every x: a collapsed posterior."""

    def __init__(self, latent_dim: int):
        super().__init__(None)
        self.loc = torch.nn.Parameter(torch.randn(latent_dim))
        self.log_scale = torch.nn.Parameter(torch.full((latent_dim,), -0.5))

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            shape = (x.shape[0], self.loc.shape[0])
            pyro.sample("z", dist.Normal(self.loc.expand(shape), self.log_scale.exp().expand(shape)).to_event(1))


def test_mutual_information_is_about_zero_for_a_guide_that_ignores_x():
    """When q(z | x) = q(z) for every x, log q(z_i | x_i) = log (1/N) sum_j q(z_i | x_j) exactly."""
    torch.manual_seed(0)
    model, _ = tiny_pair(latent_dim=3)
    x = torch.bernoulli(torch.full((300, 12), 0.4), generator=torch.Generator().manual_seed(0))
    information = mutual_information(model, BlindGuide(3), {"x": x}, seed=0)
    assert abs(information) < 1e-5


def test_mutual_information_of_an_informative_guide_is_well_above_zero():
    torch.manual_seed(0)
    model, guide = tiny_pair(latent_dim=3)
    with torch.no_grad():
        last = [m for m in guide.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight[:3].mul_(20)  # means that move with x, scales unchanged
    x = torch.bernoulli(torch.full((300, 12), 0.4), generator=torch.Generator().manual_seed(0))
    assert mutual_information(model, guide, {"x": x}, seed=0) > 0.5


def test_perplexity_per_token_counts_every_real_position():
    test = {"x": torch.zeros(2, 4, dtype=torch.long), "lengths": torch.tensor([2, 3])}
    result = sequence_metrics(test, mean_log_likelihood=-5.0, mean_elbo=-6.0)
    assert result["test_tokens"] == 5
    assert result["test_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert result["test_elbo_perplexity"] == pytest.approx(math.exp(12 / 5))
    masked = {"x": test["x"], "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)}
    assert sequence_metrics(masked, -5.0, None) == {"test_tokens": 5, "test_perplexity": pytest.approx(math.exp(2))}
    assert sequence_metrics({"x": test["x"]}, -5.0, -6.0) == {}


def test_final_metrics_hold_mutual_information_and_active_units_when_asked(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 1}, evaluate={"particles": 5, "latent_metrics": True}))
    final = experiment.train(tmp_path / "run", progress=False)
    assert 0 <= final["test_mutual_information"] <= math.log(final["test_examples"])
    assert 0 <= final["test_active_units"] == final["test_active_units/z"] <= 4
    plain = Experiment.from_config(tiny_experiment(train={"epochs": 1}, evaluate={"particles": 5}))
    assert "test_mutual_information" not in plain.train(tmp_path / "plain", progress=False)
