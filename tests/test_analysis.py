"""Posterior analysis: InferenceData export, PSIS diagnostics of the guide, latent summaries and
``pyrovae analyze``, checked against closed forms (probabilistic PCA, a two-component mixture)."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.analysis import (
    draw_posterior,
    importance_log_likelihood,
    kl_per_dimension,
    mutual_information,
    psis_diagnostics,
    to_inference_data,
    write_analysis,
)
from pyrovae.analysis.arviz_compat import from_netcdf, group, group_names, to_netcdf
from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.distributions import DiagonalNormal
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.pair import DataSpec
from tests import families
from tests.conftest import tiny_pair

warnings.filterwarnings("ignore", category=FutureWarning)
az = pytest.importorskip("arviz")
REPO = Path(__file__).resolve().parents[1]


# --- probabilistic PCA: z ~ N(0, I_3), x ~ N(W z + b, s^2 I_5), exact posterior and marginal --------


SIGMA = 0.5
SCALES = torch.tensor([2.0, 0.7, 0.02])  # the columns' lengths; the last latent barely matters


class PPCA:
    """GaussianVAE with a linear decoder and a fixed observation scale *is* probabilistic PCA (as
    in tests/test_likelihood.py). W = Q diag(SCALES) with orthonormal Q, so the exact posterior is
    diagonal: q(z | x) = N(C W^T (x - b) / s^2, C), C = diag(c_d), c_d = 1 / (1 + SCALES_d^2 / s^2)."""

    def __init__(self):
        torch.manual_seed(0)
        spec = DataSpec("ppca", (5,), "real")
        self.model = GaussianVAE(GaussianVAEConfig(latent_dim=3, hidden=[], likelihood="gaussian", observation_scale=SIGMA), spec)
        q, _ = torch.linalg.qr(torch.randn(5, 3))
        self.weight = q * SCALES
        self.bias = torch.randn(5) * 0.3
        with torch.no_grad():
            self.model.decoder[0].weight.copy_(self.weight)
            self.model.decoder[0].bias.copy_(self.bias)
        self.c = 1.0 / (1.0 + SCALES**2 / SIGMA**2)
        self.marginal = dist.MultivariateNormal(self.bias, self.weight @ self.weight.T + SIGMA**2 * torch.eye(5))
        self.x = self.marginal.sample((300,))
        self.guide = ExactGuide(self)

    def posterior_mean(self, x):
        return (x - self.bias) @ self.weight * self.c / SIGMA**2


class ExactGuide(torch.nn.Module):
    """The exact posterior of :class:`PPCA`, its scale multiplied by ``scale_factor`` (1: exact)."""

    def __init__(self, ppca):
        super().__init__()
        self.ppca = ppca

    def forward(self, x, scale_factor=1.0, **_):
        ppca = self.ppca
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", DiagonalNormal(ppca.posterior_mean(x), (ppca.c.sqrt() * scale_factor).expand(x.shape[0], 3)))


@pytest.fixture(scope="module")
def ppca():
    return PPCA()


def psis_of(ppca, scale_factor, samples=400, points=200):
    idata = to_inference_data(ppca.model, ppca.guide, {"x": ppca.x[:points]}, samples, inputs={"scale_factor": scale_factor}, seed=0)
    return psis_diagnostics(idata), ppca.marginal.log_prob(ppca.x[:points]).double().numpy()


def test_exact_guide_has_small_k_hat_and_both_estimates_match_the_closed_form(ppca):
    psis, exact = psis_of(ppca, 1.0)
    assert float(np.mean(psis["pareto_k"].values < 0.5)) >= 0.95
    assert np.abs(psis["is_log_likelihood"].values - exact).max() < 1e-3
    assert np.abs(psis["psis_log_likelihood"].values - exact).max() < 1e-3


def test_wider_guide_is_reliable_and_matches_the_closed_form(ppca):
    """A guide a = 1.5 times too wide has bounded weights: k-hat < 0.5, and both estimates are
    close. Per dimension E_q[w^2] / p(x)^2 = a^2 / sqrt(2 a^2 - 1), so the estimate's standard
    error is sqrt((that^3 - 1) / S) (0.04 nats here)."""
    samples, points, a = 400, 200, 1.5
    psis, exact = psis_of(ppca, a, samples, points)
    k = psis["pareto_k"].values
    assert np.isfinite(k).all() and float(np.mean(k < 0.5)) >= 0.95
    standard_error = math.sqrt(((a**2 / math.sqrt(2 * a**2 - 1)) ** 3 - 1) / samples)
    for name in ("is_log_likelihood", "psis_log_likelihood"):
        error = psis[name].values - exact
        assert abs(error.mean()) < 4 * standard_error / math.sqrt(points), name
        assert np.abs(error).max() < 4.5 * standard_error, name


def test_a_guide_far_too_narrow_is_flagged(ppca):
    """With a tenth of the posterior's scale the weights are heavy-tailed: k-hat > 0.7 for most
    points, and the plain importance-sampled log p(x) falls far below the truth."""
    psis, exact = psis_of(ppca, 0.1)
    assert psis.attrs["share_above_threshold"] > 0.8
    assert float(np.mean(psis["is_log_likelihood"].values - exact)) < -1.0
    assert psis.attrs["share_above_threshold"] == pytest.approx(float(np.mean(psis["pareto_k"].values > 0.7)))


def test_kl_per_dimension_and_mutual_information_match_the_closed_form(ppca):
    """For the exact posterior, KL(q(z_d | x_n) || N(0, 1)) = (-log c_d - 1 + c_d + mu_d(x_n)^2) / 2,
    and with x ~ p(x) the aggregate posterior is the prior, so I(x; z) = -sum_d log(c_d) / 2."""
    x = ppca.x
    kl = kl_per_dimension(ppca.model, ppca.guide, {"x": x}, 200, seed=0)["z"]
    mu = ppca.posterior_mean(x).double()
    c = ppca.c.double()
    expected = (0.5 * (-c.log() - 1 + c + mu.pow(2))).mean(0)
    assert kl.dims == ("z_dim",)
    assert np.abs(kl.values - expected.numpy()).max() < 0.02
    assert kl.attrs["total"] == pytest.approx(float(expected.sum()), abs=0.03)
    information = mutual_information(ppca.model, ppca.guide, {"x": x}, seed=0)
    exact = float(-0.5 * c.log().sum())
    # He et al.'s estimator: one draw per point and a 300-point mixture for q(z); its error here is ~0.1.
    assert information == pytest.approx(exact, abs=0.2)
    assert 0 < information < math.log(x.shape[0])


def test_posterior_means_are_the_guides_means_within_monte_carlo_error():
    model, guide = tiny_pair(features=12, latent_dim=3)
    x = torch.bernoulli(torch.full((40, 12), 0.4), generator=torch.Generator().manual_seed(1))
    samples = 500
    idata = to_inference_data(model, guide, {"x": x}, samples, seed=0)
    with torch.no_grad():
        q = pyro.poutine.trace(guide).get_trace(x=x).nodes["z"]["fn"]
    means = group(idata, "guide_draws")["z"].mean(("chain", "draw")).values
    error = np.abs(means - q.mean.numpy()) / (q.stddev.numpy() / math.sqrt(samples))
    assert error.max() < 4.5  # 120 comparisons of means with their standard errors
    spread = group(idata, "guide_draws")["z"].std(("chain", "draw")).values
    assert np.abs(spread / q.stddev.numpy() - 1).max() < 0.2


# --- structure ---------------------------------------------------------------------------------------


def test_structure_dims_coords_and_netcdf_round_trip(tmp_path):
    spec = DataSpec("d", (64,), "binary", num_classes=10)
    model = families.ConditionalVAE(families.ConditionalConfig(latent_dim=4), spec)
    guide = families.ConditionalGuide(families.GuideConfig(), spec, model)
    generator = torch.Generator().manual_seed(0)
    data = {"x": torch.bernoulli(torch.full((30, 64), 0.3), generator=generator), "y": torch.randint(0, 10, (30,), generator=generator)}
    idata = to_inference_data(
        model, guide, data, 40, seed=3, obs_index=np.arange(100, 130), attrs={"objective": "elbo", "run_dir": "/runs/cvae"}, batch_size=16
    )
    assert set(group_names(idata)) == {
        "posterior", "guide_draws", "guide_log_likelihood", "sample_stats", "observed_data", "constant_data", "posterior_predictive", "prior_predictive"
    }
    z = group(idata, "posterior")["z"]
    assert z.dims == ("chain", "draw", "obs", "z_dim") and z.shape == (1, 40, 30, 4) and z.dtype == np.float32
    assert list(z.coords["obs"].values) == list(range(100, 130))
    assert (z.coords["label"].values == data["y"].numpy()).all()
    guide_draws = group(idata, "guide_draws")
    assert guide_draws["z"].shape == (1, 40, 30, 4) and guide_draws["log_weight"].shape == (1, 40, 30)
    assert group(idata, "guide_log_likelihood")["x"].dims == ("chain", "draw", "obs")
    assert group(idata, "sample_stats")["importance_ess"].dims == ("obs",)
    observed = group(idata, "observed_data")["x"]
    assert observed.dims == ("obs", "x_dim") and (observed.values == data["x"].numpy()).all()
    assert (group(idata, "constant_data")["y"].values == data["y"].numpy()).all()
    assert group(idata, "posterior").attrs["model"] == "ConditionalVAE" and group(idata, "posterior").attrs["objective"] == "elbo"
    # log w = log p(x | z) + log p(z | y) - log q(z | x, y): the log-likelihood is part of it
    assert np.isfinite(guide_draws["log_weight"].values).all()
    # every resampled draw is one of the point's guide draws
    raw, resampled = guide_draws["z"].values[0], z.values[0]
    for n in (0, 17):
        assert all(any(np.array_equal(row, candidate) for candidate in raw[:, n]) for row in resampled[:5, n])
    path = tmp_path / "posterior.nc"
    to_netcdf(idata, path)
    back = from_netcdf(path)
    for name in group_names(idata):
        assert group(back, name).equals(group(idata, name)), name
    assert group(back, "posterior").attrs["run_dir"] == "/runs/cvae" and group(back, "posterior").attrs["num_samples"] == 40


FAMILY_DATA = DataSpec("d", (64,), "binary", num_classes=10, image_shape=(8, 8))


def family_batch(count=12):
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.bernoulli(torch.full((count, 64), 0.3), generator=generator),
        "y": torch.randint(0, 10, (count,), generator=generator),
        "y_mask": torch.zeros(count, dtype=torch.bool),
    }


FAMILIES = {
    "cvae": (families.ConditionalVAE, families.ConditionalGuide, families.ConditionalConfig(), {}),
    "m2": (families.M2, families.M2Guide, families.ConditionalConfig(), {}),
    "gumbel": (families.GumbelSoftmaxVAE, families.GumbelSoftmaxGuide, families.DiscreteConfig(), {"temperature": 0.7}),
    "categorical": (families.CategoricalVAE, families.CategoricalGuide, families.DiscreteConfig(), {}),
    "two_layer": (families.TwoLayerVAE, families.TwoLayerGuide, families.TwoLayerConfig(), {}),
}


@pytest.mark.parametrize("family", list(FAMILIES) + ["gru_sequence"])
def test_every_family_exports_its_latents_and_the_importance_log_likelihood(family):
    if family == "gru_sequence":
        data = families.toy_sequences()
        spec, batch = data.spec, {key: value[:12] for key, value in data.test.items()}
        model = families.GRUSequenceVAE(families.SequenceConfig(), spec)
        guide = families.GRUSequenceGuide(families.GuideConfig(), spec, model)
        inputs = {}
    else:
        model_class, guide_class, config, inputs = FAMILIES[family]
        spec, batch = FAMILY_DATA, family_batch()
        model = model_class(config, spec)
        guide = guide_class(families.GuideConfig(), spec, model)
    idata = to_inference_data(model, guide, batch, 30, inputs=inputs, seed=0, batch_size=5)
    for site in model.latent_sites:
        values = group(idata, "guide_draws")[site.name]
        assert values.shape[:3] == (1, 30, 12) and values.shape[3:] == tuple(site.event_shape), site.name
    log_weight = group(idata, "guide_draws")["log_weight"].values[0]
    assert np.isfinite(log_weight).all()
    estimate = torch.logsumexp(torch.as_tensor(log_weight), 0) - math.log(30)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = importance_log_likelihood(model, guide, batch, particles=30, inputs=inputs, batch_size=5)
    if family == "m2":
        # the labels' draws take random numbers too: other draws of the same estimator
        assert torch.allclose(estimate.float(), reference, atol=2.0)
        assert set(np.unique(group(idata, "guide_draws")["y_unobserved"].values)) <= set(range(10))
        assert group(idata, "guide_draws").attrs["enumerated_sites"] == "y_unobserved"
    else:  # the same draws: the same numbers
        assert torch.allclose(estimate.float(), reference, atol=1e-4)


# --- enumerated sites: drawn from their exact conditional posterior ---------------------------------

X = torch.tensor([-0.4, 1.3, 1.6, 3.1])
SHIFT = 3.0
PRIOR_Y = torch.tensor([0.35, 0.65])


def mixture_model(x, **_):
    """y ~ Cat(PRIOR_Y), z ~ N(0, 1), x ~ N(z + SHIFT y, 1)."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PRIOR_Y), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + SHIFT * y, 1.0), obs=x)


def exact_posterior_y(x):
    """p(y | x) proportional to p(y) N(x; SHIFT y, sqrt 2)."""
    terms = PRIOR_Y.log().unsqueeze(-1) + dist.Normal(SHIFT * torch.arange(2.0).unsqueeze(-1), math.sqrt(2.0)).log_prob(x)
    return torch.softmax(terms, 0)  # (2, N)


def guide_enumerating_y(x, **_):
    """y enumerated in the guide (with a poor q(y | x)), q(z | x, y) = p(z | x, y) = N((x - SHIFT y) / 2, sqrt(1/2))."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.8, 0.2])), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Normal((x - SHIFT * y) / 2, math.sqrt(0.5)))


def guide_for_z_only(x, **_):
    """y left to the model's enumeration; q(z | x) = N(x / 2, 1)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 1.0))


def binomial_bound(p, n, sigmas=4.5):
    return sigmas * torch.sqrt(p * (1 - p) / n) + 1e-3


def test_a_guide_enumerated_site_is_drawn_from_its_exact_posterior():
    """With the exact q(z | x, y) every weight sum_y p(x, z_y, y) / q(z_y | x, y) is p(x), so the
    drawn y must follow p(y | x) exactly, whatever q(y | x) says, and z given y its posterior."""
    samples = 6000
    idata = to_inference_data(mixture_model, guide_enumerating_y, {"x": X}, samples, seed=0)
    y = torch.as_tensor(group(idata, "guide_draws")["y"].values[0])  # (S, N)
    frequency = (y == 1).double().mean(0)
    exact = exact_posterior_y(X)[1].double()
    assert ((frequency - exact).abs() <= binomial_bound(exact, samples)).all(), (frequency, exact)
    z = torch.as_tensor(group(idata, "guide_draws")["z"].values[0]).double()
    for value in (0, 1):
        chosen = y == value
        mean = (z * chosen).sum(0) / chosen.sum(0).clamp(min=1)
        expected = (X.double() - SHIFT * value) / 2
        count = chosen.sum(0)
        ok = (count < 50) | ((mean - expected).abs() < 4.5 * math.sqrt(0.5) / count.clamp(min=1).sqrt())
        assert ok.all(), (value, mean, expected)
    psis = psis_diagnostics(idata)
    assert (psis["pareto_k"].values == -np.inf).all()  # every weight is p(x): nothing to fit


def test_a_model_enumerated_site_is_drawn_from_its_conditional_posterior_given_z():
    """Given the guide's z_s, y_s ~ p(y | x, z_s), proportional to p(y) N(x; z_s + SHIFT y, 1): the
    frequencies of the draws match the average of those exact probabilities over the draws, and
    reweighted with the PSIS weights they match p(y | x)."""
    samples = 6000
    idata = to_inference_data(mixture_model, guide_for_z_only, {"x": X}, samples, seed=1)
    y = torch.as_tensor(group(idata, "guide_draws")["y"].values[0])
    z = torch.as_tensor(group(idata, "guide_draws")["z"].values[0]).double()
    terms = PRIOR_Y.double().log()[:, None, None] + dist.Normal(z + SHIFT * torch.arange(2.0).double()[:, None, None], 1.0).log_prob(X.double())
    conditional = torch.softmax(terms, 0)[1]  # p(y = 1 | x, z_s), (S, N)
    expected = conditional.mean(0)
    frequency = (y == 1).double().mean(0)
    assert ((frequency - expected).abs() <= binomial_bound(expected, samples)).all(), (frequency, expected)
    weights = torch.as_tensor(np.exp(psis_diagnostics(idata)["psis_log_weight"].values[:, 0, :]))  # (N, S)
    weighted = (weights * (y == 1).double().T).sum(1)
    assert torch.allclose(weighted, exact_posterior_y(X)[1].double(), atol=0.03)


def test_masked_rows_of_an_enumerated_label_are_marked_hidden():
    """Labelled rows (y_mask) of M2 do not use the latent label y_unobserved: its draws are -1 there."""
    model = families.M2(families.ConditionalConfig(), FAMILY_DATA)
    guide = families.M2Guide(families.GuideConfig(), FAMILY_DATA, model)
    batch = family_batch(6)
    batch["y_mask"] = torch.tensor([True, False, True, False, False, False])
    draws = draw_posterior(model, guide, batch, 20, seed=0)
    labels = draws.values["y_unobserved"]
    assert (labels[:, batch["y_mask"]] == -1).all()
    assert ((labels[:, ~batch["y_mask"]] >= 0) & (labels[:, ~batch["y_mask"]] < 10)).all()
    assert torch.equal(draws.hidden["y_unobserved"], batch["y_mask"])


# --- write_analysis and pyrovae analyze ----------------------------------------------------------


def assert_pngs_decode(folder: Path, names):
    import matplotlib.image

    for name in names:
        image = matplotlib.image.imread(folder / name)
        assert image.size > 0 and image.shape[0] > 20 and image.shape[1] > 20, name
        assert float(np.std(image)) > 0, f"{name} is blank"


def test_write_analysis_on_data_that_are_not_images_recovers_the_active_units(ppca, tmp_path):
    """PPCA on 5 real features: rows instead of image grids, and the closed-form activity
    Cov_x(E[z_d | x]) = Var_n(mu_d(x_n)): two of the three latents are active."""
    analysis = write_analysis(ppca.model, ppca.guide, {"x": ppca.x[:150]}, tmp_path, samples=200, points=[0, 4], seed=0)
    numbers = json.loads((tmp_path / "analysis.json").read_text())
    expected = ppca.posterior_mean(ppca.x[:150]).double().var(0, unbiased=False)
    assert np.allclose(numbers["activity"]["z"], expected.numpy(), atol=1e-4)
    assert numbers["active_units"] == 2 and numbers["latent_dims"] == 3
    assert numbers["share_pareto_k_above_0.7"] == 0.0
    exact = float(ppca.marginal.log_prob(ppca.x[:150]).mean())
    assert numbers["is_log_likelihood"] == pytest.approx(exact, abs=1e-3)
    assert_pngs_decode(tmp_path, ["samples.png", "traversals.png", "latent_scatter.png", "kl_per_dimension.png", "pareto_k.png", "forest.png", "posterior.png"])
    assert "curves" not in analysis.files  # no training history given


def test_write_analysis_on_variable_length_token_rows(tmp_path):
    """The GRU sequence pair (masks, lengths, categorical tokens): every plot is drawn, rows are cut
    to their lengths, and the draws honour the mask."""
    data = families.toy_sequences()
    model = families.GRUSequenceVAE(families.SequenceConfig(), data.spec)
    guide = families.GRUSequenceGuide(families.GuideConfig(), data.spec, model)
    test = {key: value[:24] for key, value in data.test.items()}
    analysis = write_analysis(model, guide, test, tmp_path, samples=30, seed=0)
    assert {"samples", "traversals", "latent_scatter", "forest", "posterior_plot", "pareto_k"} <= set(analysis.files)
    assert_pngs_decode(tmp_path, ["samples.png", "traversals.png"])
    idata = from_netcdf(tmp_path / "posterior.nc")
    assert {"mask", "lengths"} <= set(group(idata, "constant_data").data_vars)
    reference = importance_log_likelihood(model, guide, test, particles=2000, batch_size=24)
    assert analysis.numbers["is_log_likelihood"] == pytest.approx(float(reference.mean()), abs=0.5)


def remedy_tables(remedies) -> list[dict]:
    import tomllib

    return [tomllib.loads(remedy.toml) for remedy in remedies if remedy.toml]


def test_remedies_fit_the_run_they_are_written_for():
    """Text-only remedies only for a pair that reads ``word_keep`` and a model whose config takes
    the dilated-CNN decoder; free bits around the run's own objective; the run's step count."""
    from pyrovae.analysis.collapse import remedies_for
    from pyrovae.models.sentence import SentenceVAE, SentenceVAEConfig

    history = [{"epoch": e, "step": 22 * e, "beta": 1.0} for e in range(1, 11)]
    model, guide = tiny_pair()
    image = remedy_tables(remedies_for(model, guide, "elbo", history))
    assert [sorted(table) for table in image] == [["objective"], ["anneal"], ["train"]]
    assert image[0]["objective"]["objective"] == "elbo" and image[1]["anneal"]["total_steps"] == 220
    words = DataSpec("words", (11,), "categorical", num_categories=30)
    sentence = SentenceVAE(SentenceVAEConfig(latent_dim=2, embedding_dim=8, hidden=8), words)
    text = remedy_tables(remedies_for(sentence, None, "meanfield_elbo", history + [{"schedule/word_keep": 0.75}], sentence_length=11.0))
    assert {"name": "constant", "value": 0.45} in [table.get("schedules", {}).get("word_keep") for table in text]
    assert {"decoder": "dilated_cnn", "dilations": [1, 2]} in [table.get("model") for table in text]  # 1 + 2 x 3 = 7 < 11 words
    assert text[0]["objective"]["objective"] == "meanfield_elbo"
    # the config refuses the dilated CNN without z at every step; a dilated CNN as short already has nothing to shed
    for config in (SentenceVAEConfig(latent_dim=2, z_every_step=False), SentenceVAEConfig(latent_dim=2, decoder="dilated_cnn", dilations=[1, 2])):
        assert "model" not in {key for table in remedy_tables(remedies_for(SentenceVAE(config, words), None, "elbo", history, 11.0)) for key in table}
    # free bits already on: no TOML to paste for them; enum_elbo: free bits cannot wrap it; iwae: said to be replaced
    assert not any("objective" in table for table in remedy_tables(remedies_for(model, guide, "free_bits", history)))
    assert not any("objective" in table for table in remedy_tables(remedies_for(model, guide, "enum_elbo", history)))
    (iwae, *_) = remedies_for(model, guide, "iwae", history)
    assert "instead of the run's `iwae`" in iwae.about and 'objective = "elbo"' in iwae.toml
    # no records: the schedule says how to count the steps instead of inventing a number
    (cyclical,) = [remedy for remedy in remedies_for(model, guide, "elbo", None) if "cyclical" in remedy.about]
    assert "total_steps" not in remedy_tables([cyclical])[0]["anneal"] and "epochs x steps per epoch" in cyclical.about


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quickstart") / "run"
    code = main(
        ["train", str(REPO / "experiments/quickstart.toml"), "--out", str(run), "--set", "train.epochs=2", "--set", "evaluate.particles=20", "--no-progress"]
    )
    assert code == 0
    return run


ANALYSIS_PNGS = ["curves.png", "samples.png", "traversals.png", "latent_scatter.png", "kl_per_dimension.png", "pareto_k.png", "forest.png", "posterior.png"]


def test_pyrovae_analyze_on_the_quickstart_run_writes_every_file(quickstart_run, capsys):
    capsys.readouterr()
    assert main(["analyze", str(quickstart_run), "--samples", "60", "--test-examples", "80", "--points", "3", "7", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    folder = quickstart_run / "analysis"
    assert out == str(folder / "report.md")
    for name in ["posterior.nc", "report.md", "analysis.json", "diagnostics.csv", *ANALYSIS_PNGS]:
        assert (folder / name).stat().st_size > 0, name
    assert_pngs_decode(folder, ANALYSIS_PNGS)
    report = (folder / "report.md").read_text()
    for name in ANALYSIS_PNGS:
        assert f"]({name})" in report, name
    assert "Pareto k-hat > 0.7" in report and "z[3, 0]" in report and "z[7, 0]" in report
    idata = from_netcdf(folder / "posterior.nc")
    posterior = group(idata, "posterior")
    assert posterior["z"].shape == (1, 60, 80, 8) and group(idata, "guide_draws")["z"].shape == (1, 60, 80, 8)
    assert posterior.attrs["objective"] == "elbo" and posterior.attrs["checkpoint"] == "best"
    assert posterior.attrs["run_dir"] == str(quickstart_run.resolve())
    numbers = json.loads((folder / "analysis.json").read_text())
    final = json.loads((quickstart_run / "final.json").read_text())
    # 60 samples against final.json's 20 on all 359 test points: the same quantity, other draws
    assert numbers["is_log_likelihood"] == pytest.approx(final["test_log_likelihood"], abs=1.5)
    assert numbers["run_metrics"]["test_elbo"] == final["test_elbo"]
    assert len((folder / "diagnostics.csv").read_text().splitlines()) == 81


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
        (["--samples", "10"], "--samples 10: PSIS needs at least 25"),
        (["--points", "0", "80"], "--points 80: the analysed test set has 80 examples"),
        (["--set", "model.latent_dim=3"], "--set model.latent_dim would change the trained run"),
    ],
)
def test_bad_arguments_give_one_line_errors(quickstart_run, capsys, arguments, message):
    capsys.readouterr()
    parsed = True
    try:
        code = main(["analyze", str(quickstart_run), "--test-examples", "80", "--no-progress", *arguments])
    except SystemExit as exit:  # argparse's own errors, after its usage lines
        code, parsed = exit.code, False
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith(f"pyrovae analyze: error: {message}"), lines
    assert len(lines) == 1 or not parsed


def train_family(tmp_path: Path, model: str, guide: str, data: dict, **tables) -> Path:
    experiment = {
        "seed": 0,
        "data": data,
        "model": {"name": f"tests.families:{model}"},
        "guide": {"name": f"tests.families:{guide}"},
        **tables,
        "train": {"epochs": 1, "batch_size": 128, "lr": 3e-3},
        "evaluate": {"particles": 5, "test_examples": 60},
    }
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.parametrize(
    "model, guide, data, tables",
    [
        ("ConditionalVAE", "ConditionalGuide", {"name": "digits"}, {}),
        ("M2", "M2Guide", {"name": "digits", "labels_per_class": 20}, {"objective": {"name": "enum_elbo"}}),
    ],
    ids=["cvae", "m2"],
)
def test_pyrovae_analyze_on_family_runs(tmp_path, capsys, model, guide, data, tables):
    run = train_family(tmp_path, model, guide, data, **tables)
    capsys.readouterr()
    assert main(["analyze", str(run), "--samples", "40", "--points", "0", "1", "--no-progress"]) == 0
    folder = run / "analysis"
    assert capsys.readouterr().out.strip() == str(folder / "report.md")
    assert_pngs_decode(folder, ANALYSIS_PNGS)
    idata = from_netcdf(folder / "posterior.nc")
    assert (group(idata, "constant_data")["y"].values == group(idata, "posterior").coords["label"].values).all()
    report = (folder / "report.md").read_text()
    if model == "M2":
        assert set(np.unique(group(idata, "guide_draws")["y_unobserved"].values)) <= set(range(10))
        assert "Posterior of the enumerated site `y_unobserved`" in report
        assert {"y", "y_mask"} <= set(group(idata, "constant_data").data_vars)
