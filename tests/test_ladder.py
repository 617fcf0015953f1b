"""The Ladder VAE family: the two-layer model with its bottom-up and top-down (ladder) guides.

The central check is a linear-Gaussian two-layer model, where everything has a closed form:

    z2 ~ N(0, I),   z1 | z2 ~ N(A z2, s1^2 I),   x | z1 ~ N(B z1, s0^2 I)
    =>  p(x) = N(x; 0, B (A A^T + s1^2 I) B^T + s0^2 I).

With B = U diag(b) (U orthonormal columns) and A mixing disjoint blocks of z1, the exact posterior
p(z2 | x) p(z1 | z2, x) is diagonal in both factors, and the ladder guide's precision-weighted merge
(Sønderby et al. 2016, eq. 17-19) can represent it exactly with linear networks (``hidden = []``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyrovae import DataSpec, check_pair
from pyrovae.analysis import active_units, importance_log_likelihood, observation_means
from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from pyrovae.guides import BottomUpGuide, BottomUpGuideConfig, LadderGuide, LadderGuideConfig
from pyrovae.handlers import kl_scale
from pyrovae.models import GaussianVAE, GaussianVAEConfig, LadderVAE, LadderVAEConfig
from pyrovae.objectives import ELBO
from pyrovae.traces import log_weights, trace_pair

FEATURES, D1, D2 = 6, 4, 2
S0, S1 = 0.3, 0.6


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y.expm1().log()


def linear_problem():
    """(A, B, U, b) of the linear-Gaussian model, in float64."""
    generator = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(FEATURES, D1, generator=generator, dtype=torch.float64))
    b = torch.tensor([1.5, 0.8, 1.2, 2.0], dtype=torch.float64)
    A = torch.zeros(D1, D2, dtype=torch.float64)
    A[0, 0], A[1, 0], A[2, 1], A[3, 1] = 1.0, -0.7, 0.5, 1.3  # z2_1 drives z1_{1,2}; z2_2 drives z1_{3,4}
    return A, U * b, U, b


def marginal_log_likelihood(x: torch.Tensor) -> torch.Tensor:
    A, B, _, _ = linear_problem()
    covariance = B @ (A @ A.T + S1**2 * torch.eye(D1, dtype=torch.float64)) @ B.T + S0**2 * torch.eye(FEATURES, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(torch.zeros(FEATURES, dtype=torch.float64), covariance).log_prob(x)


def linear_pair(guide_class=LadderGuide, guide_config=None):
    spec = DataSpec("linear", (FEATURES,), "real")
    model = LadderVAE(
        LadderVAEConfig(latent_dims=[D1, D2], hidden=[[], []], likelihood="gaussian", observation_scale=S0, min_scale=1e-3), spec
    )
    if guide_config is None:
        guide_config = LadderGuideConfig(hidden=[[], []], deterministic=[D1, D1]) if guide_class is LadderGuide else BottomUpGuideConfig()
    guide = guide_class(guide_config, spec, model)
    return model.double(), guide.double()


def set_exact_parameters(model: LadderVAE, guide: LadderGuide) -> None:
    """The model's A, B, s1 and the ladder guide's networks at the exact posterior."""
    A, B, U, b = linear_problem()
    eye = torch.eye(D1, dtype=torch.float64)
    # Cov(x | z2) = s1^2 B B^T + s0^2 I has eigenvectors U: B^T C^-1 = diag(b / (s0^2 + s1^2 b^2)) U^T.
    gain = b / (S0**2 + S1**2 * b**2)
    posterior_cov_z2 = torch.linalg.inv(torch.eye(D2, dtype=torch.float64) + A.T @ torch.diag(b * gain) @ A)
    assert torch.allclose(posterior_cov_z2, torch.diag(posterior_cov_z2.diagonal()))  # diagonal by construction
    with torch.no_grad():
        # p(z1 | z2) = N(A z2, s1^2): [mu, raw sigma] = top_down(z2).
        top_down = model.top_down[0][-1]
        top_down.weight.zero_()
        top_down.weight[:D1] = A
        top_down.bias.zero_()
        top_down.bias[D1:] = inverse_softplus(torch.tensor(S1 - model.config.min_scale, dtype=torch.float64))
        decoder = model.decoder[-1]
        decoder.weight.copy_(B)
        decoder.bias.zero_()
        # d1 = U^T x, d2 = d1.
        guide.up[0][-1].weight.copy_(U.T)
        guide.up[0][-1].bias.zero_()
        guide.up[1][-1].weight.copy_(eye)
        guide.up[1][-1].bias.zero_()
        # Layer 1's estimate is the likelihood term: N(z1; (B^T B)^-1 B^T x, s0^2 (B^T B)^-1) = N(d1 / b, (s0 / b)^2).
        head1, head2 = guide.heads
        head1.weight.zero_()
        head1.weight[:D1] = torch.diag(1 / b)
        head1.bias.zero_()
        head1.bias[D1:] = inverse_softplus(S0 / b - guide.config.min_scale)
        # Layer 2's estimate is p(z2 | x) itself: mean Cov A^T B^T C^-1 x, variance diag(Cov).
        head2.weight.zero_()
        head2.weight[:D2] = posterior_cov_z2 @ A.T @ torch.diag(gain)
        head2.bias.zero_()
        head2.bias[D2:] = inverse_softplus(posterior_cov_z2.diagonal().sqrt() - guide.config.min_scale)


def linear_data(count: int = 40, seed: int = 0) -> torch.Tensor:
    A, B, _, _ = linear_problem()
    generator = torch.Generator().manual_seed(seed)
    z2 = torch.randn(count, D2, generator=generator, dtype=torch.float64)
    z1 = z2 @ A.T + S1 * torch.randn(count, D1, generator=generator, dtype=torch.float64)
    return z1 @ B.T + S0 * torch.randn(count, FEATURES, generator=generator, dtype=torch.float64)


def per_particle_log_weights(model, guide, x, particles: int) -> torch.Tensor:
    with torch.no_grad():
        model_trace, guide_trace = trace_pair(model, guide, {"x": x}, max_plate_nesting=1, particles=particles)
        return log_weights(model_trace, guide_trace, 1, True, scaled=False)  # (K, B)


# --- the exact posterior of the linear-Gaussian model -------------------------------------------


def test_ladder_guide_at_the_exact_posterior_has_elbo_equal_to_log_p_x():
    model, guide = linear_pair()
    set_exact_parameters(model, guide)
    x = linear_data()
    exact = marginal_log_likelihood(x)
    # q = p(z | x): every draw's log w = log p(x, z) - log q(z | x) is log p(x), so the ELBO is exact.
    weights = per_particle_log_weights(model, guide, x, particles=16)
    assert torch.allclose(weights, exact.expand_as(weights), atol=1e-9, rtol=0)
    torch.manual_seed(0)
    elbo = ELBO(particles=8)
    with torch.no_grad():
        _, metrics = elbo(model, guide, {"x": x})
    assert float(metrics["elbo"]) == pytest.approx(float(exact.mean()), abs=1e-9)
    estimate = importance_log_likelihood(model, guide, x, particles=5, batch_size=20)
    assert torch.allclose(estimate.double(), exact, atol=1e-9, rtol=0)


def test_importance_sampled_log_likelihood_matches_the_closed_form_marginal():
    """With the guide off the posterior (its estimates too wide), the ELBO falls short of log p(x)
    by about 0.48 nats while the importance-sampled estimate with K = 4000 recovers it."""
    model, guide = linear_pair()
    set_exact_parameters(model, guide)
    with torch.no_grad():
        for head in guide.heads:
            half = head.bias.shape[0] // 2
            head.bias[half:] += 0.3  # wider
    x = linear_data(count=20, seed=1)
    exact = marginal_log_likelihood(x)
    torch.manual_seed(0)
    weights = per_particle_log_weights(model, guide, x, particles=200)
    gap = float((exact - weights.mean(0)).mean())
    assert gap > 0.1  # the ELBO is a strict lower bound here
    torch.manual_seed(1)
    estimate = importance_log_likelihood(model, guide, x, particles=4000, batch_size=20).double()
    # The K = 4000 estimate's Monte Carlo sd is at most 0.015 nats per example here (measured from
    # the weights' variance with K = 20000), so about 0.003 for the mean over 20 examples.
    assert float((estimate - exact).abs().max()) < 0.06
    assert abs(float((estimate - exact).mean())) < 0.015


def test_wrong_merge_is_not_exact():
    """The check above would fail for a guide that, say, ignored the model's top-down term: cut it
    off (sigma_p -> infinity in the merge) and the ELBO falls below log p(x)."""
    model, guide = linear_pair()
    set_exact_parameters(model, guide)
    with torch.no_grad():
        guide.prior_min_scale = 1e6  # q(z1 | z2, x) = the bottom-up estimate alone
    x = linear_data()
    weights = per_particle_log_weights(model, guide, x, particles=64)
    assert float((marginal_log_likelihood(x) - weights.mean(0)).mean()) > 0.2  # measured 0.43


def test_fitted_ladder_guide_closes_the_gap():
    """From random initial networks, with the model fixed at the truth, the ladder guide's ELBO
    reaches log p(x): the family holds the posterior and training finds it."""
    x = linear_data(count=256, seed=2)
    exact = float(marginal_log_likelihood(x).mean())
    torch.manual_seed(0)
    model, guide = linear_pair()
    set_exact_parameters(model, guide)
    for network in (*guide.up, *guide.heads):
        network.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    model.requires_grad_(False)
    torch.manual_seed(1)
    start = exact - float(per_particle_log_weights(model, guide, x, particles=500).mean())
    optimizer = torch.optim.Adam([p for p in guide.parameters() if p.requires_grad], lr=0.02)
    objective = ELBO(particles=16)
    for _ in range(600):
        optimizer.zero_grad()
        loss, _ = objective(model, guide, {"x": x})
        loss.backward()
        optimizer.step()
    torch.manual_seed(1)
    gap = exact - float(per_particle_log_weights(model, guide, x, particles=500).mean())
    assert start > 1.0
    assert 0 <= gap < 0.03  # measured 0.019 (the 500-draw estimate's sd is about 0.003)


# --- pairs, shapes, a training step ------------------------------------------------------------


def digits_like_pair(guide_class):
    spec = DataSpec("binary", (20,), "binary")
    model = LadderVAE(LadderVAEConfig(latent_dims=[6, 3], hidden=[[16], [8]]), spec)
    guide = guide_class(guide_class.Config(), spec, model)
    return model, guide


@pytest.fixture
def binary_x():
    return torch.bernoulli(torch.full((24, 20), 0.3), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("guide_class", [LadderGuide, BottomUpGuide])
def test_site_consistency_and_shapes(guide_class, binary_x):
    model, guide = digits_like_pair(guide_class)
    check_pair(model, guide, {"x": binary_x})
    assert [site.name for site in model.latent_sites] == ["z2", "z1"]
    # Under IWAE's particle plate every layer carries (K, B, dim).
    model_trace, guide_trace = trace_pair(model, guide, {"x": binary_x}, max_plate_nesting=1, particles=5)
    assert guide_trace.nodes["z1"]["value"].shape == (5, 24, 6)
    assert guide_trace.nodes["z2"]["value"].shape == (5, 24, 3)
    assert model_trace.nodes["x"]["fn"].batch_shape == (5, 24)
    # Samples of x from the prior, and reconstructions, have the data's shape.
    prior_mean = observation_means(model, guide, {"x": binary_x}, from_prior=True)
    reconstruction = observation_means(model, guide, {"x": binary_x}, from_prior=False)
    assert prior_mean.shape == reconstruction.shape == binary_x.shape
    assert ((prior_mean > 0) & (prior_mean < 1)).all()


def test_batch_norm_pairs_run_under_particles_in_both_modes(binary_x):
    spec = DataSpec("b", (20,), "binary")
    model = LadderVAE(LadderVAEConfig(latent_dims=[6, 3], hidden=[[16], [8]], batch_norm=True), spec)
    guide = LadderGuide(LadderGuideConfig(batch_norm=True), spec, model)
    assert any(isinstance(layer, torch.nn.BatchNorm1d) for layer in model.decoder)
    check_pair(model, guide, {"x": binary_x})
    loss, _ = ELBO()(model, guide, {"x": binary_x})
    loss.backward()
    # In evaluation the running statistics are used, so particle dims fold into the batch safely.
    estimate = importance_log_likelihood(model, guide, binary_x, particles=7, batch_size=8)
    assert estimate.shape == (24,) and torch.isfinite(estimate).all()
    assert model.training and guide.training  # restored


def test_ladder_guide_shares_the_models_top_down_networks(binary_x):
    model = LadderVAE(LadderVAEConfig(latent_dims=[6, 3], hidden=[[16], [8]]), DataSpec("b", (20,), "binary"))
    guide = LadderGuide(LadderGuideConfig(), model.data, model)
    assert guide.top_down is model.top_down
    from pyrovae.train.loop import parameter_groups

    groups = parameter_groups(model, guide)
    owned = {id(p) for p in model.top_down.parameters()}
    assert owned <= {id(p) for p in groups["model"]} and not owned & {id(p) for p in groups["guide"]}
    # The merge uses them: the top-down network's gradient comes from the guide's z1 too.
    model.zero_grad()
    guide.zero_grad()
    loss, _ = ELBO()(model, guide, {"x": binary_x})
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.top_down.parameters())


@pytest.mark.parametrize("guide_class", [LadderGuide, BottomUpGuide])
def test_one_step_lowers_the_loss_on_a_fixed_batch(guide_class, binary_x):
    torch.manual_seed(0)
    model, guide = digits_like_pair(guide_class)
    objective = ELBO(particles=32)
    optimizer = torch.optim.Adam([*model.parameters(), *[p for p in guide.parameters() if all(p is not q for q in model.parameters())]], lr=1e-3)

    def loss_with_fixed_noise():
        torch.manual_seed(1)  # the same draws each time: the loss is a function of the parameters only
        return objective(model, guide, {"x": binary_x})[0]

    before = loss_with_fixed_noise()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_with_fixed_noise()
    assert float(after) < float(before.detach()) - 1e-3


def test_per_layer_beta_scales_each_layers_kl(binary_x):
    """[anneal.sites.z2] reaches the model's site by name: with beta_z2 = 0 the loss is the ELBO
    with the z2 terms (log p(z2) - log q(z2 | x)) left out."""
    torch.manual_seed(0)
    model, guide = digits_like_pair(LadderGuide)
    with torch.no_grad():
        torch.manual_seed(5)
        with kl_scale({"z2": 0.0}, default=1.0):
            loss, metrics = ELBO()(model, guide, {"x": binary_x})
        torch.manual_seed(5)
        model_trace, guide_trace = trace_pair(model, guide, {"x": binary_x}, max_plate_nesting=1)
    by_hand = (
        model_trace.nodes["x"]["log_prob"] + model_trace.nodes["z1"]["log_prob"] - guide_trace.nodes["z1"]["log_prob"]
    ).mean()
    assert float(loss) == pytest.approx(-float(by_hand), rel=1e-5)
    # The reported ELBO is unannealed.
    full = (by_hand + (model_trace.nodes["z2"]["log_prob"] - guide_trace.nodes["z2"]["log_prob"]).mean())
    assert float(metrics["elbo"]) == pytest.approx(float(full), rel=1e-5)


# --- active units ------------------------------------------------------------------------------


def test_active_units_count_the_dims_whose_posterior_mean_moves():
    """At the exact posterior of the linear model, E_q[z2 | x] = M x, so Cov_x of it is known
    exactly; a z2 dim whose mean head is cut off is inactive. E_q[z1 | x] (averaged over z2 draws)
    matches the closed-form posterior mean of p(z1 | x)."""
    model, guide = linear_pair()
    set_exact_parameters(model, guide)
    x = linear_data(count=400, seed=4)
    A, B, U, b = linear_problem()
    mean_head = guide.heads[1].weight[:D2].detach()
    expected_z2 = ((x @ U) @ mean_head.T).var(0, unbiased=False)
    torch.manual_seed(0)
    units = active_units(model, guide, {"x": x}, samples=200, batch_size=100)
    assert torch.allclose(units["z2"].variance, expected_z2, rtol=1e-6)
    # p(z1 | x): precision (A A^T + s1^2 I)^-1 + B^T B / s0^2, mean = cov B^T x / s0^2.
    prior_cov = A @ A.T + S1**2 * torch.eye(D1, dtype=torch.float64)
    cov = torch.linalg.inv(torch.linalg.inv(prior_cov) + B.T @ B / S0**2)
    expected_z1 = (x @ B @ cov / S0**2).var(0, unbiased=False)
    assert torch.allclose(units["z1"].variance, expected_z1, rtol=0.05)
    assert units["z2"].active == D2 and units["z2"].dims == D2
    with torch.no_grad():
        guide.heads[1].weight[1].zero_()  # z2's second dim: its mean no longer depends on x
    units = active_units(model, guide, {"x": x}, samples=20)
    assert units["z2"].active == D2 - 1 and float(units["z2"].variance[1]) == 0.0


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"latent_dims": [64]}, "at least 2 stochastic layers"),
        ({"latent_dims": [64, 0]}, "latent_dims"),
        ({"hidden": [[512]]}, "has 1 lists"),
        ({"hidden": [512, 256]}, "one list of hidden sizes"),
        ({"hidden": [[512], [0]]}, "hidden[1]"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"activation": "swish"}, "unknown activation"),
    ],
)
def test_model_config_bounds(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LadderVAEConfig(**options)


@pytest.mark.parametrize("config_class", [LadderGuideConfig, BottomUpGuideConfig])
def test_guide_config_bounds(config_class):
    with pytest.raises(ValueError, match="min_scale"):
        config_class(min_scale=0.0)
    with pytest.raises(ValueError, match="initial_scale"):
        config_class(initial_scale=1e-5)
    with pytest.raises(ValueError, match="unknown activation"):
        config_class(activation="swish")


def test_estimates_start_at_the_initial_scale(binary_x):
    model = LadderVAE(LadderVAEConfig(latent_dims=[6, 3], hidden=[[16], [8]]), DataSpec("b", (20,), "binary"))
    torch.manual_seed(0)
    guide = LadderGuide(LadderGuideConfig(initial_scale=0.1), model.data, model)
    with torch.no_grad():
        estimates = guide.upward(binary_x)
        usual = LadderGuide(LadderGuideConfig(initial_scale=None), model.data, model).upward(binary_x)
    for _, scale in estimates:
        assert 0.05 < float(scale.median()) < 0.2  # softplus(bias) + min_scale = 0.1, moved by the small weights
    assert all(0.3 < float(scale.median()) < 1.2 for _, scale in usual)


def test_guides_refuse_other_models_and_mismatched_layers():
    spec = DataSpec("b", (20,), "binary")
    vae = GaussianVAE(GaussianVAEConfig(latent_dim=2, hidden=[8]), spec)
    for guide_class in (LadderGuide, BottomUpGuide):
        with pytest.raises(ValueError, match="ladder_vae"):
            guide_class(guide_class.Config(), spec, vae)
    ladder = LadderVAE(LadderVAEConfig(latent_dims=[4, 2], hidden=[[8], [8]]), spec)
    with pytest.raises(ValueError, match="2 stochastic layers"):
        LadderGuide(LadderGuideConfig(hidden=[[8], [8], [8]]), spec, ladder)
    with pytest.raises(ValueError, match="2 stochastic layers"):
        LadderGuide(LadderGuideConfig(deterministic=[8]), spec, ladder)


# --- end to end through the CLI -----------------------------------------------------------------


@pytest.mark.parametrize("guide", ["ladder", "ladder_bottom_up"])
def test_trains_from_toml_with_per_layer_warm_up_then_evaluates_and_samples(tmp_path, capsys, guide):
    experiment = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": {"name": "ladder_vae", "latent_dims": [8, 4], "hidden": [[64], [32]]},
        "guide": {"name": guide},
        "objective": {"name": "elbo"},
        "anneal": {"name": "linear", "warmup_steps": 10, "sites": {"z2": {"name": "linear", "warmup_steps": 30}}},
        "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3},
        "evaluate": {"particles": 20, "test_examples": 100},
    }
    path = tmp_path / "ladder.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["beta"] == pytest.approx(min(1.0, record["step"] / 10))  # z1 takes the default
        assert record["beta/z2"] == pytest.approx(min(1.0, record["step"] / 30))
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    assert {"test_kl/z1", "test_kl/z2"} <= set(final)
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["test_log_likelihood"])
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 100
    # Active units per layer from the run folder.
    capsys.readouterr()
    assert main(["active-units", str(run), "--test-examples", "100", "--samples", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["sites"]) == {"z1", "z2"}
    assert report["sites"]["z1"]["dims"] == 8 and 0 <= report["sites"]["z1"]["active"] <= 8


def test_experiment_files_build(tmp_path):
    """The shipped TOML experiments resolve (on digits, so without the MNIST files)."""
    from pathlib import Path

    from pyrovae.config import load_toml

    root = Path(__file__).resolve().parents[1] / "experiments"
    for name, guide in (("ladder_mnist.toml", LadderGuide), ("ladder_mnist_bottom_up.toml", BottomUpGuide)):
        raw = load_toml(root / name)
        raw["data"] = {"name": "digits"}
        experiment = Experiment.from_config(raw)
        assert isinstance(experiment.model, LadderVAE) and isinstance(experiment.guide, guide)
        assert set(experiment.anneal_sites) == {"z2"}
    with pytest.raises(ConfigError, match="latent_dims"):
        Experiment.from_config({**load_toml(root / "ladder_mnist.toml"), "data": {"name": "digits"}, "model": {"name": "ladder_vae", "latent_dims": [8]}})
