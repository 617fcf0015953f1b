"""IWAE with a score-function (categorical) guide site: VIMCO's gradient must equal the exact
gradient of E[L_K], computed by brute force over every joint draw of the K particles."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.objectives import IWAE, vimco_learning_signals
from pyrovae.errors import UnsupportedPairError

PRIOR_LOGITS = torch.tensor([0.3, -0.2, 0.1])
MEANS = torch.tensor([-1.5, 0.0, 2.0])
X = torch.tensor([0.7])


class FixedDraws(dist.TorchDistribution):
    """Categorical(logits) whose ``sample`` returns given values: the brute force enumerates the draws."""

    arg_constraints = {}
    has_rsample = False

    def __init__(self, logits, values):
        self.base, self.values = dist.Categorical(logits=logits), values
        super().__init__(self.base.batch_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return FixedDraws(self.base.logits.expand(tuple(batch_shape) + (self.base.logits.shape[-1],)), self.values)

    def sample(self, sample_shape=torch.Size()):
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        # The objective's one look-ahead run (no particle plate) asks for fewer values.
        return self.values.reshape(-1)[: math.prod(shape)].reshape(shape)

    def log_prob(self, value):
        return self.base.log_prob(value)


def model(x, **_):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(logits=PRIOR_LOGITS))
        pyro.sample("x", dist.Normal(MEANS[z], 1.0), obs=x)


def make_guide(logits, draws):
    def guide(x, **_):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", FixedDraws(logits, draws) if draws is not None else dist.Categorical(logits=logits))

    return guide


def exact_expected_bound(logits, particles):
    """E_{z_1..z_K ~ q}[log (1/K) sum_k p(x, z_k) / q(z_k)], summed over all K-tuples."""
    log_q = torch.log_softmax(logits, -1)
    log_joint = torch.log_softmax(PRIOR_LOGITS, -1) + dist.Normal(MEANS, 1.0).log_prob(X)
    total = 0.0
    for draw in itertools.product(range(3), repeat=particles):
        draw = torch.tensor(draw)
        probability = log_q[draw].sum().exp()
        total = total + probability * (torch.logsumexp(log_joint[draw] - log_q[draw], 0) - math.log(particles))
    return total


@pytest.mark.parametrize("particles", [1, 2, 3])
def test_vimco_gradient_equals_the_exact_gradient_of_the_expected_bound(particles):
    logits = torch.nn.Parameter(torch.tensor([0.5, -0.4, 0.2]))
    (exact,) = torch.autograd.grad(exact_expected_bound(logits, particles), [logits])
    objective = IWAE(particles=particles, max_plate_nesting=1)
    expected = torch.zeros(3)
    log_q = torch.log_softmax(logits.detach(), -1)
    for draw in itertools.product(range(3), repeat=particles):
        draw = torch.tensor(draw)
        loss, _ = objective(model, make_guide(logits, draw.reshape(particles, 1)), {"x": X})
        (gradient,) = torch.autograd.grad(-loss, [logits])
        expected += log_q[draw].sum().exp() * gradient
    assert torch.allclose(expected, exact, atol=1e-5), (expected, exact)


def test_vimco_trains_a_categorical_guide_towards_the_posterior_instead_of_a_point_mass():
    logits = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([logits], lr=0.05)
    objective = IWAE(particles=5, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    batch = {"x": X.expand(64)}
    for _ in range(400):
        optimizer.zero_grad()
        loss, metrics = objective(model, make_guide(logits.expand(64, 3), None), batch)
        loss.backward()
        optimizer.step()
    log_joint = torch.log_softmax(PRIOR_LOGITS, -1) + dist.Normal(MEANS, 1.0).log_prob(X)
    posterior = torch.softmax(log_joint, -1)
    learned = torch.softmax(logits.detach(), -1)
    # Without the score-function term the guide collapses onto one value (KL -> large).
    assert float(learned.max()) < 0.9
    assert torch.allclose(learned, posterior, atol=0.1), (learned, posterior)


def test_learning_signals_match_the_leave_one_out_definition():
    torch.manual_seed(0)
    log_weights = torch.randn(4, 3)
    signals = vimco_learning_signals(log_weights)
    for k in range(4):
        others = torch.cat([log_weights[:k], log_weights[k + 1 :]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        leave_one_out = torch.logsumexp(replaced, 0) - math.log(4)
        bound = torch.logsumexp(log_weights, 0) - math.log(4)
        assert torch.allclose(signals[k], bound - leave_one_out, atol=1e-6)


def test_dreg_refuses_a_score_function_site_by_name():
    logits = torch.zeros(3)
    with pytest.raises(UnsupportedPairError, match="'z'.*no rsample"):
        IWAE(particles=3, dreg=True)(model, make_guide(logits, None), {"x": X})
