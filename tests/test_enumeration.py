"""Enumerated sites are summed out exactly, or refused by name: never silently sampled."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import LatentSite
from pyrovae.analysis import importance_log_likelihood
from pyrovae.errors import UnsupportedPairError
from pyrovae.objectives import ELBO, IWAE, MeanFieldELBO

X = torch.tensor([-0.4, 1.3, 3.1, 2.2])
SHIFT = 3.0
PRIOR_Y = torch.tensor([0.35, 0.65])


def exact_log_marginal(x):
    """y ~ Cat(PRIOR_Y), z ~ N(0, 1), x ~ N(z + SHIFT y, 1):  p(x) = sum_y p(y) N(x; SHIFT y, sqrt 2)."""
    ys = torch.arange(2.0)
    terms = PRIOR_Y.log().unsqueeze(-1) + dist.Normal(SHIFT * ys.unsqueeze(-1), math.sqrt(2.0)).log_prob(x)
    return torch.logsumexp(terms, 0)


def mixture_model(x, **_):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + SHIFT * y, 1.0), obs=x)


def exact_posterior_z_guide(x, **_):
    """q(z | x, y) = p(z | x, y) = N((x - SHIFT y) / 2, sqrt(1/2)); y enumerated with any q(y | x)."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.8, 0.2])), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Normal((x - SHIFT * y) / 2, math.sqrt(0.5)))


def z_only_guide(x, **_):
    """y left to the model's enumeration; q(z | x) = N(x / 2, 1)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 1.0))


def test_log_likelihood_sums_a_guide_enumerated_site_exactly():
    # With the exact posterior over z given y, each weight summed over y is p(x) exactly.
    estimate = importance_log_likelihood(mixture_model, exact_posterior_z_guide, {"x": X}, particles=3)
    assert torch.allclose(estimate, exact_log_marginal(X), atol=1e-5)


def test_log_likelihood_sums_a_model_enumerated_site_exactly():
    pyro.set_rng_seed(0)
    estimate = importance_log_likelihood(mixture_model, z_only_guide, {"x": X}, particles=20000, batch_size=4)
    assert torch.allclose(estimate, exact_log_marginal(X), atol=0.02)


def test_log_likelihood_of_a_purely_discrete_model_is_exact():
    def model(x, **_):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(SHIFT * y, math.sqrt(2.0)), obs=x)

    def guide(x, **_):
        pass

    estimate = importance_log_likelihood(model, guide, {"x": X}, particles=1)
    assert torch.allclose(estimate, exact_log_marginal(X), atol=1e-6)


@pytest.mark.parametrize("objective", [ELBO(), MeanFieldELBO(), IWAE(particles=3)], ids=["elbo", "meanfield", "iwae"])
@pytest.mark.parametrize("guide", [exact_posterior_z_guide, z_only_guide], ids=["guide_enumerated", "model_enumerated"])
def test_objectives_that_cannot_sum_out_refuse_the_site_by_name(objective, guide):
    with pytest.raises(UnsupportedPairError, match=rf"{objective.name!r} cannot sum out the enumerated site 'y'.*enum_elbo"):
        objective(mixture_model, guide, {"x": X})


def test_a_declared_enumerated_site_without_annotation_is_refused_too():
    class Model(torch.nn.Module):
        latent_sites = (LatentSite("y", (), discrete=True, enumerated=True), LatentSite("z", ()))

        def forward(self, x, **_):
            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", dist.Categorical(PRIOR_Y))  # no infer={"enumerate": ...}
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z + SHIFT * y, 1.0), obs=x)

    with pytest.raises(UnsupportedPairError, match="'y'"):
        ELBO()(Model(), z_only_guide, {"x": X})


def test_log_likelihood_of_labelled_rows_is_the_joint_with_their_label():
    """obs_mask on the label (semi-supervised rows): the guide enumerates y_unobserved only where
    the label is missing; labelled rows get log p(x, y), unlabelled rows log p(x)."""
    y = torch.tensor([1, 0, 0, 1])
    y_mask = torch.tensor([True, False, True, False])

    def model(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + SHIFT * label, 1.0), obs=x)

    def guide(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            guess = pyro.sample(
                "y_unobserved", dist.Categorical(torch.tensor([0.3, 0.7])).mask(~y_mask), infer={"enumerate": "parallel"}
            )
            label = torch.where(y_mask, y, guess)
            pyro.sample("z", dist.Normal((x - SHIFT * label) / 2, math.sqrt(0.5)))

    estimate = importance_log_likelihood(model, guide, {"x": X, "y": y, "y_mask": y_mask}, particles=2)
    joint = PRIOR_Y[y].log() + dist.Normal(SHIFT * y, math.sqrt(2.0)).log_prob(X)
    expected = torch.where(y_mask, joint, exact_log_marginal(X))
    assert torch.allclose(estimate, expected, atol=1e-5)
