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


# --- the Mult-VAE and Mult-DAE pairs ----------------------------------------------------------------

import json  # noqa: E402

from pyrovae.analysis.ranking import RankingMetrics  # noqa: E402
from pyrovae.cli import main  # noqa: E402
from pyrovae.config import dump_toml  # noqa: E402
from pyrovae.guides.cvae import NoLatentsConfig, NoLatentsGuide  # noqa: E402
from pyrovae.guides.multvae import MultVAEEncoder, MultVAEEncoderConfig  # noqa: E402
from pyrovae.handlers import kl_scale  # noqa: E402
from pyrovae.models.multvae import MultDAE, MultDAEConfig, MultVAE, MultVAEConfig  # noqa: E402
from pyrovae.objectives import build_objective  # noqa: E402
from pyrovae.pair import check_pair  # noqa: E402
from pyrovae.traces import latent_sites, observed_sites  # noqa: E402
from pyro import poutine  # noqa: E402

ITEMS = 20
SPEC = DataSpec("clicks", (ITEMS,), "binary")


def _clicks(rows=32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((rows, ITEMS), 0.25), generator=generator)
    x[:, 0] = 1.0
    return x


def _vae(dropout=0.5):
    model = MultVAE(MultVAEConfig(latent_dim=4, hidden=[16]), SPEC)
    return model, MultVAEEncoder(MultVAEEncoderConfig(hidden=[16], dropout=dropout), SPEC, model)


def _loss_at(objective, model, guide, batch, seed):
    torch.manual_seed(seed)  # the same dropout masks and draws of z before and after the step
    with kl_scale(0.2):
        return objective(model, guide, batch)[0]


def test_mult_vae_sites_and_the_encoder_input():
    torch.manual_seed(0)
    model, guide = _vae()
    batch = {"x": _clicks()}
    check_pair(model, guide, batch)
    guide_trace = poutine.trace(guide).get_trace(**batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    assert [name for name, _ in latent_sites(guide_trace)] == ["z"] and guide_trace.nodes["z"]["fn"].event_shape == (4,)
    (name, site), = observed_sites(model_trace)
    assert name == "x" and site["fn"].event_shape == (ITEMS,) and torch.equal(site["fn"].total_count, batch["x"].sum(-1))
    assert model_trace.nodes["z"]["fn"].batch_shape == (32,)
    # q reads x / ||x||: in evaluation (no dropout) a user's doubled counts give the same q.
    guide.eval()
    loc = lambda x: poutine.trace(guide).get_trace(x=x).nodes["z"]["fn"].loc  # noqa: E731
    assert torch.allclose(loc(batch["x"]), loc(2 * batch["x"]), atol=1e-6)
    # In training, dropout on the input makes two passes differ.
    guide.train()
    assert not torch.allclose(loc(batch["x"]), loc(batch["x"]))


def test_mult_vae_one_step_lowers_its_annealed_loss():
    torch.manual_seed(0)
    model, guide = _vae()
    batch = {"x": _clicks()}
    objective = build_objective("meanfield_elbo")
    optimizer = torch.optim.SGD(list(model.parameters()) + list(guide.parameters()), lr=0.05)
    before = _loss_at(objective, model, guide, batch, seed=1)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = _loss_at(objective, model, guide, batch, seed=1)
    assert float(after) < float(before.detach()) - 1e-3


def test_mult_dae_has_no_latents_and_its_bound_is_the_reconstruction():
    torch.manual_seed(0)
    model = MultDAE(MultDAEConfig(hidden=[16, 4, 16]), SPEC)
    guide = NoLatentsGuide(NoLatentsConfig(), SPEC, model)
    batch = {"x": _clicks()}
    check_pair(model, guide, batch)
    objective = RankingMetrics(objective="elbo")
    loss, metrics = objective(model, guide, batch)
    assert not any(key.startswith("kl/") for key in metrics) and float(metrics["elbo"]) == float(metrics["reconstruction"])
    model.eval()
    with torch.no_grad():
        logits = model.network(torch.nn.functional.normalize(batch["x"], dim=-1))
        expected = MultinomialLogits(logits).log_prob(batch["x"]).mean()
        assert float(objective(model, guide, batch)[0]) == pytest.approx(-float(expected), rel=1e-6)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    before = objective(model, guide, batch)[0]
    before.backward()
    optimizer.step()
    torch.manual_seed(1)
    with torch.no_grad():
        assert float(objective(model, guide, batch)[0]) < float(before.detach()) - 1e-3


@pytest.mark.parametrize("pair", ["vae", "dae"])
def test_pyrovae_train_on_a_small_u_data_ranks_far_better_than_chance(tmp_path, capsys, pair):
    from tests.test_sparse_data import _write_ratings

    _write_ratings(tmp_path / "u.data", users=120, items=30)
    parts = {
        "vae": {"model": {"name": "mult_vae", "latent_dim": 8, "hidden": [32]}, "guide": {"name": "mult_vae_encoder", "hidden": [32]},
                "objective": {"name": "pyrovae.analysis.ranking:RankingMetrics", "objective": "meanfield_elbo", "recall_at": [5, 10]},
                "anneal": {"name": "capped_linear", "anneal_steps": 200, "cap": 0.2}},
        "dae": {"model": {"name": "mult_dae", "hidden": [32, 8, 32]}, "guide": {"name": "no_latents"},
                "objective": {"name": "pyrovae.analysis.ranking:RankingMetrics", "objective": "elbo", "recall_at": [5, 10]}},
    }[pair]
    experiment = {
        "seed": 0,
        "data": {"name": "movielens", "dir": str(tmp_path), "valid_users": 20, "test_users": 20},
        **parts,
        "train": {"epochs": 15, "batch_size": 20, "lr": 3e-3},
        "evaluate": {"particles": 5, "batch_size": 20},
    }
    path = tmp_path / "mult.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Validation NDCG every epoch; best.pt is the epoch of the best one.
    scores = [record["valid/ndcg@100"] for record in records]
    assert len(scores) == 15 and final["best_epoch"] == 1 + scores.index(max(scores))
    # Three taste groups of 10 items; a user likes about 9 of their group's and holds out 1 or 2 of them.
    # On these test users a random ranking of the ~22 unseen items scores NDCG@100 0.42 and Recall@5
    # 0.37 (popularity 0.38 and 0.35); a ranking that knows the group puts the held-out items among the
    # group's 2-4 unseen items at its top (Recall@5 = 1). Both models train to NDCG@100 about 0.8.
    assert final["test_recall@5"] > 0.8 and final["test_ndcg@100"] > 0.6
    assert 0.0 <= final["test_recall@10"] <= 1.0 and final["test_log_likelihood"] < 0
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["test_ndcg@100"] == pytest.approx(final["test_ndcg@100"])
