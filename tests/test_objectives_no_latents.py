"""Objectives on models without latent sites (a deterministic baseline with the ``no_latents``
guide): the loss is -(1/B) sum_n log p(x_n), the elbo metric is the reconstruction, and there are
no ``kl/`` keys. Checked against Pyro's ``Trace_ELBO`` on the same model."""

from __future__ import annotations

import math
from functools import lru_cache

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae.data import digits
from pyrovae.data.quadrants import quadrants
from pyrovae.guides.cvae import NoLatentsConfig, NoLatentsGuide
from pyrovae.models.cvae import CVAEBaseline, CVAEBaselineConfig
from pyrovae.objectives import build_objective
from pyrovae.pair import DataSpec, Model
from pyrovae.train import TrainConfig, fit
from tests.conftest import grads, zero


@lru_cache(maxsize=None)
def digits_quadrants():
    return quadrants(source="digits", given_quadrants=1)


def baseline_pair():
    spec = digits_quadrants().spec
    torch.manual_seed(0)
    model = CVAEBaseline(CVAEBaselineConfig(hidden=[32]), spec)
    return model, NoLatentsGuide(NoLatentsConfig(), spec, model)


def baseline_batch(rows: int = 48) -> dict:
    return {key: value[:rows] for key, value in digits_quadrants().test.items()}


def pyro_reference(model, guide, batch):
    """Trace_ELBO's loss per datapoint and its gradients."""
    zero(model, guide)
    loss = Trace_ELBO().differentiable_loss(model, guide, **batch) / batch["x"].shape[0]
    loss.backward()
    return float(loss.detach()), grads(model).clone()


@pytest.mark.parametrize("name, options", [("elbo", {}), ("meanfield_elbo", {}), ("elbo", {"particles": 3})])
def test_loss_and_gradients_equal_trace_elbo(name, options):
    model, guide = baseline_pair()
    batch = baseline_batch()
    expected_loss, expected_grads = pyro_reference(model, guide, batch)
    zero(model, guide)
    loss, metrics = build_objective(name, **options)(model, guide, batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)
    assert torch.allclose(grads(model), expected_grads, rtol=1e-5, atol=1e-7)
    # No latents: the bound is log p(x) itself, and there is no KL to report.
    assert set(metrics) == {"elbo", "reconstruction"}
    assert float(metrics["elbo"]) == float(metrics["reconstruction"])
    assert float(metrics["elbo"]) == pytest.approx(-expected_loss, rel=1e-6)


def test_hand_written_model_without_latents_is_the_exact_log_likelihood():
    """log p(x) = sum_n log Normal(x_n | mu, 1), by hand."""
    loc = torch.nn.Parameter(torch.tensor(0.3))
    x = torch.tensor([0.5, -1.0, 2.0, 0.25])

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    for name in ("elbo", "meanfield_elbo"):
        loss, metrics = build_objective(name)(model, guide, {"x": x})
        (gradient,) = torch.autograd.grad(loss, [loc])
        exact = dist.Normal(loc.detach(), 1.0).log_prob(x).mean()
        assert float(loss.detach()) == pytest.approx(-float(exact), rel=1e-6)
        assert float(gradient) == pytest.approx(-float((x - loc.detach()).mean()), rel=1e-6)
        assert float(metrics["elbo"]) == pytest.approx(float(exact), rel=1e-6)


@pytest.mark.parametrize("name, options", [("free_bits", {"threshold": 1.0}), ("mmd", {"alpha": 0.5, "weight": 10.0})])
def test_wrappers_without_latents_are_the_inner_objective(name, options):
    model, guide = baseline_pair()
    batch = baseline_batch()
    expected_loss, expected_grads = pyro_reference(model, guide, batch)
    zero(model, guide)
    loss, metrics = build_objective(name, **options)(model, guide, batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)
    assert torch.allclose(grads(model), expected_grads, rtol=1e-5, atol=1e-7)
    assert not any(key.startswith("kl/") for key in metrics)
    if name == "free_bits":
        assert float(metrics["free_bits/groups"]) == 0 and float(metrics["free_bits/active_groups"]) == 0
    else:
        assert float(metrics["mmd"]) == 0


class PixelFrequencies(Model):
    """A model without latent variables: x_{n,d} ~ Bernoulli(sigmoid(theta_d)) for each pixel d."""

    def __init__(self, data: DataSpec):
        super().__init__(data)
        self.logits = torch.nn.Parameter(torch.zeros(data.x_features))

    @property
    def latent_sites(self):
        return ()

    def forward(self, x: torch.Tensor, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("x", dist.Bernoulli(logits=self.logits.expand(x.shape)).to_event(1), obs=x)


def test_fit_trains_a_model_without_latents_with_elbo():
    splits = digits()
    model = PixelFrequencies(splits.spec)
    guide = NoLatentsGuide(NoLatentsConfig(), splits.spec, model)
    valid = next(splits.batches("valid", 1000))
    before = float(build_objective("elbo")(model, guide, valid)[0].detach())
    result = fit(model, guide, build_objective("elbo"), splits, TrainConfig(epochs=2, batch_size=64, lr=0.1), progress=False)
    after = float(build_objective("elbo")(model, guide, valid)[0].detach())
    record = result.state.history[-1]
    assert math.isfinite(record["train/elbo"]) and math.isfinite(record["valid/elbo"])
    assert record["valid/elbo"] == record["valid/reconstruction"]
    assert not any("kl/" in key for key in record)
    # It starts at 64 log 2 = 44 nats; two epochs fit the pixel frequencies well below that.
    assert before == pytest.approx(64 * math.log(2), rel=1e-6)
    assert after < before - 10.0, (before, after)


def test_the_analysis_of_a_pair_without_latents_is_strict_json(tmp_path):
    """Constant importance weights have no finite k-hat: analysis.json says null, not -Infinity."""
    import json

    from pyrovae.analysis.report import write_analysis

    splits = digits()
    model = PixelFrequencies(splits.spec)
    guide = NoLatentsGuide(NoLatentsConfig(), splits.spec, model)
    rows = {key: value[:20] for key, value in splits.test.items()}
    analysis = write_analysis(model, guide, rows, tmp_path, samples=30, image_shape=splits.spec.image_shape, progress=False)

    def refuse(constant):
        raise ValueError(f"analysis.json holds {constant}, which strict JSON has not")

    numbers = json.loads((tmp_path / "analysis.json").read_text(), parse_constant=refuse)
    assert numbers["pareto_k_median"] is None and numbers["pareto_k_max"] is None
    assert "none finite (constant weights" in analysis.report.read_text()
