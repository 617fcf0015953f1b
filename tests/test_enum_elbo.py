"""enum_elbo: Pyro's TraceEnum_ELBO loss and gradients, with metrics that equal the exact sums."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pyrovae.handlers import kl_scale
from pyrovae.objectives import EnumELBO

X = torch.tensor([-0.4, 1.3, 3.1, 2.2, 0.2])
Y = torch.tensor([1, 0, 0, 1, 0])
Y_MASK = torch.tensor([True, False, True, False, False])
X_MASK = torch.tensor([True, True, False, True, True])
PRIOR_Y = torch.tensor([0.2, 0.5, 0.3])
MEANS = torch.tensor([-1.0, 1.0, 3.0])


class Pair(torch.nn.Module):
    """An M2-shaped toy: y ~ Cat(PRIOR_Y) observed where Y_MASK, z ~ N(0, 1), x ~ N(z + MEANS[y], 1)
    masked by X_MASK; q(y | x) enumerated where the label is hidden, q(z | x, y) Normal."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(1, 3)
        self.encoder = torch.nn.Linear(2, 2)

    def model(self, x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(z + MEANS[label], 1.0), obs=x)

    def guide(self, x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            logits = self.classifier(x.unsqueeze(-1))
            guess = pyro.sample(
                "y_unobserved", dist.Categorical(logits=logits).mask(~y_mask), infer={"enumerate": "parallel"}
            )
            label = torch.where(y_mask, y, guess)
            features = torch.stack(torch.broadcast_tensors(x, MEANS[label]), -1)
            loc, raw_scale = self.encoder(features).unbind(-1)
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw_scale) + 0.1))


def mixture_model(x, **_):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)


def no_guide(x, **_):
    pass


BATCH = {"x": X, "y": Y, "y_mask": Y_MASK}


def gradients(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("particles", [1, 3])
def test_loss_and_gradients_equal_pyros_trace_enum_elbo(beta, particles):
    pair = Pair()
    objective = EnumELBO(particles=particles)
    objective.prepare(pair.model, pair.guide, BATCH)
    pyro.set_rng_seed(0)
    with kl_scale(beta):
        loss, _ = objective(pair.model, pair.guide, BATCH)
    loss.backward()
    ours = gradients(pair)
    pair.zero_grad()
    pyro.set_rng_seed(0)
    pyros = TraceEnum_ELBO(max_plate_nesting=1, num_particles=particles, vectorize_particles=True)
    with kl_scale(beta):
        pyro_loss = pyros.differentiable_loss(pair.model, pair.guide, **BATCH) / len(X)
    pyro_loss.backward()
    assert float(loss) == pytest.approx(float(pyro_loss), abs=1e-5)
    assert torch.allclose(ours, gradients(pair), atol=1e-5)


def test_metrics_under_annealing_are_the_unannealed_ones_on_the_same_draws():
    pair = Pair()
    objective = EnumELBO()
    objective.prepare(pair.model, pair.guide, BATCH)
    pyro.set_rng_seed(4)
    plain_loss, plain = objective(pair.model, pair.guide, BATCH)
    pyro.set_rng_seed(4)
    with kl_scale(0.3):
        annealed_loss, annealed = objective(pair.model, pair.guide, BATCH)
    assert float(plain_loss) != pytest.approx(float(annealed_loss), abs=1e-3)
    for key in plain:
        assert float(annealed[key]) == pytest.approx(float(plain[key]), abs=1e-5), key
    assert float(plain["elbo"]) == pytest.approx(-float(plain_loss), abs=1e-5)
    assert float(plain["elbo"]) == pytest.approx(float(plain["reconstruction"] - plain["kl/y_unobserved"] - plain["kl/z"]), abs=1e-5)


def test_metrics_equal_the_exact_sums_over_an_enumerated_guide_site():
    """Everything discrete: the ELBO, the KL of q(y | x) and the reconstruction are exact sums."""
    q_logits = torch.tensor([[0.3, -0.2, 0.5]]).expand(len(X), 3)

    def guide(x, **_):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})

    def model(x, **_):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PRIOR_Y))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(MEANS[y], 1.0), obs=x)

    _, metrics = EnumELBO()(model, guide, {"x": X})
    q = torch.softmax(q_logits, -1)
    log_likelihood = dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1)) * X_MASK.unsqueeze(-1)  # (B, 3)
    reconstruction = (q * log_likelihood).sum(-1).mean()
    kl = (q * (q.log() - PRIOR_Y.log())).sum(-1).mean()
    assert float(metrics["reconstruction"]) == pytest.approx(float(reconstruction), abs=1e-5)
    assert float(metrics["kl/y"]) == pytest.approx(float(kl), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(float(reconstruction - kl), abs=1e-5)


def test_a_site_summed_out_in_the_model_gives_the_exact_marginal():
    loss, metrics = EnumELBO()(mixture_model, no_guide, {"x": X})
    exact = torch.logsumexp(PRIOR_Y.log() + dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1)), -1).mean()
    assert float(metrics["elbo"]) == pytest.approx(float(exact), abs=1e-5)
    assert float(metrics["reconstruction"]) == pytest.approx(float(exact), abs=1e-5)
    assert "kl/y" not in metrics
    # Annealing cannot touch a site that has no KL term.
    with kl_scale(0.3):
        annealed_loss, _ = EnumELBO()(mixture_model, no_guide, {"x": X})
    assert float(annealed_loss) == pytest.approx(float(loss), abs=1e-6)


def test_labelled_rows_count_once():
    """A hidden-label row averages over q(y | x); a labelled row uses its label: the ELBO equals
    the hand sum when z is dropped from the toy."""
    q_logits = torch.tensor([0.1, 0.4, -0.3])

    def model(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(PRIOR_Y), obs=y, obs_mask=y_mask)
            pyro.sample("x", dist.Normal(MEANS[label], 1.0), obs=x)

    def guide(x, y, y_mask):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "y_unobserved",
                dist.Categorical(logits=q_logits.expand(len(x), 3)).mask(~y_mask),
                infer={"enumerate": "parallel"},
            )

    _, metrics = EnumELBO()(model, guide, BATCH)
    q = torch.softmax(q_logits, -1)
    joint = PRIOR_Y.log() + dist.Normal(MEANS, 1.0).log_prob(X.unsqueeze(-1))  # (B, 3)
    unlabelled = (q * (joint - q.log())).sum(-1)
    labelled = joint.gather(-1, Y.unsqueeze(-1)).squeeze(-1)
    expected = torch.where(Y_MASK, labelled, unlabelled).mean()
    assert float(metrics["elbo"]) == pytest.approx(float(expected), abs=1e-5)
    assert math.isfinite(float(metrics["kl/y_unobserved"]))
