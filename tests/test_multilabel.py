"""Multi-label prediction: the metrics (pyrovae.analysis.multilabel) on hand-built cases, the
output-side VAE and the joint classify-and-generate model (models/multilabel.py,
guides/multilabel.py), and `pyrovae train` end to end on generated data and on Yeast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro import poutine
from sklearn.metrics import f1_score
from sklearn.metrics import hamming_loss as sklearn_hamming_loss

from pyrovae.analysis.multilabel import (
    MultilabelTally,
    hamming_loss,
    label_propensities,
    micro_f1,
    multilabel_metrics,
    pair_label_scores,
    pair_multilabel_metrics,
    precision_at_k,
    psp_at_k,
    tail_labels,
    tail_recall,
)
from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.data.multilabel import synthetic_xml
from pyrovae.errors import DataError
from pyrovae.guides import JointEncoder, JointEncoderConfig, OutputVAEEncoder, OutputVAEEncoderConfig
from pyrovae.models import JointClassifierVAE, JointClassifierVAEConfig, OutputVAE, OutputVAEConfig
from pyrovae.models.multilabel import PositiveWeightedBernoulli
from pyrovae.distributions import BernoulliLogits
from pyrovae.objectives import ELBO
from pyrovae.pair import DataSpec, check_pair
from pyrovae.schedules import Constant
from pyrovae.train import TrainConfig, fit, parameter_groups
from tests.conftest import SHARED_DATA

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
YEAST = SHARED_DATA / "yeast"

# --- metrics on hand-built cases -----------------------------------------------------------------

SCORES = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.1, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]])
LABELS = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
# Training labels: 10 rows holding label 0 eight times, label 1 once, label 2 three times, label 3 never.
TRAIN = torch.zeros(10, 4)
TRAIN[:8, 0] = 1
TRAIN[8, 1] = 1
TRAIN[:3, 2] = 1


def hand_propensity(count: float, rows: int = 10, a: float = 0.55, b: float = 1.5) -> float:
    c = (math.log(rows) - 1) * (b + 1) ** a
    return 1 / (1 + c * math.exp(-a * math.log(count + b)))


def test_precision_at_k_on_a_hand_built_case():
    # Row 0 ranks labels 0, 1, 3; row 1 ranks 2, 3, 0; row 2 (no labels) scores nothing.
    assert precision_at_k(SCORES, LABELS, 1) == pytest.approx(2 / 3)
    assert precision_at_k(SCORES, LABELS, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert precision_at_k(SCORES, LABELS, 4) == pytest.approx((2 / 4 + 1 / 4) / 3)
    with pytest.raises(ValueError, match="k = 5 is not allowed"):
        precision_at_k(SCORES, LABELS, 5)


def test_propensities_and_psp_at_k_on_a_hand_built_case():
    p = [hand_propensity(n) for n in (8, 1, 3, 0)]
    assert label_propensities(TRAIN).tolist() == pytest.approx(p)
    assert p[3] < p[1] < p[2] < p[0]  # rarer labels are less likely to be observed
    # PSP@1: row 0 hits label 0 (weight 1/p0), row 1 hits label 2 (1/p2), row 2 nothing.
    assert psp_at_k(SCORES, LABELS, p, 1, normalized=False) == pytest.approx((1 / p[0] + 1 / p[2]) / 3)
    # The best ranking puts row 0's rare label 3 first: normalized PSP@1 divides by that.
    assert psp_at_k(SCORES, LABELS, p, 1) == pytest.approx((1 / p[0] + 1 / p[2]) / (1 / p[3] + 1 / p[2]))
    # PSP@3: row 0 hits labels 0 and 3, row 1 label 2; the best reaches every true label.
    gained = 1 / p[0] + 1 / p[3] + 1 / p[2]
    assert psp_at_k(SCORES, LABELS, p, 3, normalized=False) == pytest.approx(gained / 9)
    assert psp_at_k(SCORES, LABELS, p, 3) == pytest.approx(1.0)
    # Equal propensities make PSP@k a multiple of P@k.
    assert psp_at_k(SCORES, LABELS, [0.5] * 4, 1, normalized=False) == pytest.approx(2 * precision_at_k(SCORES, LABELS, 1))


def test_hamming_loss_and_tail_recall_on_a_hand_built_case():
    predictions = (SCORES >= 0.5).float()  # [1 1 0 0], [0 0 1 1], [1 0 0 0]
    # Wrong entries: row 0 labels 1 and 3, row 1 label 3, row 2 label 0: 4 of 12.
    assert hamming_loss(predictions, LABELS) == pytest.approx(4 / 12)
    # The two rarest training labels are 3 (never) and 1 (once).
    assert tail_labels(TRAIN, fraction=0.5).tolist() == [1, 3]
    assert tail_labels(TRAIN, max_count=1).tolist() == [1, 3]
    # The only true tail entry (row 0, label 3) is missed; another prediction finds it.
    assert tail_recall(predictions, LABELS, [1, 3]) == 0.0
    found = predictions.clone()
    found[0, 3] = 1
    assert tail_recall(found, LABELS, [1, 3]) == 1.0
    assert math.isnan(tail_recall(found, LABELS, [1]))  # label 1 is never true in the test rows


def test_metrics_agree_with_scikit_learn_and_brute_force_on_random_rows():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 12, generator=generator)
    labels = (torch.rand(50, 12, generator=generator) < 0.25).float()
    predictions = (scores >= 0.5).float()
    assert hamming_loss(predictions, labels) == pytest.approx(sklearn_hamming_loss(labels.numpy(), predictions.numpy()))
    assert micro_f1(predictions, labels) == pytest.approx(f1_score(labels.numpy(), predictions.numpy(), average="micro"))
    for k in (1, 3, 5):
        brute = np.mean([sum(labels[n, l] for l in np.argsort(-scores[n].numpy(), kind="stable")[:k]) / k for n in range(50)])
        assert precision_at_k(scores, labels, k) == pytest.approx(float(brute))


def test_the_tally_over_batches_equals_the_whole_and_flags_an_all_zero_predictor():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 9, generator=generator)
    labels = (torch.rand(40, 9, generator=generator) < 0.3).float()
    train = (torch.rand(100, 9, generator=generator) < 0.3).float()
    whole = multilabel_metrics(scores, labels, train)
    tally = MultilabelTally(label_propensities(train), tail_labels(train))
    for lo in range(0, 40, 7):
        tally.add(scores[lo : lo + 7], labels[lo : lo + 7])
    assert tally.metrics() == pytest.approx(whole)
    assert whole["psp@3"] == pytest.approx(psp_at_k(scores, labels, label_propensities(train), 3))
    silent = multilabel_metrics(torch.full((40, 9), 0.01), labels, train)
    assert silent["predicted_labels_per_row"] == 0 and silent["tail_recall"] == 0 and silent["recall"] == 0
    assert silent["hamming_loss"] == pytest.approx(float(labels.mean()))


def test_pair_metrics_read_label_scores_from_the_guide_then_the_model():
    class Scorer(torch.nn.Module):
        def label_scores(self, x, **batch):
            return x  # the features are the scores

    data = {"x": SCORES, "y": LABELS}
    assert torch.equal(pair_label_scores(torch.nn.Module(), Scorer(), data, batch_size=2), SCORES)
    metrics = pair_multilabel_metrics(Scorer(), torch.nn.Module(), data, TRAIN, batch_size=2)
    assert metrics["precision@1"] == pytest.approx(2 / 3) and metrics["hamming_loss"] == pytest.approx(4 / 12)
    assert pair_multilabel_metrics(torch.nn.Module(), torch.nn.Module(), data, TRAIN) == {}
    assert pair_multilabel_metrics(Scorer(), Scorer(), {"x": SCORES, "y": torch.zeros(3, dtype=torch.long)}, TRAIN) == {}


# --- the models ----------------------------------------------------------------------------------

FEATURES, CLASSES = 10, 6
SPEC = DataSpec("tiny multi-label", (FEATURES,), "real", num_classes=CLASSES, label_format="multi_hot")


def label_batch(rows: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=generator)
    y = (torch.rand(rows, CLASSES, generator=generator) < 0.3).float()
    y[:, 0] = 1  # every row has a label
    return {"x": x, "y": y}


def output_pair(**options):
    torch.manual_seed(0)
    model = OutputVAE(OutputVAEConfig(latent_dim=3, hidden=[16], **options), SPEC)
    return model, OutputVAEEncoder(OutputVAEEncoderConfig(hidden=[16]), SPEC, model)


def joint_pair(**options):
    torch.manual_seed(0)
    config = JointClassifierVAEConfig(
        latent_dim=3, encoder_hidden=[16], representation_dim=8, classifier_hidden=[8], decoder_hidden=[16], **options
    )
    model = JointClassifierVAE(config, SPEC)
    return model, JointEncoder(JointEncoderConfig(), SPEC, model)


PAIRS = {
    "bernoulli": lambda: output_pair(),
    "multinomial": lambda: output_pair(likelihood="multinomial"),
    "weighted": lambda: output_pair(positive_weight=4.0),
    "joint": lambda: joint_pair(),
    "joint, true labels": lambda: joint_pair(decoder_labels="true"),
}


@pytest.mark.parametrize("name", PAIRS)
def test_sites_of_each_pair(name):
    model, guide = PAIRS[name]()
    batch = label_batch()
    check_pair(model, guide, batch)
    model_trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(**batch))).get_trace(**batch)
    observed = sorted(n for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"])
    assert observed == (["x", "y"] if name.startswith("joint") else ["y"])
    assert model_trace.nodes["z"]["fn"].event_shape == (3,)
    assert model_trace.nodes["y"]["fn"].event_shape == (CLASSES,) and model_trace.nodes["y"]["fn"].batch_shape == (16,)
    scores = pair_label_scores(model, guide, batch)
    assert scores.shape == (16, CLASSES) and bool(((scores >= 0) & (scores <= 1)).all())
    # The guide refers to the model's networks without holding them: one copy in the state dicts.
    assert not set(guide.state_dict()) & {f"model.{key}" for key in model.state_dict()}
    assert not any(key.startswith(("decoder.", "encoder.", "classifier.")) for key in guide.state_dict() if name.startswith("joint"))
    groups = parameter_groups(model, guide)
    assert {id(p) for p in groups["model"]}.isdisjoint({id(p) for p in groups["guide"]})


@pytest.mark.parametrize("name", PAIRS)
def test_one_step_lowers_the_loss_on_a_fixed_batch(name):
    model, guide = PAIRS[name]()
    batch = label_batch()
    groups = parameter_groups(model, guide)
    optimizer = torch.optim.Adam(groups["model"] + groups["guide"], lr=1e-2)

    def loss():
        torch.manual_seed(3)  # the same noise before and after the step
        return ELBO()(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert float(loss().detach()) < float(before.detach()) - 1e-3


def test_the_weighted_bernoulli_is_binary_cross_entropy_with_a_positive_weight():
    logits = torch.tensor([[1.5, -0.5, 0.2]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    sig = torch.sigmoid(logits)
    hand = (3 * y * sig.log() + (1 - y) * (1 - sig).log()).sum(-1)
    assert PositiveWeightedBernoulli(logits, 3.0).log_prob(y) == pytest.approx(hand.item(), rel=1e-6)
    assert PositiveWeightedBernoulli(logits, 1.0).log_prob(y) == pytest.approx(BernoulliLogits(logits).log_prob(y).item(), rel=1e-6)


def test_the_multinomial_output_vae_scores_labels_as_m_bar_draws():
    model, guide = output_pair(likelihood="multinomial")
    batch = label_batch()
    assert model.mean_labels == 1.0  # nothing seen yet
    ELBO()(model, guide, batch)[0].backward()  # a training call counts the labels
    assert model.mean_labels == pytest.approx(float(batch["y"].sum(1).mean()))
    with torch.no_grad():
        ELBO()(model, guide, label_batch(seed=5))  # evaluation (no gradients) counts nothing
    assert model.mean_labels == pytest.approx(float(batch["y"].sum(1).mean()))
    # log p(y | z) = log m! + sum_l y_l log pi_l for 0/1 rows.
    z = guide.posterior_mean(batch["x"])
    logits = model.decoder(z)
    pi = torch.softmax(logits, -1)
    m = batch["y"].sum(-1)
    hand = torch.lgamma(m + 1) + (batch["y"] * pi.log()).sum(-1)
    assert torch.allclose(model.label_distribution(logits).log_prob(batch["y"]), hand, atol=1e-5)
    expected = 1 - (1 - pi) ** model.mean_labels
    assert torch.allclose(guide.label_scores(batch["x"]), expected, atol=1e-6)


def test_the_joint_decoder_reads_y_hat_in_evaluation_and_the_true_y_only_when_asked():
    batch = label_batch()
    other = dict(batch, y=1 - batch["y"])

    def x_log_density(model, guide, batch) -> torch.Tensor:
        torch.manual_seed(0)
        guide_trace = poutine.trace(guide).get_trace(**batch)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        trace.compute_log_prob()
        return trace.nodes["x"]["log_prob"]

    for labels in ("predicted", "true"):
        model, guide = joint_pair(decoder_labels=labels)
        changed = not torch.allclose(x_log_density(model, guide, batch), x_log_density(model, guide, other))
        assert changed == (labels == "true")
        model.eval()
        assert torch.allclose(x_log_density(model, guide, batch), x_log_density(model, guide, other))
    generated = model.generate(batch["y"])
    assert generated.shape == (16, FEATURES)
    # Samples of requested labels (sample --label) go through generate(y): they differ with the label,
    # on the same prior draws, where the forward pass would decode its own y_hat of a placeholder x.
    from pyrovae.analysis.conditional import label_samples

    one_hot = torch.eye(CLASSES)[[0, 5]]
    torch.manual_seed(0)
    first = label_samples(model, one_hot[:1].expand(4, -1), FEATURES)
    torch.manual_seed(0)
    second = label_samples(model, one_hot[1:].expand(4, -1), FEATURES)
    assert first.shape == (4, FEATURES) and not torch.allclose(first, second)
    # The classification term is weighted by alpha.
    weighted, _ = joint_pair(classification_weight=2.0)
    plain, _ = joint_pair()
    with torch.no_grad():
        terms = [float(poutine.trace(m).get_trace(**batch).log_prob_sum(lambda name, site: name == "y")) for m in (weighted, plain)]
    assert terms[0] == pytest.approx(2 * terms[1], rel=1e-5)


def test_the_models_refuse_data_without_multi_hot_labels():
    with pytest.raises(ValueError, match="predicts multi-hot labels; data set 'tiny' has no labels"):
        OutputVAE(OutputVAEConfig(), DataSpec("tiny", (4,), "real"))
    with pytest.raises(ValueError, match="'integer' labels"):
        JointClassifierVAE(JointClassifierVAEConfig(), DataSpec("tiny", (4,), "real", num_classes=3))
    with pytest.raises(ValueError, match="positive_weight reweights the Bernoulli"):
        OutputVAEConfig(likelihood="multinomial", positive_weight=2.0)
    model, _ = output_pair()
    with pytest.raises(DataError, match="needs multi-hot labels: batch\\['y'\\]"):
        model.check_batch({"x": torch.zeros(2, FEATURES)})
    with pytest.raises(ValueError, match="output_vae_encoder predicts labels through an output_vae model"):
        OutputVAEEncoder(OutputVAEEncoderConfig(), SPEC, joint_pair()[0])


@pytest.mark.parametrize("likelihood", ["bernoulli", "multinomial"])
def test_the_output_vae_learns_labels_from_generated_features(likelihood):
    data = synthetic_xml(examples=1500, features=400, labels=30, label_words=8, seed=0)
    torch.manual_seed(0)
    model = OutputVAE(OutputVAEConfig(latent_dim=16, hidden=[64], likelihood=likelihood), data.spec)
    guide = OutputVAEEncoder(OutputVAEEncoderConfig(hidden=[64]), data.spec, model)
    fit(model, guide, ELBO(), data, TrainConfig(epochs=15, batch_size=64, lr=3e-3, device="cpu"), anneal=Constant(0.05), progress=False)
    metrics = pair_multilabel_metrics(model, guide, data.rows("test", 0, data.size("test")), data.csr("train", "y"))
    # Ranking every test row by the training frequencies gives P@1 0.63 here; seed 0 reached 0.82
    # (Bernoulli) and 0.96 (multinomial).
    assert metrics["precision@1"] > 0.75, metrics


# --- end to end ----------------------------------------------------------------------------------


def test_pyrovae_train_on_generated_data_then_the_multilabel_evaluation(tmp_path, capsys):
    experiment = {
        "seed": 0,
        "data": {"name": "synthetic_xml", "examples": 600, "features": 300, "labels": 25},
        "model": {"name": "output_vae", "latent_dim": 8, "hidden": [32], "likelihood": "multinomial"},
        "guide": {"name": "output_vae_encoder", "hidden": [32]},
        "anneal": {"name": "capped_linear", "anneal_steps": 100, "cap": 0.2},
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3},
        "evaluate": {"particles": 5, "test_examples": 50},
    }
    path = tmp_path / "generated.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads((run / "final.json").read_text())
    assert math.isfinite(final["test_elbo"]) and final["test_log_likelihood"] >= final["test_elbo"] - 1.0
    capsys.readouterr()
    out = tmp_path / "metrics.jsonl"
    assert main(["multilabel", str(run), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"precision@1", "psp@5", "hamming_loss", "tail_recall"} <= set(record)
    assert 0 <= record["precision@5"] <= 1 and record["split"] == "test"
    # The output VAE models y: it has no sample of a requested label to give.
    assert main(["sample", str(run), "--label", "0"]) == 2
    assert "OutputVAE does not generate from a label y" in capsys.readouterr().err


@pytest.mark.skipif(not (YEAST / "yeast.csv.gz").exists(), reason=f"no Yeast at {YEAST}")
def test_pyrovae_train_on_a_yeast_experiment(tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["--set", "train.epochs=1", "--set", "evaluate.particles=5", "--set", "evaluate.test_examples=100"]
    assert main(["train", str(EXPERIMENTS / "yeast_joint.toml"), "--out", str(run), "--no-progress", *arguments]) == 0, capsys.readouterr().err
    final = json.loads((run / "final.json").read_text())
    assert final["epochs"] == 1 and math.isfinite(final["test_elbo"])
    capsys.readouterr()
    assert main(["multilabel", str(run)]) == 0
    record = json.loads(capsys.readouterr().out)
    # Even one epoch ranks a true label first for most genes (Yeast's most frequent label alone: 0.75).
    assert record["precision@1"] > 0.6 and record["true_labels_per_row"] == pytest.approx(4.28, abs=0.01)
