import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.analysis import importance_log_likelihood
from pyrovae.data import make_splits
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.objectives import ELBO
from pyrovae.pair import DataSpec
from pyrovae.train import TrainConfig, fit


def test_matches_the_exact_marginal_of_probabilistic_pca():
    """z ~ N(0, I_2), x = W z + b + N(0, s^2 I_5): exactly x ~ N(b, W W^T + s^2 I).

    The VAE's decoder is linear (no hidden layer) and its Gaussian likelihood has the fixed
    scale s, so it *is* probabilistic PCA; the diagonal guide is only approximate, and
    importance sampling must close the gap."""
    torch.manual_seed(0)
    spec = DataSpec("ppca", (5,), "real")
    model = GaussianVAE(GaussianVAEConfig(latent_dim=2, hidden=[], likelihood="gaussian", observation_scale=0.5), spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[16]), spec, model)
    weight, bias = model.decoder[0].weight.detach(), model.decoder[0].bias.detach()
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + 0.25 * torch.eye(5))
    x = marginal.sample((600,))
    data = make_splits(spec, {"x": x[:500]}, {"x": x[500:]}, validation=50, binarize="none", seed=0)
    # Fit the guide only: keep the model (hence the exact answer) fixed.
    model.requires_grad_(False)
    fit(model, guide, ELBO(), data, TrainConfig(epochs=60, batch_size=50, lr=1e-2, device="cpu"), progress=False)

    pyro.set_rng_seed(0)
    exact = marginal.log_prob(data.test["x"])
    estimate = importance_log_likelihood(model, guide, data.test, particles=5000, batch_size=25, max_rows=5000)
    elbo = ELBO(particles=500)(model, guide, data.test)[1]["elbo"]
    # Per example within 0.02 nats; the mean within 0.005, several times closer than the ELBO.
    assert (estimate - exact).abs().max() < 0.02
    assert float(estimate.mean() - exact.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(exact.mean()) - float(elbo) > 4 * abs(float(estimate.mean() - exact.mean()))


def test_chunking_does_not_change_the_estimate():
    from tests.conftest import tiny_pair

    model, guide = tiny_pair()
    x = torch.bernoulli(torch.full((7, 12), 0.4), generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(1)
    one_chunk = importance_log_likelihood(model, guide, x, particles=3000, batch_size=7, max_rows=7 * 3000)
    pyro.set_rng_seed(1)
    many_chunks = importance_log_likelihood(model, guide, x, particles=3000, batch_size=7, max_rows=7 * 400)
    assert one_chunk.shape == (7,)
    # Different draws, same quantity: agree to Monte Carlo error.
    assert torch.allclose(one_chunk, many_chunks, atol=0.1)
    assert math.isfinite(float(one_chunk.sum()))
