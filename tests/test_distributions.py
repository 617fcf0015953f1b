"""The lean distributions give the values and gradients of their Pyro spellings."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyrovae.distributions import BernoulliLogits, DiagonalNormal, StandardNormal
from pyrovae.objectives import detach_parameters


def _parameters(seed=0, shape=(6, 4)):
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=generator).requires_grad_()
    raw = torch.randn(shape, generator=generator).requires_grad_()
    return loc, raw


def test_diagonal_normal_log_prob_of_its_own_draw_matches_pyro_in_value_and_gradient():
    loc, raw = _parameters()
    torch.manual_seed(1)
    ours = DiagonalNormal(loc, torch.nn.functional.softplus(raw))
    z = ours.rsample()
    ours_value = ours.log_prob(z)  # takes the cached-noise path
    assert ours._last_draw[0] is z
    # d/d loc of log q(loc + sigma * eps) is 0: the cached path does not touch loc at all.
    ours_grads = torch.autograd.grad(ours_value.sum(), (loc, raw), allow_unused=True, materialize_grads=True)

    reference = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)
    torch.manual_seed(1)
    z_ref = reference.rsample()
    assert torch.equal(z, z_ref)  # same noise, same draw
    ref_value = reference.log_prob(z_ref)
    ref_grads = torch.autograd.grad(ref_value.sum(), (loc, raw))
    assert ours_value.shape == ref_value.shape == (6,)
    torch.testing.assert_close(ours_value, ref_value)
    for mine, theirs in zip(ours_grads, ref_grads):
        torch.testing.assert_close(mine, theirs)


def test_diagonal_normal_general_formula_for_other_values_and_event_dims():
    loc, raw = _parameters(shape=(3, 2, 5))
    scale = torch.nn.functional.softplus(raw)
    value = torch.randn(3, 2, 5)
    for event_dim in (0, 1, 2):
        ours = DiagonalNormal(loc, scale, event_dim).log_prob(value)
        reference = dist.Normal(loc, scale).to_event(event_dim).log_prob(value)
        torch.testing.assert_close(ours, reference)
    d = DiagonalNormal(loc, scale, 2)
    assert d.batch_shape == (3,) and d.event_shape == (2, 5)
    torch.testing.assert_close(d.entropy(), dist.Normal(loc, scale).to_event(2).entropy())


def test_expand_to_the_same_shape_is_free_and_to_a_new_shape_broadcasts():
    loc, raw = _parameters()
    d = DiagonalNormal(loc, raw.exp())
    assert d.expand((6,)) is d
    wide = d.expand((5, 6))
    assert wide.batch_shape == (5, 6) and wide.rsample().shape == (5, 6, 4)
    prior = StandardNormal((6,), (4,))
    assert prior.expand((6,)) is prior and prior.expand((2, 6)).sample().shape == (2, 6, 4)


def test_standard_normal_and_bernoulli_match_pyro():
    z = torch.randn(7, 3)
    torch.testing.assert_close(StandardNormal((7,), (3,)).log_prob(z), dist.Normal(0.0, 1.0).expand((7, 3)).to_event(1).log_prob(z))
    logits = torch.randn(7, 10, requires_grad=True)
    x = torch.bernoulli(torch.full((7, 10), 0.4))
    ours = BernoulliLogits(logits).log_prob(x)
    reference = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    torch.testing.assert_close(ours, reference)
    # Broadcast against a particle dim, as under IWAE's particle plate.
    wide_logits = torch.randn(4, 7, 10)
    torch.testing.assert_close(BernoulliLogits(wide_logits).log_prob(x), dist.Bernoulli(logits=wide_logits).to_event(1).log_prob(x))
    torch.testing.assert_close(BernoulliLogits(logits).entropy(), dist.Bernoulli(logits=logits).to_event(1).entropy())


def test_registered_kls_match_torch_closed_forms():
    loc, raw = _parameters()
    q = DiagonalNormal(loc, raw.exp())
    p = DiagonalNormal(loc.detach() * 0.5, torch.full_like(loc, 1.7))
    reference_q = dist.Normal(loc, raw.exp()).to_event(1)
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(reference_q, dist.Normal(loc.detach() * 0.5, 1.7).to_event(1)))
    torch.testing.assert_close(kl_divergence(q, StandardNormal((6,), (4,))), kl_divergence(reference_q, dist.Normal(torch.zeros(6, 4), 1.0).to_event(1)))


def test_validation_rejects_values_outside_the_support():
    with pytest.raises(ValueError):
        BernoulliLogits(torch.zeros(3, 2), validate_args=True).log_prob(torch.full((3, 2), 0.5))
    with pytest.raises(ValueError):
        DiagonalNormal(torch.zeros(2), -torch.ones(2), validate_args=True)


def test_detached_copy_keeps_values_and_cuts_parameter_gradients():
    loc, raw = _parameters()
    d = DiagonalNormal(loc, raw.exp())
    cut = detach_parameters(d)
    value = torch.randn(6, 4, requires_grad=True)
    torch.testing.assert_close(cut.log_prob(value), d.log_prob(value))
    cut.log_prob(value).sum().backward()
    assert loc.grad is None and raw.grad is None and value.grad is not None


def test_sites_behave_under_pyro_plates_and_traces():
    def model():
        with pyro.plate("particles", 3, dim=-2), pyro.plate("data", 5):
            z = pyro.sample("z", DiagonalNormal(torch.zeros(5, 2), torch.ones(5, 2)))
            pyro.sample("x", BernoulliLogits(z.sum(-1, keepdim=True).expand(3, 5, 4)), obs=torch.ones(5, 4))

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (3, 5, 2)
    assert trace.nodes["z"]["log_prob"].shape == (3, 5)
    assert trace.nodes["x"]["log_prob"].shape == (3, 5)
