"""Every reported number honours masks (poutine.mask, obs_mask, Distribution.mask) and undoes
only kl_scale's beta: each metric equals the one computed by hand from the masked terms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from pyrovae.analysis import importance_log_likelihood
from pyrovae.handlers import kl_scale
from pyrovae.objectives import ELBO, IWAE, MeanFieldELBO

B = 8
gen = torch.Generator().manual_seed(0)
BATCH = {
    "x": torch.randn(B, 3, generator=gen),
    "x2": torch.randn(B, generator=gen),
    "mask": torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool),  # poutine.mask on x
    "w_mask": torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool),  # Distribution.mask on w
    "x2_mask": torch.tensor([1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool),  # obs_mask on x2
}
DECODER = torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.4, -0.7]])
ENCODER = torch.nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]))


def model(x, x2, mask, w_mask, x2_mask):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        w = pyro.sample("w", dist.Normal(0.0, 2.0).mask(w_mask))
        with poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(z @ DECODER + w.unsqueeze(-1), 1.0).to_event(1), obs=x)
        pyro.sample("x2", dist.Normal(z.sum(-1), 0.5), obs=x2, obs_mask=x2_mask)


def q_distributions(x, x2, w_mask, x2_mask, **_):
    return {
        "z": dist.Normal(x @ ENCODER, 0.7).to_event(1),
        "w": dist.Normal(0.3 * x.sum(-1), 0.9).mask(w_mask),
        "x2_unobserved": dist.Normal(0.1 * x.sum(-1), 0.8).mask(~x2_mask),
    }


def guide(x, x2, mask, w_mask, x2_mask):
    with pyro.plate("data", x.shape[0]):
        for name, fn in q_distributions(x, x2, w_mask, x2_mask).items():
            pyro.sample(name, fn)


def guide_values(seed, particles=None):
    pyro.set_rng_seed(seed)
    run = guide if particles is None else pyro.plate("particles", particles, dim=-2)(guide)
    trace = poutine.trace(run).get_trace(**BATCH)
    return {name: trace.nodes[name]["value"] for name in ("z", "w", "x2_unobserved")}


def hand_terms(values):
    """Per-datapoint masked log-density terms, from the distributions directly."""
    with torch.no_grad():
        return _hand_terms(values)


def _hand_terms(values):
    z, w, u = values["z"], values["w"], values["x2_unobserved"]
    m, wm, om = (BATCH[k].float() for k in ("mask", "w_mask", "x2_mask"))
    q = q_distributions(**BATCH)
    reconstruction = m * dist.Normal(z @ DECODER + w.unsqueeze(-1), 1.0).to_event(1).log_prob(BATCH["x"])
    reconstruction = reconstruction + om * dist.Normal(z.sum(-1), 0.5).log_prob(BATCH["x2"])
    kl = {
        "z": q["z"].log_prob(z) - dist.Normal(torch.zeros(2), 1.0).to_event(1).log_prob(z),
        "w": wm * (dist.Normal(0.3 * BATCH["x"].sum(-1), 0.9).log_prob(w) - dist.Normal(0.0, 2.0).log_prob(w)),
        "x2_unobserved": (1 - om)
        * (dist.Normal(0.1 * BATCH["x"].sum(-1), 0.8).log_prob(u) - dist.Normal(z.sum(-1), 0.5).log_prob(u)),
    }
    return reconstruction, kl


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_elbo_metrics_are_the_masked_terms_and_the_loss_is_pyros(beta):
    objective = ELBO()
    objective.prepare(model, guide, BATCH)
    pyro.set_rng_seed(5)
    with kl_scale(beta):
        loss, metrics = objective(model, guide, BATCH)
    reconstruction, kl = hand_terms(guide_values(5))
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction.mean()), abs=1e-5)
    for name, term in kl.items():
        assert float(metrics[f"kl/{name}"]) == pytest.approx(float(term.mean()), abs=1e-5)
    hand_elbo = reconstruction.mean() - sum(term.mean() for term in kl.values())
    assert float(metrics["elbo"]) == pytest.approx(float(hand_elbo), abs=1e-5)
    pyro.set_rng_seed(5)
    with kl_scale(beta):
        pyro_loss = Trace_ELBO().differentiable_loss(model, guide, **BATCH)
    assert float(loss) == pytest.approx(float(pyro_loss) / B, abs=1e-5)


def test_meanfield_kl_is_the_masked_analytic_kl():
    objective = MeanFieldELBO()
    objective.prepare(model, guide, BATCH)
    pyro.set_rng_seed(2)
    with kl_scale(0.5):
        _, metrics = objective(model, guide, BATCH)
    q = q_distributions(**BATCH)
    z_kl = kl_divergence(q["z"], dist.Normal(torch.zeros(2), 1.0).to_event(1))
    w_kl = BATCH["w_mask"].float() * kl_divergence(dist.Normal(0.3 * BATCH["x"].sum(-1), 0.9), dist.Normal(0.0, 2.0))
    assert float(metrics["kl/z"]) == pytest.approx(float(z_kl.mean()), abs=1e-5)
    assert float(metrics["kl/w"]) == pytest.approx(float(w_kl.mean()), abs=1e-5)


def test_iwae_bound_and_metrics_use_the_masked_weights():
    particles = 4
    objective = IWAE(particles=particles)
    objective.prepare(model, guide, BATCH)
    pyro.set_rng_seed(9)
    with kl_scale(0.2):
        _, metrics = objective(model, guide, BATCH)
    reconstruction, kl = hand_terms(guide_values(9, particles))
    log_weights = reconstruction - sum(kl.values())  # (K, B)
    bound = torch.logsumexp(log_weights, 0) - math.log(particles)
    assert float(metrics["iwae"]) == pytest.approx(float(bound.mean()), abs=1e-5)
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction.mean()), abs=1e-5)
    assert float(metrics["kl/w"]) == pytest.approx(float(kl["w"].mean()), abs=1e-5)


def test_importance_log_likelihood_uses_the_masked_weights():
    particles = 6
    pyro.set_rng_seed(11)
    estimate = importance_log_likelihood(model, guide, BATCH, particles=particles, batch_size=B)
    reconstruction, kl = hand_terms(guide_values(11, particles))
    expected = torch.logsumexp(reconstruction - sum(kl.values()), 0) - math.log(particles)
    assert torch.allclose(estimate, expected, atol=1e-5)
