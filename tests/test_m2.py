"""Semi-supervised M2 (models/m2.py, guides/m2.py), its batching (pyrovae.data.semisupervised), the
split-input MLP, and the classification-accuracy hook of the test metrics."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pyrovae.cli import main
from pyrovae.config import dump_toml, load_experiment, resolve_config
from pyrovae.data.semisupervised import LabelledEveryBatch, digits as semisupervised_digits
from pyrovae.errors import DataError
from pyrovae.guides import M2Guide, M2GuideConfig
from pyrovae.models import M2, M2Config
from pyrovae.nn import MLP
from pyrovae.nn.split_input import SplitInputMLP
from pyrovae.objectives import ELBO, EnumELBO
from pyrovae.pair import DataSpec, check_pair

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CLASSES, FEATURES = 3, 6


def tiny_m2(alpha=0.0, enumerate=True, latent_dim=2, hidden=(8,)):
    spec = DataSpec("tiny", (FEATURES,), "binary", num_classes=CLASSES)
    torch.manual_seed(0)
    model = M2(M2Config(latent_dim=latent_dim, hidden=list(hidden), classifier_hidden=list(hidden), alpha=alpha), spec)
    guide = M2Guide(M2GuideConfig(hidden=list(hidden), enumerate=enumerate), spec, model)
    return model, guide


def mixed_batch(rows=6, labelled=(1, 4)):
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((rows, FEATURES), 0.4), generator=generator)
    y_true = torch.randint(0, CLASSES, (rows,), generator=generator)
    y_mask = torch.zeros(rows, dtype=torch.bool)
    y_mask[list(labelled)] = True
    return {"x": x, "y": torch.where(y_mask, y_true, torch.zeros_like(y_true)), "y_mask": y_mask}


def classifier_grad(model, guide, objective, batch):
    """-d loss / d (classifier's last bias): the gradient the objective gives q(y | x)."""
    model.zero_grad(set_to_none=True)
    guide.zero_grad(set_to_none=True)
    loss, metrics = objective(model, guide, batch)
    loss.backward()
    return -model.classifier[-1].bias.grad.clone(), float(metrics["elbo"])


# --- the pair --------------------------------------------------------------------------------


def test_site_consistency_and_sampling_shapes():
    model, guide = tiny_m2()
    batch = mixed_batch()
    check_pair(model, guide, batch)  # raises on a mismatch
    import pyro.poutine as poutine

    prior = poutine.trace(model).get_trace(**batch)
    assert prior.nodes["x"]["fn"].mean.shape == (6, FEATURES)
    assert prior.nodes["z"]["value"].shape == (6, 2)
    labels = prior.nodes["y"]["value"]
    assert labels.shape == (6,) and torch.equal(labels[batch["y_mask"]], batch["y"][batch["y_mask"]])
    posterior = poutine.trace(guide).get_trace(**batch)
    assert posterior.nodes["z"]["value"].shape == (6, 2)
    assert posterior.nodes["y_unobserved"]["infer"] == {"enumerate": "parallel"}
    # Under enumeration (and particles) the label takes every class on a dim left of the plates.
    objective = EnumELBO(particles=3)
    loss, metrics = objective(model, guide, batch)
    assert loss.shape == () and math.isfinite(float(loss.detach()))
    assert {"elbo", "reconstruction", "kl/y_unobserved", "kl/z"} <= set(metrics)
    assert 0.0 <= float(metrics["kl/y_unobserved"]) <= math.log(CLASSES) + 1e-5


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    model, guide = tiny_m2(alpha=1.0)
    batch = mixed_batch()
    objective = EnumELBO()
    parameters = {id(p): p for part in (model, guide) for p in part.parameters()}  # the classifier is shared
    optimizer = torch.optim.Adam(list(parameters.values()), lr=1e-2)

    def loss():
        torch.manual_seed(3)  # the same noise before and after the step
        return objective(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert float(loss().detach()) < float(before.detach()) - 1e-3


def test_config_bounds():
    with pytest.raises(ValueError, match="alpha"):
        M2Config(alpha=-1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        M2Config(latent_dim=0)
    with pytest.raises(ValueError, match="min_scale"):
        M2GuideConfig(min_scale=0.0)
    with pytest.raises(ValueError, match="class labels"):
        M2(M2Config(), DataSpec("unlabelled", (FEATURES,), "binary"))
    with pytest.raises(ValueError, match="classifier_channels"):
        M2Config(classifier_channels=[16, 0])
    with pytest.raises(ValueError, match="image_shape"):
        M2(M2Config(classifier_channels=[4]), DataSpec("flat", (FEATURES,), "binary", num_classes=CLASSES))
    with pytest.raises(ValueError, match="smaller than the image"):
        M2(M2Config(classifier_shift=3), DataSpec("small", (FEATURES,), "binary", image_shape=(2, 3), num_classes=CLASSES))


def test_the_convolutional_classifier_sees_the_image():
    """classifier_channels makes q(y | x) a ConvNet on the image: each stride-2 convolution halves
    H and W (rounding up), leading dims are folded and unfolded, and the pair still checks and
    trains on an enumerated batch."""
    from pyrovae.nn.conv import ConvNet

    net = ConvNet((7, 5), [3, 4], [6], 2)  # 7x5 -> 4x3 -> 2x2
    assert net[-3].in_features == 4 * 2 * 2
    assert net(torch.rand(2, 3, 35)).shape == (2, 3, 2)
    torch.manual_seed(0)
    flat = torch.rand(4, 35)
    assert torch.allclose(net(flat.expand(3, 4, 35))[1], net(flat), atol=1e-6)
    # the convolution reads the pixels in place: shifting one pixel changes only nearby features
    first = torch.nn.Sequential(*list(net)[:2])
    image = torch.zeros(1, 35)
    moved = image.clone()
    moved[0, 0] = 1.0  # top-left pixel
    change = (first(moved) - first(image)).abs().sum(1)[0]  # (H', W')
    assert change[0, 0] > 0 and change[-1, -1] == 0
    with pytest.raises(ValueError, match="odd"):
        ConvNet((8, 8), [4], [], 2, kernel_size=4)

    spec = DataSpec("tiny_images", (36,), "binary", image_shape=(6, 6), num_classes=CLASSES)
    model = M2(M2Config(latent_dim=2, hidden=[8], classifier_hidden=[8], classifier_channels=[4], alpha=1.0), spec)
    guide = M2Guide(M2GuideConfig(hidden=[8]), spec, model)
    assert isinstance(model.classifier, ConvNet) and guide.classifier is model.classifier
    batch = {"x": torch.bernoulli(torch.full((5, 36), 0.3)), "y": torch.tensor([0, 1, 2, 0, 1]),
             "y_mask": torch.tensor([True, False, False, True, False])}
    check_pair(model, guide, batch)
    parameters = {id(p): p for part in (model, guide) for p in part.parameters()}
    optimizer = torch.optim.Adam(list(parameters.values()), lr=1e-2)
    torch.manual_seed(3)
    before, _ = EnumELBO()(model, guide, batch)
    optimizer.zero_grad()
    before.backward()
    assert model.classifier[1].weight.grad.abs().sum() > 0  # the convolution learns
    optimizer.step()
    torch.manual_seed(3)
    assert float(EnumELBO()(model, guide, batch)[0]) < float(before) - 1e-3


def test_random_shift_moves_whole_images_within_the_bounds():
    from pyrovae.nn.augment import random_shift

    torch.manual_seed(0)
    image = torch.zeros(6, 7)
    image[2:4, 3] = torch.tensor([1.0, 2.0])  # a mark well inside the image
    rows = image.reshape(1, -1).expand(400, -1)
    shifted = random_shift(rows, (6, 7), 2).reshape(400, 6, 7)
    assert random_shift(rows, (6, 7), 0) is rows
    # each row holds the same mark, moved: same values, same relative positions
    offsets = set()
    for moved in shifted:
        where = (moved == 1.0).nonzero()
        assert len(where) == 1 and moved.sum() == 3.0
        (i, j), = where.tolist()
        assert moved[i + 1, j] == 2.0
        offsets.add((i - 2, j - 3))
    # every offset in {-2..2}^2 is drawn, none beyond
    assert offsets == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}
    # channels-first images move all channels together
    two = torch.stack([image, 10 * image]).reshape(1, -1).expand(5, -1)
    moved = random_shift(two, (2, 6, 7), 1).reshape(5, 2, 6, 7)
    assert torch.equal(moved[:, 1], 10 * moved[:, 0])


# --- the objective -----------------------------------------------------------------------------


def test_enumerated_objective_equals_sampled_labels_in_expectation():
    """enum_elbo sums y out exactly; elbo on a guide that samples y (score-function gradients)
    has the same expectation, for the bound and for the classifier's gradient."""
    model, enumerating = tiny_m2()
    with torch.no_grad():  # labels that matter to the decoder give the classifier's gradient some size
        model.decoder.first[1].weight.mul_(4.0)
    sampling = M2Guide(M2GuideConfig(hidden=[8], enumerate=False), model.data, model)
    sampling.load_state_dict(enumerating.state_dict())
    batch = mixed_batch()
    torch.manual_seed(0)

    def draws(guide, objective, calls):
        results = [classifier_grad(model, guide, objective, batch) for _ in range(calls)]
        grads = torch.stack([g for g, _ in results])
        bounds = torch.tensor([b for _, b in results], dtype=torch.float64)
        return grads.mean(0), grads.std(0) / math.sqrt(calls), bounds.mean(), bounds.std() / math.sqrt(calls)

    e_grad, e_se, e_bound, e_bound_se = draws(enumerating, EnumELBO(particles=200), 10)
    s_grad, s_se, s_bound, s_bound_se = draws(sampling, ELBO(particles=1000), 30)
    bound_tolerance = 4 * math.hypot(float(e_bound_se), float(s_bound_se))
    assert abs(float(e_bound - s_bound)) < bound_tolerance, (float(e_bound), float(s_bound), bound_tolerance)
    tolerance = 4 * torch.sqrt(e_se**2 + s_se**2)
    assert torch.all((e_grad - s_grad).abs() < tolerance), (e_grad, s_grad, tolerance)
    # The gradients are not trivially small: the comparison has power.
    assert float(e_grad.abs().max()) > 3 * float(tolerance.max())
    # Exact enumeration has far less noise than the score-function estimate.
    assert float(e_se.max()) < float(s_se.max())


def hand_labelled_bound(model, guide, batch, draws=20000):
    """E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)] per labelled row, by Monte
    Carlo from the networks themselves, with its standard error."""
    x, y = batch["x"], batch["y"]
    onehot = F.one_hot(y, CLASSES).float()
    with torch.no_grad():
        loc, raw = guide.encoder(x, onehot).chunk(2, -1)
        scale = F.softplus(raw) + guide.config.min_scale
        q = torch.distributions.Normal(loc, scale)
        z = q.sample((draws,))
        logits = model.decoder(z, onehot)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        terms = log_px + log_pz - q.log_prob(z).sum(-1) - math.log(CLASSES)
    return terms.mean(0), terms.std(0) / math.sqrt(draws)


def test_labelled_rows_contribute_log_p_x_y_and_the_classification_term():
    alpha = 2.0
    model, guide = tiny_m2(alpha=alpha)
    batch = mixed_batch(rows=4, labelled=(0, 1, 2, 3))
    log_q = model.classifier_logits(batch["x"]).log_softmax(-1).gather(-1, batch["y"][:, None]).squeeze(-1).detach()
    # The bound of labelled rows is log p(x, y), averaged over many z draws (the enumerated copies
    # of a labelled row are averaged, not summed).
    model.eval()  # no classification term
    torch.manual_seed(0)
    loss, metrics = EnumELBO(particles=4000)(model, guide, batch)
    loss = loss.detach()
    expected, se = hand_labelled_bound(model, guide, batch)
    assert float(metrics["elbo"]) == pytest.approx(-float(loss), abs=1e-4)
    # Standard error of the mean over 4 rows: the hand estimate's, and the objective's own (4000 draws).
    tolerance = 4 * float(se.pow(2).sum().sqrt()) / 4 * math.sqrt(1 + 20000 / 4000)
    assert abs(-float(loss) - float(expected.mean())) < tolerance, (-float(loss), float(expected.mean()), tolerance)
    # Summing the C enumerated copies of a labelled row instead of averaging them would multiply the
    # bound by C; dropping log p(y) would shift it by log C. Either is far outside the tolerance.
    assert tolerance < math.log(CLASSES) / 5
    # Training mode adds alpha * log q(y | x) on labelled rows, exactly (same draws).
    model.train()
    torch.manual_seed(5)
    trained = EnumELBO()(model, guide, batch)[0]
    model.eval()
    torch.manual_seed(5)
    evaluated = EnumELBO()(model, guide, batch)[0]
    assert float((trained - evaluated).detach()) == pytest.approx(-alpha * float(log_q.mean()), rel=1e-5)


def test_the_classification_term_skips_unlabelled_rows():
    alpha = 3.0
    model, guide = tiny_m2(alpha=alpha)
    batch = mixed_batch(rows=6, labelled=(1, 4))
    log_q = model.classifier_logits(batch["x"]).log_softmax(-1).gather(-1, batch["y"][:, None]).squeeze(-1).detach()
    losses = {}
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(7)
        losses[mode] = float(EnumELBO()(model, guide, batch)[0].detach())
    labelled = log_q[batch["y_mask"]].sum()
    assert losses[True] - losses[False] == pytest.approx(-alpha * float(labelled) / 6, rel=1e-5)


def test_split_input_mlp_equals_an_mlp_on_the_concatenation():
    torch.manual_seed(0)
    split = SplitInputMLP((5, 3), [7, 4], 2, activation="softplus")
    dense = MLP(8, [7, 4], 2, activation="softplus")
    with torch.no_grad():
        dense[0].weight.copy_(torch.cat([split.first[0].weight, split.first[1].weight], 1))
        dense[0].bias.copy_(split.first[0].bias)
        for ours, theirs in zip(split.rest.parameters(), [p for i, layer in enumerate(dense) if i > 0 for p in layer.parameters()]):
            theirs.copy_(ours)
    a, b = torch.randn(6, 5), torch.randn(4, 1, 6, 3)  # b carries an enumeration dim
    expected = dense(torch.cat([a.expand(4, 1, 6, 5), b], -1))
    assert torch.allclose(split(a, b), expected, atol=1e-6)


# --- data: labelled rows in every batch ------------------------------------------------------


def synthetic_splits(rows=50, labelled=(3, 8, 20, 41), labelled_per_batch=6):
    from pyrovae.data.splits import DataSplits

    y_mask = torch.zeros(rows, dtype=torch.bool)
    y_mask[list(labelled)] = True
    train = {"x": torch.rand(rows, 4), "y": torch.zeros(rows, dtype=torch.long), "y_mask": y_mask, "row": torch.arange(rows)}
    other = {key: value[:10] for key, value in train.items()}
    spec = DataSpec("synthetic", (4,), "unit_interval", num_classes=2)
    plain = DataSplits(spec=spec, train=train, valid=other, test=other, binarize="dynamic")
    from pyrovae.data.semisupervised import with_labelled_rows

    return with_labelled_rows(plain, labelled_per_batch)


def test_every_training_batch_ends_with_labelled_rows_cycling_through_them():
    data = synthetic_splits()
    torch.manual_seed(0)
    batches = list(data.batches("train", 16, shuffle=True))
    assert len(batches) == data.num_batches("train", 16) == 4
    base = torch.cat([batch["row"][:-6] for batch in batches])
    added = torch.cat([batch["row"][-6:] for batch in batches])
    # The epoch still passes over every row once; each batch ends with 6 labelled rows.
    assert sorted(base.tolist()) == list(range(50))
    assert all(bool(batch["y_mask"][-6:].all()) for batch in batches)
    # The 24 added rows cycle through the 4 labelled ones: each exactly 6 times.
    assert torch.bincount(added, minlength=50)[[3, 8, 20, 41]].tolist() == [6, 6, 6, 6]
    assert set(added.tolist()) == {3, 8, 20, 41}
    # Dynamic binarization draws the added rows too.
    assert all(set(batch["x"].unique().tolist()) <= {0.0, 1.0} for batch in batches)
    # Validation, test and unshuffled batches are the plain ones.
    assert torch.equal(next(data.batches("valid", 100))["row"], torch.arange(10))
    assert torch.equal(next(data.batches("train", 100))["row"], torch.arange(50))


def test_semisupervised_loaders_take_labelled_per_batch():
    data = semisupervised_digits(labels_per_class=2, labelled_per_batch=8, seed=0)
    assert isinstance(data, LabelledEveryBatch) and data.labelled_per_batch == 8
    assert int(data.train["y_mask"].sum()) == 20
    torch.manual_seed(0)
    batch = next(data.batches("train", 64, shuffle=True))
    assert batch["x"].shape[0] == 72 and int(batch["y_mask"][-8:].sum()) == 8
    with pytest.raises(DataError, match="labels_per_class"):
        semisupervised_digits(labels_per_class=0, labelled_per_batch=8)
    with pytest.raises(DataError, match="labelled_per_batch"):
        synthetic_splits(labelled_per_batch=-1)
    # The TOML loader's options are the image loader's, plus labelled_per_batch.
    config = resolve_config(load_experiment(EXPERIMENTS / "m2_mnist.toml"))
    assert config["data"]["labelled_per_batch"] == 10 and config["data"]["labels_per_class"] == 10
    assert Path(config["data"]["dir"]).is_absolute()


# --- end to end: train, evaluate, sample, test accuracy ----------------------------------------


# 100 labels of 8x8 digits: an MLP classifier trained on them alone reaches about 0.85; chance is 0.1.
# The convolutional one (one 5x5 stride-2 layer) learns slower in 6 epochs on images this small
# (0.52 here): the case checks that it trains end to end.
@pytest.mark.parametrize(
    "compile, classifier, min_accuracy",
    [("none", {}, 0.7), ("trace", {}, 0.7), ("trace", {"classifier_channels": [16]}, 0.4)],
)
def test_m2_trains_from_toml_and_reports_test_accuracy(tmp_path, capsys, compile, classifier, min_accuracy):
    model = {"name": "m2", "latent_dim": 8, "hidden": [64], "classifier_hidden": [64], "alpha": 20.0}
    experiment = {
        "seed": 0,
        "data": {"name": "pyrovae.data.semisupervised:digits", "labels_per_class": 10, "labelled_per_batch": 16},
        "model": {**model, **classifier},
        "guide": {"name": "m2", "hidden": [64]},
        "objective": {"name": "enum_elbo"},
        "train": {"epochs": 6, "batch_size": 64, "lr": 3e-3, "compile": compile},
        "evaluate": {"particles": 10, "test_examples": 100},
    }
    path = tmp_path / "m2.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    final = json.loads(captured.out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    assert final["test_accuracy"] > min_accuracy
    # q(y | x)'s accuracy on the validation labels, every epoch
    assert all(0.0 <= r["valid/accuracy"] <= 1.0 for r in records) and records[-1]["valid/accuracy"] > min_accuracy
    # the enumerated step is captured (no fallback message) and trains as well
    assert "running the step eagerly" not in captured.err + captured.out
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0, capsys.readouterr().err
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == pytest.approx(final["test_accuracy"])
    out = tmp_path / "samples.png"
    assert main(["sample", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 100


def test_accuracy_hook_counts_argmax_matches():
    from pyrovae.analysis.classification import label_metrics

    class Classifier(torch.nn.Module):
        def classify(self, x, **batch):
            return x  # the logits are the data: row n predicts argmax x_n

    x = torch.eye(4)[[0, 1, 2, 3, 0]]
    y = torch.tensor([0, 1, 2, 0, 1])
    assert label_metrics(torch.nn.Module(), Classifier(), {"x": x, "y": y}, batch_size=2) == {"accuracy": 0.6}
    assert label_metrics(torch.nn.Module(), torch.nn.Module(), {"x": x, "y": y}) == {}


def test_samples_of_requested_labels_reach_m2_with_every_label_observed():
    """analysis.label_samples / class_grid mark every requested label observed (y_mask) for a model
    that takes one, so M2's p(x | y, z) draws rows of the class asked for."""
    from pyrovae.analysis.conditional import class_grid, label_samples

    spec = DataSpec("tiny_images", (FEATURES,), "binary", image_shape=(2, 3), num_classes=CLASSES)
    torch.manual_seed(0)
    model = M2(M2Config(latent_dim=2, hidden=[8], classifier_hidden=[8]), spec)
    with torch.no_grad():  # a decoder where the label decides the pixels: class c lights pixel c
        model.decoder.first[0].weight.zero_()
        model.decoder.first[1].weight.copy_(torch.eye(CLASSES).repeat(3, 1)[:8] * 5)
    labels = torch.tensor([0, 1, 2, 2])
    means = label_samples(model, labels, FEATURES)
    assert means.shape == (4, FEATURES)
    torch.manual_seed(0)
    again = label_samples(model, torch.tensor([1, 1, 0, 0]), FEATURES)
    assert not torch.allclose(means, again)  # the label changes the samples
    path = class_grid(model, Path(__import__("tempfile").mkdtemp()) / "classes.png", CLASSES, (2, 3), per_class=2)
    assert path.stat().st_size > 100


def test_m2_without_y_mask_stops_with_one_line(tmp_path, capsys):
    experiment = {
        "seed": 0,
        "data": {"name": "digits"},  # labels, but no y_mask: nothing says which are observed
        "model": {"name": "m2", "latent_dim": 4, "hidden": [16], "classifier_hidden": [16]},
        "guide": {"name": "m2", "hidden": [16]},
        "objective": {"name": "enum_elbo"},
        "train": {"epochs": 1},
    }
    path = tmp_path / "m2.toml"
    path.write_text(dump_toml(experiment))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs y_mask" in err and "labels_per_class > 0" in err
