"""The Gaussian-mixture VAE (models/gmvae.py, guides/gmvae.py) and the clustering accuracy of
pyrovae.analysis.classification."""

import json
import math
from pathlib import Path

import pyro.poutine as poutine
import pytest
import torch
from torch.nn import functional as F

from pyrovae.analysis.classification import clustering_accuracy, label_metrics
from pyrovae.cli import main
from pyrovae.config import load_experiment, resolve_config
from pyrovae.errors import UnsupportedPairError
from pyrovae.guides import GMVAEGuide, GMVAEGuideConfig, GMVAEMarginalGuide, GMVAEMarginalGuideConfig
from pyrovae.models import GMVAE, GMVAEConfig
from pyrovae.objectives import ELBO, EnumELBO
from pyrovae.pair import DataSpec, check_pair
from tests.conftest import train_with_the_cli

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FEATURES, CLUSTERS, LATENT = 6, 3, 2


def tiny_gmvae(marginal=False, learn_weights=True):
    spec = DataSpec("tiny", (FEATURES,), "binary")
    torch.manual_seed(0)
    model = GMVAE(GMVAEConfig(clusters=CLUSTERS, latent_dim=LATENT, hidden=[8], learn_weights=learn_weights), spec)
    with torch.no_grad():
        model.weight_logits.copy_(torch.tensor([0.5, -0.3, 0.1]))  # not uniform: log pi is exercised
    if marginal:
        guide = GMVAEMarginalGuide(GMVAEMarginalGuideConfig(hidden=[8]), spec, model)
    else:
        guide = GMVAEGuide(GMVAEGuideConfig(hidden=[8], classifier_hidden=[8]), spec, model)
    return model, guide


def binary_batch(rows=5):
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.bernoulli(torch.full((rows, FEATURES), 0.4), generator=generator)}


# --- clustering accuracy -----------------------------------------------------------------------


def test_clustering_accuracy_of_hand_built_assignments():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    permutation = torch.tensor([2, 3, 1, 0])  # cluster names are arbitrary
    assert clustering_accuracy(permutation[labels], labels) == 1.0
    # Best one-to-one map: 0 -> 1 (2 rows), 1 -> 0 (2), 2 -> 2 (1): 5 of 6.
    assert clustering_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 2]) == pytest.approx(5 / 6)
    # Two clusters cannot both map to label 0: one-to-one, not many-to-one.
    assert clustering_accuracy([0, 1, 0, 1], [0, 0, 0, 0]) == 0.5
    # More clusters than labels: the unmatched clusters' rows are errors.
    assert clustering_accuracy([0, 1, 2, 3], [0, 0, 1, 1]) == 0.5
    assert clustering_accuracy(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])) == 0.25
    with pytest.raises(ValueError, match="assignments"):
        clustering_accuracy([0, 1], [0, 1, 2])


def test_cluster_accuracy_hook_reads_a_cluster_method():
    class Clusters(torch.nn.Module):
        def cluster(self, x, **batch):
            return F.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[2.0], [2.0], [0.0], [1.0]])
    y = torch.tensor([0, 0, 1, 2])
    assert label_metrics(torch.nn.Module(), Clusters(), {"x": x, "y": y}, batch_size=3) == {"cluster_accuracy": 1.0}


# --- the pair --------------------------------------------------------------------------------


@pytest.mark.parametrize("marginal", [False, True], ids=["q(y|x)q(z|x,y)", "q(z|x)"])
def test_site_consistency_sampling_shapes_and_one_step(marginal):
    model, guide = tiny_gmvae(marginal)
    batch = binary_batch()
    check_pair(model, guide, batch)
    prior = poutine.trace(model).get_trace(**batch)
    assert prior.nodes["y"]["value"].shape == (5,)
    assert prior.nodes["z"]["value"].shape == (5, LATENT)
    assert prior.nodes["x"]["fn"].mean.shape == (5, FEATURES)
    objective = EnumELBO()
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-2)

    def loss():
        torch.manual_seed(3)
        return objective(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert float(loss().detach()) < float(before.detach()) - 1e-3


@pytest.mark.parametrize("marginal", [False, True], ids=["q(y|x)", "p(y|z)"])
def test_cluster_posterior_sums_to_one(marginal):
    model, guide = tiny_gmvae(marginal)
    probabilities = guide.cluster(**binary_batch())
    assert probabilities.shape == (5, CLUSTERS)
    assert bool((probabilities >= 0).all())
    assert torch.allclose(probabilities.sum(-1), torch.ones(5))
    z = torch.randn(4, 7, LATENT)  # any leading dims
    posterior = model.cluster_posterior(z)
    assert posterior.shape == (4, 7, CLUSTERS) and torch.allclose(posterior.sum(-1), torch.ones(4, 7))
    # Bayes' rule by hand at one z.
    locs, scales = model.component_locs.detach(), model.component_scales().detach()
    joint = model.log_weights().detach() + torch.distributions.Normal(locs, scales).log_prob(z[0, 0]).sum(-1)
    assert torch.allclose(posterior[0, 0], joint.softmax(-1), atol=1e-6)


def hand_bound(model, guide, x, draws=20000):
    """The GMVAE bound per row by Monte Carlo straight from the networks, with its standard error:
    guide-enumerated y:  sum_y q(y | x) [E_q(z|x,y)[log p(x | z) + log N(z; mu_y, sigma_y) - log q(z | x, y)] + log pi_y - log q(y | x)]
    model-enumerated y:  E_q(z|x)[log p(x | z) + log sum_y pi_y N(z; mu_y, sigma_y) - log q(z | x)]."""
    normal = torch.distributions.Normal
    log_pi = model.log_weights().detach()
    locs, scales = model.component_locs.detach(), model.component_scales().detach()

    def log_px(z):
        logits = model.decoder(z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

    with torch.no_grad():
        if isinstance(guide, GMVAEMarginalGuide):
            loc, scale = guide._posterior(x)
            q = normal(loc, scale)
            z = q.sample((draws,))  # (S, B, D)
            log_pz = torch.logsumexp(log_pi + normal(locs, scales).log_prob(z.unsqueeze(-2)).sum(-1), -1)
            terms = log_px(z) + log_pz - q.log_prob(z).sum(-1)
            return terms.mean(0), terms.std(0) / math.sqrt(draws)
        log_qy = guide.classifier(x).log_softmax(-1)  # (B, K)
        means, variances = [], []
        for k in range(CLUSTERS):
            onehot = F.one_hot(torch.full((x.shape[0],), k), CLUSTERS).float()
            loc, raw = guide.encoder(x, onehot).chunk(2, -1)
            q = normal(loc, F.softplus(raw) + guide.config.min_scale)
            z = q.sample((draws,))
            terms = log_px(z) + normal(locs[k], scales[k]).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
            weight = log_qy[:, k].exp()
            means.append(weight * (terms.mean(0) + log_pi[k] - log_qy[:, k]))
            variances.append((weight * terms.std(0)).pow(2) / draws)
        return sum(means), sum(variances).sqrt()


@pytest.mark.parametrize("marginal", [False, True], ids=["y in the guide", "y in the model"])
def test_enumerated_bound_equals_the_hand_written_sum(marginal):
    model, guide = tiny_gmvae(marginal)
    batch = binary_batch()
    torch.manual_seed(0)
    loss, metrics = EnumELBO(particles=4000)(model, guide, batch)
    loss = loss.detach()
    expected, se = hand_bound(model, guide, batch["x"])
    # The objective's own Monte Carlo error at 4000 particles is about that of 4000 hand draws.
    tolerance = 4 * math.sqrt(float(se.pow(2).sum()) * (1 + 20000 / 4000)) / 5
    assert abs(-float(loss) - float(expected.mean())) < tolerance, (-float(loss), float(expected.mean()), tolerance)
    assert float(metrics["elbo"]) == pytest.approx(-float(loss), abs=1e-4)
    # A bug the comparison would catch: the bound of the wrong cluster means is several tolerances off.
    with torch.no_grad():
        model.component_locs.copy_(model.component_locs.flip(0))
    shifted = -float(EnumELBO(particles=4000)(model, guide, batch)[0].detach())
    assert abs(shifted - float(expected.mean())) > tolerance


def test_the_objectives_that_cannot_sum_y_out_refuse_it():
    model, guide = tiny_gmvae(marginal=True)
    with pytest.raises(UnsupportedPairError, match="enum_elbo"):
        ELBO()(model, guide, binary_batch())


def test_config_bounds():
    with pytest.raises(ValueError, match="clusters"):
        GMVAEConfig(clusters=1)
    with pytest.raises(ValueError, match="init_spread"):
        GMVAEConfig(init_spread=0.0)
    with pytest.raises(ValueError, match="min_scale"):
        GMVAEGuideConfig(min_scale=-1.0)
    with pytest.raises(ValueError, match="GMVAE model"):
        from pyrovae.models import GaussianVAE, GaussianVAEConfig

        spec = DataSpec("tiny", (FEATURES,), "binary")
        GMVAEGuide(GMVAEGuideConfig(), spec, GaussianVAE(GaussianVAEConfig(latent_dim=2, hidden=[4]), spec))


# --- end to end ------------------------------------------------------------------------------


def test_gmvae_trains_from_toml_and_reports_cluster_accuracy(tmp_path, capsys):
    experiment = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": {"name": "gmvae", "clusters": 10, "latent_dim": 4, "hidden": [64]},
        "guide": {"name": "gmvae", "hidden": [64], "classifier_hidden": [64]},
        "objective": {"name": "enum_elbo"},
        "train": {"epochs": 5, "batch_size": 64, "lr": 3e-3},
        "evaluate": {"particles": 10, "test_examples": 100},
    }
    run, final, records = train_with_the_cli(tmp_path, experiment, capsys, "gmvae.toml")
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    # Chance with 10 balanced classes is about 0.1 (a little more after the best matching).
    assert 0.2 < final["test_cluster_accuracy"] <= 1.0
    assert all(0.0 <= r["valid/cluster_accuracy"] <= 1.0 for r in records)
    assert 0.0 <= final["test_kl/y"] <= math.log(10) + 1e-4
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["test_cluster_accuracy"] == pytest.approx(final["test_cluster_accuracy"])
    out = tmp_path / "samples.png"
    assert main(["sample", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 100


def test_the_experiment_file_resolves():
    config = resolve_config(load_experiment(EXPERIMENTS / "gmvae_mnist.toml"))
    assert config["model"]["name"] == "gmvae" and config["objective"]["name"] == "enum_elbo"
    assert Path(config["data"]["dir"]).is_absolute()


def test_the_analysis_kl_of_z_under_a_summed_out_mixture_prior_is_the_marginal_kl():
    """With y summed out in the model (guide q(z | x)), the prior of z is sum_y pi_y N(z | mu_y, sigma_y):
    analyze's KL of z is E_q[log q(z | x) - log p(z)], the objective's kl/z, as one number (per
    dimension, log q(z_d | x) - log p(z_d | y) at a drawn y is no KL and went negative)."""
    from pyrovae.analysis.latents import kl_per_dimension

    model, guide = tiny_gmvae(marginal=True)
    batch = binary_batch()
    kl = kl_per_dimension(model, guide, batch, num_samples=4000, seed=0)["z"]
    torch.manual_seed(1)
    _, metrics = EnumELBO(particles=4000)(model, guide, batch)
    assert kl.dims == () and kl.attrs["total"] > 0
    assert kl.attrs["total"] == pytest.approx(float(metrics["kl/z"]), abs=0.03)
