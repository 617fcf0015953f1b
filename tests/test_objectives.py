import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae.objectives import ELBO, IWAE, MeanFieldELBO, build_objective
from tests.conftest import grads, tiny_pair, zero


@pytest.mark.parametrize(
    "ours, pyros",
    [
        (ELBO(max_plate_nesting=1), Trace_ELBO()),
        (MeanFieldELBO(max_plate_nesting=1), TraceMeanField_ELBO()),
        (build_objective("pyro:Trace_ELBO"), Trace_ELBO()),
        (build_objective("pyro:TraceMeanField_ELBO"), TraceMeanField_ELBO()),
    ],
    ids=["elbo", "meanfield", "pyro:Trace_ELBO", "pyro:TraceMeanField_ELBO"],
)
def test_loss_and_gradients_equal_pyros(ours, pyros, binary_batch):
    model, guide = tiny_pair()
    n = binary_batch["x"].shape[0]
    ours.prepare(model, guide, binary_batch)
    pyro.set_rng_seed(1)
    loss, _ = ours(model, guide, binary_batch)
    loss.backward()
    our_grads = grads(model, guide)
    zero(model, guide)
    pyro.set_rng_seed(1)
    pyro_loss = pyros.differentiable_loss(model, guide, **binary_batch)
    (pyro_loss / n).backward()
    assert float(loss.detach()) == pytest.approx(float(pyro_loss.detach()) / n, rel=1e-5)
    assert torch.allclose(our_grads, grads(model, guide), rtol=1e-4, atol=1e-6)


def test_score_function_surrogate_equals_trace_elbo():
    """A non-reparameterized latent: the surrogate must give Trace_ELBO's gradients."""
    probs_param = torch.nn.Parameter(torch.tensor(0.3))
    loc_param = torch.nn.Parameter(torch.tensor(0.2))
    x = torch.tensor([1.0, 0.0, 2.0, 1.5])

    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(torch.sigmoid(probs_param + loc_param * x)))

    pyro.set_rng_seed(4)
    loss, _ = ELBO(max_plate_nesting=1)(model, guide, {"x": x})
    ours = torch.autograd.grad(loss, [probs_param, loc_param])
    pyro.set_rng_seed(4)
    reference = Trace_ELBO().differentiable_loss(model, guide, x=x) / len(x)
    theirs = torch.autograd.grad(reference, [probs_param, loc_param])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-5)


def test_analytic_and_monte_carlo_kl_agree(binary_batch):
    model, guide = tiny_pair()
    pyro.set_rng_seed(2)
    _, analytic = MeanFieldELBO(max_plate_nesting=1)(model, guide, binary_batch)
    # Monte Carlo KL = E_q[log q - log p] with 4000 particles per datapoint.
    _, sampled = ELBO(particles=4000, max_plate_nesting=1)(model, guide, binary_batch)
    kl_analytic, kl_sampled = float(analytic["kl/z"]), float(sampled["kl/z"])
    assert kl_analytic > 0.05
    # Standard error of a 128k-sample mean of log q - log p here is well under 0.5%.
    assert kl_sampled == pytest.approx(kl_analytic, rel=0.02)


def test_iwae_bound_is_above_elbo_and_grows_with_k(binary_batch):
    model, guide = tiny_pair()
    pyro.set_rng_seed(0)
    repeats = 30
    with torch.no_grad():
        elbo = sum(float(ELBO(max_plate_nesting=1)(model, guide, binary_batch)[1]["elbo"]) for _ in range(repeats)) / repeats
        bounds = {}
        for k in (1, 5, 50):
            draws = torch.tensor([float(IWAE(k, max_plate_nesting=1)(model, guide, binary_batch)[1]["iwae"]) for _ in range(repeats)])
            bounds[k] = (float(draws.mean()), float(draws.std() / math.sqrt(repeats)))
    # K = 1 is the ELBO itself (within noise); larger K is strictly better, by many standard errors.
    assert bounds[1][0] == pytest.approx(elbo, abs=4 * (bounds[1][1] + 0.05))
    for small, large in ((1, 5), (5, 50)):
        gap = bounds[large][0] - bounds[small][0]
        assert gap > 5 * (bounds[large][1] + bounds[small][1]), (small, large, bounds)
    assert bounds[5][0] > elbo


def test_dreg_keeps_model_gradients_and_is_unbiased_for_the_guide():
    model, guide = tiny_pair(features=6, latent_dim=2, hidden=(8,))
    # One datapoint copied 4000 times: the batch-mean gradient is a 4000-draw average.
    x = {"x": torch.bernoulli(torch.full((1, 6), 0.5), generator=torch.Generator().manual_seed(1)).expand(4000, 6).contiguous()}
    results = {}
    for dreg in (False, True):
        zero(model, guide)
        pyro.set_rng_seed(5)
        loss, _ = IWAE(5, dreg=dreg, max_plate_nesting=1)(model, guide, x)
        loss.backward()
        results[dreg] = (grads(model).clone(), grads(guide).clone())
    # Same draws: identical model gradients; different guide estimators...
    assert torch.allclose(results[False][0], results[True][0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(results[False][1], results[True][1])
    # ...with the same expectation (the averages agree to Monte Carlo error).
    plain, doubly = results[False][1], results[True][1]
    assert float((plain - doubly).norm() / plain.norm()) < 0.2


def test_iwae_needs_per_datapoint_sites():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="outside the 'data' plate"):
        IWAE(3)(model, guide, {"x": torch.zeros(4)})
