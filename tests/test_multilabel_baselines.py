"""The multi-label baselines are tuned on validation rows by a named criterion, checked against a
brute-force refit and count for every C."""

import numpy as np
import pytest
import torch

from pyrovae.baselines.multilabel import label_frequencies, one_vs_rest, tune_one_vs_rest
from pyrovae.errors import ConfigError


def _data(rows, generator):
    x = generator.normal(size=(rows, 6))
    weights = np.array([[2.0, 0, 0, 0, 0, 0], [0, -2.0, 1.0, 0, 0, 0], [0, 0, 0, 0.5, 0, 0]]).T
    y = (x @ weights + generator.normal(scale=1.5, size=(rows, 3)) > 0.3).astype(int)
    return x, y


def test_c_is_chosen_by_the_named_validation_criterion():
    generator = np.random.default_rng(0)
    (x_train, y_train), (x_valid, y_valid) = _data(80, generator), _data(200, generator)
    cs = [1e-3, 1e-2, 1.0, 100.0]
    by_hand = {}
    for c in cs:  # brute force: refit and count the wrong (row, label) entries at p >= 0.5
        predicted = one_vs_rest(x_train, y_train, c).predict_proba(x_valid) >= 0.5
        by_hand[c] = float((predicted != y_valid.astype(bool)).mean())
    classifier, chosen, records = tune_one_vs_rest(x_train, y_train, x_valid, y_valid, cs)
    assert [record["hamming_loss"] for record in records] == pytest.approx([by_hand[c] for c in cs])
    assert chosen == min(cs, key=lambda c: (by_hand[c], cs.index(c)))
    assert np.allclose(classifier.predict_proba(x_valid), one_vs_rest(x_train, y_train, chosen).predict_proba(x_valid))
    _, by_f1, records = tune_one_vs_rest(x_train, y_train, x_valid, y_valid, cs, criterion="micro_f1")
    assert by_f1 == cs[int(np.argmax([record["micro_f1"] for record in records]))]
    with pytest.raises(ConfigError, match="criterion 'accuracy'"):
        tune_one_vs_rest(x_train, y_train, x_valid, y_valid, cs, criterion="accuracy")


def test_label_frequencies_score_every_row_alike():
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    scores = label_frequencies(labels, 3)
    assert scores.shape == (3, 3) and torch.equal(scores[2], torch.tensor([1.0, 0.25, 0.25], dtype=torch.float64))
