"""NDCG@k and the normalised Recall@k on held-out items, the ranking objective, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import torch

from pyrovae import DataSpec
from pyrovae.analysis.ranking import RankingMetrics, evaluate_ranking, posterior_mean_scores, ranking_metrics
from pyrovae.baselines import EASE, Popularity, tune_ease
from pyrovae.data.sparse import SparseSplits
from pyrovae.guides.cvae import NoLatentsConfig, NoLatentsGuide
from pyrovae.guides.multvae import MultVAEEncoder, MultVAEEncoderConfig
from pyrovae.models.multvae import MultDAE, MultDAEConfig, MultVAE, MultVAEConfig

LOG2_3, LOG2_6 = math.log2(3), math.log2(6)


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_ndcg_and_recall_equal_hand_computed_values():
    # Six items scored in decreasing order. User 0 has seen item 0 and holds out items 2 and 5, so its
    # ranking of unseen items is 1, 2, 3, 4, 5: hits at ranks 2 and 5.
    scores = _rows([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 2, 3, 4, 5, 6])
    seen = _rows([1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1])
    heldout = _rows([0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0])
    metrics = ranking_metrics(scores, heldout, seen, ndcg_at=(3, 5), recall_at=(1, 3, 5))
    idcg_two = 1 + 1 / LOG2_3  # two held-out items, k >= 2
    assert float(metrics["ndcg@3"][0]) == pytest.approx((1 / LOG2_3) / idcg_two, abs=1e-6)  # 0.3869
    assert float(metrics["ndcg@5"][0]) == pytest.approx((1 / LOG2_3 + 1 / LOG2_6) / idcg_two, abs=1e-6)  # 0.6241
    assert float(metrics["recall@1"][0]) == 0.0
    assert float(metrics["recall@3"][0]) == pytest.approx(0.5)  # 1 of min(3, 2)
    assert float(metrics["recall@5"][0]) == pytest.approx(1.0)
    # User 1 ranks its three held-out items first: a perfect ranking scores 1 at every cut-off,
    # and Recall@1 is normalised by min(1, 3) = 1, not by 3.
    for key in ("ndcg@3", "ndcg@5", "recall@1", "recall@3", "recall@5"):
        assert float(metrics[key][1]) == pytest.approx(1.0), key
    # User 2 has nothing held out: no value, so it cannot pass for a ranked user.
    assert all(math.isnan(float(metrics[key][2])) for key in metrics)


def test_seen_items_are_excluded_from_the_ranking():
    scores = _rows([5.0, 4.0, 3.0, 2.0])
    heldout = _rows([0, 0, 1, 0])
    # Without excluding the seen items 0 and 1, the held-out item would rank third.
    assert float(ranking_metrics(scores, heldout, None, (1,), (1,))["recall@1"][0]) == 0.0
    excluded = ranking_metrics(scores, heldout, _rows([1, 1, 0, 0]), (1,), (1,))
    assert float(excluded["recall@1"][0]) == 1.0 and float(excluded["ndcg@1"][0]) == 1.0
    # A cut-off beyond the number of items is the whole list.
    assert float(ranking_metrics(scores, heldout, _rows([1, 1, 0, 0]), (100,), (50,))["ndcg@100"][0]) == pytest.approx(1.0)


def _splits(seed=0, users=60, items=12):
    rng = np.random.default_rng(seed)
    x = (rng.random((users, items)) < 0.3).astype(np.float32)
    x[:, 0] = 1.0
    heldout = ((rng.random((users, items)) < 0.2) & (x == 0)).astype(np.float32)
    for row in np.flatnonzero(heldout.sum(1) == 0):  # every held-out user holds out an item
        heldout[row, np.flatnonzero(x[row] == 0)[0]] = 1.0
    csr = scipy.sparse.csr_matrix
    spec = DataSpec("toy", (items,), "binary")
    return SparseSplits(
        spec,
        {"x": csr(x[:40]), "heldout": csr(np.zeros((40, items), np.float32))},
        {"x": csr(x[40:50]), "heldout": csr(heldout[40:50])},
        {"x": csr(x[50:]), "heldout": csr(heldout[50:])},
    ), x, heldout


def test_evaluate_ranking_is_the_mean_over_rows_whatever_the_batch_size():
    data, x, heldout = _splits()
    scores_of = lambda batch: batch["x"] @ torch.ones(12, 12) + torch.arange(12.0)  # noqa: E731
    whole = ranking_metrics(scores_of({"x": torch.from_numpy(x[50:])}), torch.from_numpy(heldout[50:]), torch.from_numpy(x[50:]))
    for batch_size in (3, 10):
        result = evaluate_ranking(scores_of, data, "test", batch_size)
        assert result.keys() == whole.keys()
        for key, value in whole.items():
            assert result[key] == pytest.approx(float(value.mean()), abs=1e-6), (key, batch_size)


def test_ease_equals_the_constrained_ridge_regression_it_solves():
    rng = np.random.default_rng(1)
    train = (rng.random((30, 6)) < 0.4).astype(np.float64)
    l2 = 3.0
    weights = EASE(scipy.sparse.csr_matrix(train), l2).weights.numpy()
    assert np.allclose(np.diag(weights), 0.0)
    # Column j of B is the ridge regression of item j on the other items (B_jj = 0 is the constraint).
    for j in range(6):
        others = [i for i in range(6) if i != j]
        design = train[:, others]
        coefficients = np.linalg.solve(design.T @ design + l2 * np.eye(5), design.T @ train[:, j])
        assert np.allclose(weights[others, j], coefficients, atol=1e-10), j
    scores = EASE(scipy.sparse.csr_matrix(train), l2).scores({"x": torch.from_numpy(train[:4]).float()})
    assert torch.allclose(scores, torch.from_numpy(train[:4] @ weights), atol=1e-10)


def test_popularity_ranks_by_training_counts_and_tuning_picks_the_best_validation_lambda():
    data, _, _ = _splits()
    popularity = Popularity(data.csr("train"))
    assert torch.equal(popularity.counts, torch.from_numpy(data.csr("train").toarray().sum(0)).double())
    batch = next(data.batches("valid", 4))
    assert torch.equal(popularity.scores(batch)[2], popularity.counts.float())
    best, records = tune_ease(data, [0.5, 5.0, 50.0])
    assert [r["l2"] for r in records] == [0.5, 5.0, 50.0]
    assert best.l2 == max(records, key=lambda r: r["ndcg@100"])["l2"]


def _vae_pair(items=12):
    spec = DataSpec("toy", (items,), "binary")
    model = MultVAE(MultVAEConfig(latent_dim=3, hidden=[8]), spec)
    guide = MultVAEEncoder(MultVAEEncoderConfig(hidden=[8]), spec, model)
    return model, guide


def test_the_ranking_objective_adds_metrics_in_evaluation_only_and_selects_by_ndcg():
    torch.manual_seed(0)
    model, guide = _vae_pair()
    data, _, _ = _splits()
    batch = next(data.batches("valid", 10))
    objective = RankingMetrics(objective="meanfield_elbo", ndcg_at=[100], recall_at=[20, 50])
    assert objective.selection_metric == "ndcg@100"
    _, training = objective(model, guide, batch)
    assert "ndcg@100" not in training and "elbo" in training  # training steps rank nothing
    model.eval(), guide.eval()
    loss, metrics = objective(model, guide, batch)
    assert {"elbo", "kl/z", "ndcg@100", "recall@20", "recall@50"} <= set(metrics)
    # The scores are the decoder's logits at z = mu of q(z | x), without dropout.
    with torch.no_grad():
        mu = guide.encoder(torch.nn.functional.normalize(batch["x"], dim=-1)).chunk(2, -1)[0]
        by_hand = torch.log_softmax(model.decoder(mu), -1)
    assert torch.allclose(posterior_mean_scores(model, guide, batch), by_hand, atol=1e-6)
    expected = ranking_metrics(by_hand, batch["heldout"], batch["x"])
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(float(value.mean()), abs=1e-6)


def test_posterior_mean_scores_of_a_model_without_latents_are_its_network_output():
    spec = DataSpec("toy", (12,), "binary")
    torch.manual_seed(0)
    model = MultDAE(MultDAEConfig(hidden=[8, 3, 8]), spec).eval()
    guide = NoLatentsGuide(NoLatentsConfig(), spec, model)
    data, _, _ = _splits()
    batch = next(data.batches("test", 10))
    with torch.no_grad():
        expected = torch.log_softmax(model.network(torch.nn.functional.normalize(batch["x"], dim=-1)), -1)
    assert torch.allclose(posterior_mean_scores(model, guide, batch), expected, atol=1e-6)
