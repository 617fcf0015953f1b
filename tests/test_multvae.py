"""The multinomial likelihood, and the Mult-VAE / Mult-DAE pairs of Liang et al. 2018."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Multinomial

from pyrovae import DataSpec
from pyrovae.errors import DataError
from pyrovae.likelihoods import MultinomialLogits, build_likelihood

# --- the multinomial likelihood ------------------------------------------------------------------


def _closed_form(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N! - sum_i log x_i! + sum_i x_i log pi_i, written out term by term in float64."""
    values = []
    for row_logits, row in zip(logits.double(), x.double()):
        log_pi = row_logits - torch.logsumexp(row_logits, 0)
        total = sum(math.lgamma(float(count) + 1) for count in row)
        values.append(math.lgamma(float(row.sum()) + 1) - total + float((row * log_pi).sum()))
    return torch.tensor(values, dtype=torch.float64)


def test_multinomial_log_likelihood_equals_the_closed_form_and_torch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=generator) * 2
    x = torch.tensor(
        [[0, 1, 2, 0, 0, 3, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0], [0, 4, 0, 1, 0, 0, 2]],
        dtype=torch.float32,
    )
    ours = MultinomialLogits(logits).log_prob(x).double()
    assert torch.allclose(ours, _closed_form(logits, x), atol=1e-4)
    reference = torch.stack([Multinomial(int(row.sum()), logits=row_logits).log_prob(row) for row_logits, row in zip(logits, x)])
    assert torch.allclose(ours.float(), reference, atol=1e-4)
    # Without the constant: sum_i x_i log pi_i, the paper's loss; the difference is log N! - sum log x_i!.
    without = MultinomialLogits(logits, include_constant=False).log_prob(x)
    constant = torch.lgamma(x.sum(-1) + 1) - torch.lgamma(x + 1).sum(-1)
    assert torch.allclose(without + constant, ours.float(), atol=1e-4)
    assert without[2] == 0 and float(ours[2]) == pytest.approx(0.0)  # N = 0: probability one
    # Same gradients with or without the constant.
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    MultinomialLogits(a).log_prob(x).sum().backward()
    MultinomialLogits(b, include_constant=False).log_prob(x).sum().backward()
    assert torch.allclose(a.grad, b.grad)


def test_multinomial_broadcasts_over_particles_and_draws_rows_of_their_totals():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, generator=generator)  # (particles, batch, items)
    x = torch.tensor([[1.0, 0, 2, 0, 0, 1], [0, 0, 0, 3, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    scored = MultinomialLogits(logits).log_prob(x)
    assert scored.shape == (3, 4)
    assert torch.allclose(scored[2], MultinomialLogits(logits[2]).log_prob(x))
    distribution = MultinomialLogits(logits[0], total_count=torch.tensor([4.0, 3.0, 6.0, 0.0]))
    assert distribution.expand((2, 4)).batch_shape == (2, 4)
    torch.manual_seed(0)
    draws = distribution.sample((2000,))
    assert draws.shape == (2000, 4, 6) and torch.equal(draws.sum(-1)[0], torch.tensor([4.0, 3.0, 6.0, 0.0]))
    # The empirical mean of 2000 draws is N pi within 5 standard errors.
    error = (draws.mean(0) - distribution.mean).abs()
    standard_error = (distribution.variance / 2000).sqrt()
    assert bool((error <= 5 * standard_error + 1e-6).all())
    with pytest.raises(ValueError, match="no total_count"):
        MultinomialLogits(logits[0]).sample()


def test_the_multinomial_head_refuses_what_is_not_counts():
    head = build_likelihood("multinomial", DataSpec("counts", (5,), "real"))
    assert head.out_features == 5
    head.check_data(torch.tensor([[0.0, 2, 1, 0, 7]]))
    with pytest.raises(DataError, match=r"multinomial likelihood needs counts .*row 0, feature 1 is 0.5"):
        head.check_data(torch.tensor([[0.0, 0.5, 1, 0, 0]]))
    with pytest.raises(DataError, match="row 1, feature 0 is -1"):
        head.check_data(torch.tensor([[0.0, 0, 1, 0, 0], [-1.0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="x of shape"):
        build_likelihood("multinomial", DataSpec("images", (2, 3), "real"))
