import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae.handlers import kl_scale
from pyrovae.objectives import ELBO


def two_site_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z + w, 1.0), obs=torch.tensor(0.5))


def test_scales_latent_sites_and_leaves_observed_sites_alone():
    with kl_scale(0.25):
        trace = poutine.trace(two_site_model).get_trace()
    trace.compute_log_prob()
    for name in ("z", "w"):
        site = trace.nodes[name]
        assert site["scale"] == 0.25
        assert torch.allclose(site["log_prob"], 0.25 * site["unscaled_log_prob"])
    assert trace.nodes["x"]["scale"] == 1.0
    assert torch.equal(trace.nodes["x"]["log_prob"], trace.nodes["x"]["unscaled_log_prob"])


def test_per_site_beta_leaves_unnamed_sites_at_one():
    with kl_scale({"z": 0.1}):
        trace = poutine.trace(two_site_model).get_trace()
    assert trace.nodes["z"]["scale"] == pytest.approx(0.1)
    assert trace.nodes["w"]["scale"] == 1.0
    assert trace.nodes["x"]["scale"] == 1.0


def test_composes_with_existing_scale():
    with kl_scale(0.5), poutine.scale(scale=4.0):
        trace = poutine.trace(two_site_model).get_trace()
    assert trace.nodes["z"]["scale"] == pytest.approx(2.0)
    assert trace.nodes["x"]["scale"] == pytest.approx(4.0)


def test_weights_exactly_the_kl_part_of_the_elbo(binary_batch):
    from tests.conftest import tiny_pair

    model, guide = tiny_pair()
    objective = ELBO(max_plate_nesting=1)  # no plate-depth guess, which would draw samples
    pyro.set_rng_seed(3)
    plain_loss, metrics = objective(model, guide, binary_batch)
    pyro.set_rng_seed(3)
    with kl_scale(0.3):
        annealed_loss, annealed_metrics = objective(model, guide, binary_batch)
    # Same draws: -loss = recon - beta * KL, and the reported metrics are never annealed.
    expected = -(metrics["reconstruction"] - 0.3 * metrics["kl/z"])
    assert float(annealed_loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(annealed_metrics["elbo"]) == pytest.approx(float(metrics["elbo"]), rel=1e-6)
    assert float(plain_loss.detach()) == pytest.approx(-float(metrics["elbo"]), rel=1e-6)


def test_rejects_negative_beta():
    with pytest.raises(ValueError, match="beta >= 0"):
        kl_scale(-1.0)


def test_pyro_params_keep_pyros_behaviour_in_torch_owned_modules():
    """Model/Guide skip Pyro's param-store context only when they hold no PyroParam/PyroSample."""
    from pyro.nn import PyroParam

    from pyrovae.pair import DataSpec, Guide

    class ScaledGuide(Guide):
        def __init__(self):
            super().__init__(DataSpec("t", (2,)))
            self.log_scale = PyroParam(torch.tensor(0.0))
            self.net = torch.nn.Linear(2, 1)

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.net(x).squeeze(-1), self.log_scale.exp()))

    trace = poutine.trace(ScaledGuide()).get_trace(torch.zeros(3, 2))
    param_sites = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    assert param_sites == ["log_scale"]  # the PyroParam is a param site; the torch Linear is not
