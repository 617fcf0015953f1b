"""Free bits and MMD (InfoVAE) as wrappers of ``elbo`` / ``meanfield_elbo``
(:mod:`pyrovae.objectives.regularized`): switched off they are the inner objective exactly; free
bits zeroes the KL gradient of groups below the threshold and leaves the others alone; the MMD is
the unbiased U-statistic, checked against a brute-force double sum."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.nn import functional as F

from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.experiment import Experiment
from pyrovae.handlers import kl_scale
from pyrovae.objectives import FreeBits, MeanFieldELBO, build_objective, kl_terms, squared_mmd
from pyrovae.train import TrainConfig, fit
from pyrovae.traces import trace_pair
from tests.conftest import grads, tiny_experiment, tiny_pair, zero

INNERS = ("elbo", "meanfield_elbo")


class LinearGaussian:
    """A toy pair whose second latent dimension the data never see:

        p(z_n) = Normal(mu_p, I_2),   p(x_n | z_n) = Normal(w z_{n,0}, 1)
        q(z_n | x_n) = Normal([a x_n + b_0, b_1], diag(softplus(r)^2))

    so the guide parameters of dimension 1 (b_1, r_1) get gradient from its KL only, and that
    KL is KL_1 = 1/2 (s_1^2 + (b_1 - mu_p1)^2 - 1) - log s_1 exactly."""

    def __init__(self, loc=(2.0, 0.1), scale=(0.3, 0.9)):
        self.w = torch.nn.Parameter(torch.tensor(1.5))
        self.prior_loc = torch.nn.Parameter(torch.zeros(2))
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.tensor(loc))
        self.r = torch.nn.Parameter(torch.log(torch.expm1(torch.tensor(scale))))  # softplus(r) = scale

    @property
    def parameters(self):
        return [self.w, self.prior_loc, self.a, self.b, self.r]

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(self.prior_loc, 1.0).expand([len(x), 2]).to_event(1))
            pyro.sample("x", dist.Normal(self.w * z[..., 0], 1.0), obs=x)

    def guide(self, x):
        loc = torch.stack([self.a * x + self.b[0], self.b[1].expand(len(x))], -1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, F.softplus(self.r)).to_event(1))

    def dimension_one_kl(self) -> float:
        scale, loc = F.softplus(self.r[1]).item(), self.b[1].item() - self.prior_loc[1].item()
        return 0.5 * (scale**2 + loc**2 - 1) - math.log(scale)


def toy_batch(n: int = 64) -> dict:
    return {"x": torch.randn(n, generator=torch.Generator().manual_seed(3))}


def run(objective, toy: LinearGaussian, batch, seed: int = 1, beta: float | None = None):
    """The loss, metrics and gradients (w, prior_loc, a, b, r) of one call on fixed draws."""
    pyro.set_rng_seed(seed)
    if beta is None:
        loss, metrics = objective(toy.model, toy.guide, batch)
    else:
        with kl_scale(beta):
            loss, metrics = objective(toy.model, toy.guide, batch)
    return loss, metrics, torch.autograd.grad(loss, toy.parameters)


def run_pair(objective, model, guide, batch, seed: int = 1):
    zero(model, guide)
    pyro.set_rng_seed(seed)
    loss, metrics = objective(model, guide, batch)
    loss.backward()
    return loss.detach(), metrics, grads(model, guide).clone()


# --- switched off: exactly the inner objective ------------------------------------------------------


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize(
    "wrapper, options",
    [
        ("free_bits", {"threshold": 1e-3}),
        ("free_bits", {"threshold": 1e-3, "per": "site"}),
        ("mmd", {"alpha": 0.0, "weight": 1.0}),
    ],
    ids=["free_bits-dimension", "free_bits-site", "mmd"],
)
def test_switched_off_wrappers_are_the_inner_exactly(inner, wrapper, options):
    # Every group's KL (about 2.8 and 1.4 nats per datapoint) is far above the threshold.
    toy, batch = LinearGaussian(loc=(2.0, 1.5), scale=(0.3, 0.5)), toy_batch()
    loss, metrics, gradients = run(build_objective(wrapper, objective=inner, **options), toy, batch)
    reference_loss, reference_metrics, reference_gradients = run(build_objective(inner), toy, batch)
    assert torch.equal(loss.detach(), reference_loss.detach())
    for ours, theirs in zip(gradients, reference_gradients):
        assert torch.equal(ours, theirs)
    for key, value in reference_metrics.items():  # the inner's metrics, elbo included, untouched
        assert torch.equal(metrics[key], value)
    if wrapper == "free_bits":
        assert float(metrics["free_bits/active_groups"]) == float(metrics["free_bits/groups"])
        assert float(metrics["free_bits/groups"]) == (2 if options.get("per") != "site" else 1)
    else:
        assert float(metrics["mmd"]) > 0  # still reported


@pytest.mark.parametrize("inner", INNERS)
def test_switched_off_wrappers_equal_the_inner_on_a_vae(inner, binary_batch):
    model, guide = tiny_pair()
    expected = run_pair(build_objective(inner), model, guide, binary_batch)
    switched_off = (
        build_objective("mmd", alpha=0.0, weight=1.0, objective=inner),
        build_objective("free_bits", threshold=1e-3, per="site", objective=inner),
    )
    for objective in switched_off:
        loss, _, gradients = run_pair(objective, model, guide, binary_batch)
        assert torch.equal(loss, expected[0])
        assert torch.equal(gradients, expected[2])


# --- free bits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", INNERS)
def test_free_bits_zeroes_the_kl_gradient_of_a_dimension_below_the_threshold(inner):
    # KL_0 is about 2.8 nats (above lambda), KL_1 = 0.015 nats (below it).
    toy, batch, threshold = LinearGaussian(), toy_batch(), 0.5
    loss, metrics, gradients = run(build_objective("free_bits", threshold=threshold, objective=inner), toy, batch)
    reference_loss, reference_metrics, reference_gradients = run(build_objective(inner), toy, batch)
    w, prior_loc, a, b, r = gradients
    _, ref_prior_loc, _, ref_b, ref_r = reference_gradients
    # Dimension 1's guide parameters get gradient from its KL only: free bits zeroes it ...
    assert abs(float(ref_b[1])) > 0.01 and abs(float(ref_r[1])) > 0.01
    assert abs(float(b[1])) < 1e-6 and abs(float(r[1])) < 1e-6
    assert abs(float(prior_loc[1])) < 1e-6 and abs(float(ref_prior_loc[1])) > 0.01
    # ... and leaves dimension 0 and the model as the inner has them.
    kept = [(w, reference_gradients[0]), (a, reference_gradients[2]), (b[0], ref_b[0]), (r[0], ref_r[0]), (prior_loc[0], ref_prior_loc[0])]
    for ours, theirs in kept:
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert float(metrics["free_bits/active_groups"]) == 1 and float(metrics["free_bits/groups"]) == 2
    assert torch.equal(metrics["elbo"], reference_metrics["elbo"])  # the true bound, unregularised
    if inner == "meanfield_elbo":
        # loss = inner + max(lambda, KL_1) - KL_1, with the closed-form KL_1.
        expected = float(reference_loss.detach()) + threshold - toy.dimension_one_kl()
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("per, groups", [("site", 1), ("dimension", 2)])
def test_free_bits_value_when_every_group_is_below_the_threshold(inner, per, groups):
    """loss = inner - KL + groups * lambda, with KL the inner's own (its kl/z metric)."""
    toy, batch, threshold = LinearGaussian(), toy_batch(), 50.0
    loss, metrics, gradients = run(build_objective("free_bits", threshold=threshold, per=per, objective=inner), toy, batch)
    reference_loss, reference_metrics, reference_gradients = run(build_objective(inner), toy, batch)
    expected = float(reference_loss.detach()) - float(reference_metrics["kl/z"]) + groups * threshold
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["free_bits/active_groups"]) == 0
    # Only the reconstruction is left: no gradient reaches the prior, or dimension 1 of the guide.
    prior_loc, b, r = gradients[1], gradients[3], gradients[4]
    assert float(prior_loc.abs().max()) < 1e-6 and abs(float(b[1])) < 1e-6 and abs(float(r[1])) < 1e-6


@pytest.mark.parametrize("inner", INNERS)
def test_free_bits_per_site_groups_the_whole_site(inner):
    # The site's KL (about 2.8 nats) is above lambda = 0.5, though dimension 1's alone is not:
    # per site, dimension 1 keeps the inner's KL gradient, per dimension it loses it.
    toy, batch = LinearGaussian(), toy_batch()
    per_site = run(build_objective("free_bits", threshold=0.5, per="site", objective=inner), toy, batch)
    per_dimension = run(build_objective("free_bits", threshold=0.5, objective=inner), toy, batch)
    reference = run(build_objective(inner), toy, batch)
    assert torch.equal(per_site[0].detach(), reference[0].detach())
    assert torch.equal(per_site[2][3], reference[2][3])
    assert abs(float(per_dimension[2][3][1])) < 1e-6
    assert float(per_site[1]["free_bits/groups"]) == 1 and float(per_site[1]["free_bits/active_groups"]) == 1


@pytest.mark.parametrize("inner", INNERS)
def test_kl_groups_are_the_inner_kl_split_per_dimension(inner, binary_batch):
    """On the lean distributions of the VAE (DiagonalNormal, StandardNormal): the groups add up
    to the inner's KL; for meanfield_elbo each is the closed-form KL of its dimension."""
    model, guide = tiny_pair(latent_dim=3)
    objective = build_objective(inner)
    pyro.set_rng_seed(0)
    _, metrics, model_trace, guide_trace = objective.traced_loss(model, guide, binary_batch)
    n = binary_batch["x"].shape[0]
    split = kl_terms(objective, model_trace, guide_trace, per_dimension=True)["z"]
    whole = kl_terms(objective, model_trace, guide_trace)["z"]
    assert split.shape == (3,) and whole.shape == (1,)
    assert float(split.detach().sum()) / n == pytest.approx(float(metrics["kl/z"]), rel=1e-5)
    assert float(whole.detach()) / n == pytest.approx(float(metrics["kl/z"]), rel=1e-6)
    if inner == "meanfield_elbo":
        q = guide_trace.nodes["z"]["fn"]
        by_hand = (0.5 * (q.scale.pow(2) + q.loc.pow(2) - 1) - q.scale.log()).sum(0)
        assert torch.allclose(split, by_hand, rtol=1e-5)


def two_site_pair():
    """z (2 dims, diagonal), u (a scalar) and m (2 dims, full covariance: no per-dimension split)."""
    loc = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    tril = torch.tensor([[1.0, 0.0], [0.5, 0.8]])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(x), 2]).to_event(1))
            u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([len(x)]))
            m = pyro.sample("m", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)).expand([len(x)]))
            pyro.sample("x", dist.Normal(z.sum(-1) + u + m.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0).expand([len(x), 2]).to_event(1))
            pyro.sample("u", dist.Normal(x, 1.0))
            pyro.sample("m", dist.MultivariateNormal(loc, scale_tril=tril).expand([len(x)]))

    return model, guide


@pytest.mark.parametrize("inner", INNERS)
def test_free_bits_groups_per_site_and_falls_back_once_for_sites_that_do_not_factorise(inner):
    model, guide = two_site_pair()
    batch = toy_batch(16)
    per_site = build_objective("free_bits", threshold=0.1, per="site", objective=inner)
    assert float(per_site(model, guide, batch)[1]["free_bits/groups"]) == 3
    per_dimension = build_objective("free_bits", threshold=0.1, objective=inner)
    with pytest.warns(UserWarning, match="site 'm' .* does not factorise per dimension"):
        _, metrics = per_dimension(model, guide, batch)
    assert float(metrics["free_bits/groups"]) == 2 + 1 + 1  # z split, u scalar, m whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        per_dimension(model, guide, batch)


@pytest.mark.parametrize("inner", INNERS)
def test_free_bits_under_annealing_compares_the_annealed_kl(inner):
    """Under kl_scale(beta) the KL terms carry beta: loss = inner(beta) + lambda - beta KL."""
    toy, batch, threshold, beta = LinearGaussian(), toy_batch(), 50.0, 0.25
    loss, metrics, _ = run(build_objective("free_bits", threshold=threshold, per="site", objective=inner), toy, batch, beta=beta)
    reference_loss, reference_metrics, _ = run(build_objective(inner), toy, batch, beta=beta)
    expected = float(reference_loss.detach()) + threshold - beta * float(reference_metrics["kl/z"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    # KL is about 2.8 nats: above lambda = 1 unannealed, below it at beta = 0.25.
    for scale, active in ((None, 1), (beta, 0)):
        _, metrics, _ = run(build_objective("free_bits", threshold=1.0, per="site", objective=inner), toy, batch, beta=scale)
        assert float(metrics["free_bits/active_groups"]) == active


# --- MMD: the estimator ------------------------------------------------------------------------------


def brute_force_mmd(x, y, kernel, bandwidth):
    def k(a, b):
        distance = float(((a - b) ** 2).sum())
        return bandwidth / (bandwidth + distance) if kernel == "imq" else math.exp(-distance / bandwidth)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_mmd_is_the_u_statistic(kernel):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 3, generator=generator, dtype=torch.float64) + 0.5
    assert float(squared_mmd(x, y, kernel)) == pytest.approx(brute_force_mmd(x, y, kernel, 6.0), rel=1e-10)
    assert float(squared_mmd(x, y, kernel, bandwidth=0.7)) == pytest.approx(brute_force_mmd(x, y, kernel, 0.7), rel=1e-10)


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_mmd_separates_equal_from_shifted_distributions(kernel):
    generator = torch.Generator().manual_seed(1)
    sample = lambda: torch.randn(500, 8, generator=generator)  # noqa: E731
    same = [abs(float(squared_mmd(sample(), sample(), kernel))) for _ in range(5)]
    shifted = float(squared_mmd(sample(), sample() + 1.0, kernel))  # every coordinate shifted by one sd
    assert max(same) < 0.01
    assert shifted > 10 * 0.01


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_mmd_is_unbiased(kernel):
    """For one distribution its mean over many draws is 0 (within 4 standard errors), so some
    estimates are negative; the biased V-statistic would sit about 0.03 above 0 here."""
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(1000, 20, 2, generator=generator), torch.randn(1000, 20, 2, generator=generator)
    estimates = squared_mmd(x, y, kernel)  # batched: 1000 independent estimates
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean())) < 4 * standard_error
    assert standard_error < 0.002 and float(estimates.min()) < 0


# --- MMD: the objective -------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", INNERS)
def test_mmd_value_is_inner_minus_alpha_kl_plus_coefficient_mmd(inner):
    toy, batch, alpha, weight = LinearGaussian(), toy_batch(), 0.4, 20.0
    loss, metrics, _ = run(build_objective("mmd", alpha=alpha, weight=weight, objective=inner), toy, batch)
    reference_loss, reference_metrics, _ = run(build_objective(inner), toy, batch)
    kl = float(reference_metrics["kl/z"])
    expected = float(reference_loss.detach()) - alpha * kl + (alpha + weight - 1) * float(metrics["mmd"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(metrics["elbo"], reference_metrics["elbo"])
    # Under kl_scale(beta) the KL terms carry beta; the MMD does not.
    beta = 0.5
    loss, metrics, _ = run(build_objective("mmd", alpha=alpha, weight=weight, objective=inner), toy, batch, beta=beta)
    reference_loss, _, _ = run(build_objective(inner), toy, batch, beta=beta)
    expected = float(reference_loss.detach()) - alpha * beta * kl + (alpha + weight - 1) * float(metrics["mmd"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_mmd_gradient_flows_through_the_guide_draws_only():
    """The MMD term equals the brute-force U-statistic between the guide's draws and the
    prior's; its gradient reaches the guide's parameters through the draws, and not the prior's
    (drawn with .sample()) nor the likelihood's."""
    toy, batch, weight = LinearGaussian(), toy_batch(16), 11.0
    objective = build_objective("mmd", weight=weight, objective="meanfield_elbo")
    loss, metrics, gradients = run(objective, toy, batch, seed=5)
    _, _, reference_gradients = run(build_objective("meanfield_elbo"), toy, batch, seed=5)
    # The same draws by hand: the guide runs first, then the prior's draw (the replay draws nothing).
    pyro.set_rng_seed(5)
    model_trace, guide_trace = trace_pair(toy.model, toy.guide, batch, max_plate_nesting=1)
    with torch.no_grad():
        prior_draws = model_trace.nodes["z"]["fn"].sample()
    guide_draws = guide_trace.nodes["z"]["value"]
    assert float(metrics["mmd"]) == pytest.approx(brute_force_mmd(guide_draws.detach(), prior_draws, "imq", 4.0), rel=1e-5)
    by_hand = torch.autograd.grad(squared_mmd(guide_draws, prior_draws), [toy.a, toy.b, toy.r])
    for ours, inner, mmd_part in zip(gradients[2:], reference_gradients[2:], by_hand):
        assert torch.allclose(ours - inner, (weight - 1) * mmd_part, rtol=1e-4, atol=1e-6)
    assert float(by_hand[1].abs().max()) > 1e-3  # the MMD part is not trivially zero
    for ours, inner in ((gradients[0], reference_gradients[0]), (gradients[1], reference_gradients[1])):
        assert torch.allclose(ours, inner, rtol=1e-5, atol=1e-7)


def test_mmd_with_particles_and_a_vae_is_finite_and_differentiable(binary_batch):
    model, guide = tiny_pair()
    loss, metrics, gradients = run_pair(build_objective("mmd", particles=3, alpha=0.5, weight=100.0), model, guide, binary_batch)
    assert torch.isfinite(loss) and torch.isfinite(gradients).all() and math.isfinite(float(metrics["mmd"]))
    # One datapoint has no unbiased estimate: the term is 0, the loss the inner's (with alpha).
    one = {"x": binary_batch["x"][:1]}
    assert float(build_objective("mmd")(model, guide, one)[1]["mmd"]) == 0


# --- refusals and the TOML path ------------------------------------------------------------------------


def test_mmd_sign_guard():
    with pytest.raises(ConfigError, match=r"alpha \+ weight - 1 = -0\.999 is negative, which rewards a larger MMD"):
        build_objective("mmd", alpha=0.0, weight=1e-3)  # a published library's default
    with pytest.raises(ConfigError, match="rewards a larger KL"):
        build_objective("mmd", alpha=1.5, weight=10.0)
    with pytest.raises(ConfigError, match="kernel"):
        build_objective("mmd", kernel="laplace")
    build_objective("mmd", alpha=1.0, weight=0.0)  # coefficient 0, KL weight 0: allowed (a plain autoencoder)


@pytest.mark.parametrize("wrapper, options", [("free_bits", {"threshold": 1.0}), ("mmd", {})])
@pytest.mark.parametrize("inner", ["iwae", "enum_elbo", "pyro:Trace_ELBO", "free_bits"])
def test_wrappers_refuse_inner_objectives_whose_loss_is_not_linear_in_the_kl(wrapper, options, inner):
    with pytest.raises(ConfigError, match="not linear|linear in them"):
        build_objective(wrapper, objective=inner, **options)


def test_free_bits_refuses_a_bad_threshold_or_grouping():
    with pytest.raises(ConfigError, match="threshold > 0"):
        build_objective("free_bits", threshold=0.0)
    with pytest.raises(ConfigError, match="per = 'layer'"):
        build_objective("free_bits", threshold=1.0, per="layer")


@pytest.mark.parametrize("wrapper, options", [("free_bits", {"threshold": 1.0}), ("mmd", {})])
def test_wrappers_refuse_score_function_sites_by_name(wrapper, options):
    logit = torch.nn.Parameter(torch.tensor(0.3))

    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(logits=logit.expand(len(x))))

    with pytest.raises(UnsupportedPairError, match="'c' of model has no rsample"):
        build_objective(wrapper, **options)(model, guide, {"x": torch.zeros(4)})


def test_toml_options_build_the_wrappers():
    objective = build_objective("free_bits", objective="meanfield_elbo", threshold=0.5)
    assert isinstance(objective, FreeBits) and isinstance(objective.inner, MeanFieldELBO)
    assert objective.threshold == 0.5 and objective.per == "dimension"
    assert build_objective("mmd", particles=4).inner.particles == 4
    table = {"name": "mmd", "objective": "meanfield_elbo", "kernel": "gaussian", "alpha": 0.5, "weight": 10}
    experiment = Experiment.from_config(tiny_experiment(objective=table))
    assert experiment.objective.kernel == "gaussian" and experiment.objective.weight == 10.0
    with pytest.raises(ConfigError, match="unknown key 'lambda_'"):
        Experiment.from_config(tiny_experiment(objective={"name": "mmd", "lambda_": 10.0}))
    with pytest.raises(ConfigError, match="rewards a larger MMD"):
        Experiment.from_config(tiny_experiment(objective={"name": "mmd", "weight": 0.5}))
    with pytest.raises(ConfigError, match="missing required key 'threshold'"):
        Experiment.from_config(tiny_experiment(objective={"name": "free_bits"}))


@pytest.mark.parametrize(
    "table, metric",
    [({"name": "free_bits", "threshold": 0.25}, "free_bits/active_groups"), ({"name": "mmd", "objective": "meanfield_elbo"}, "mmd")],
    ids=["free_bits", "mmd"],
)
def test_one_epoch_of_fit_trains_with_the_wrappers(table, metric):
    experiment = Experiment.from_config(tiny_experiment(objective=table))
    model, guide = experiment.model, experiment.guide
    before = [p.detach().clone() for p in guide.parameters()]
    config = TrainConfig(epochs=1, batch_size=128, lr=3e-3)
    result = fit(model, guide, experiment.objective, experiment.data, config, progress=False)
    (record,) = result.state.history
    for key in ("train/elbo", "valid/elbo", f"train/{metric}", f"valid/{metric}"):
        assert math.isfinite(record[key]), key
    assert any(not torch.equal(old, new) for old, new in zip(before, guide.parameters()))
