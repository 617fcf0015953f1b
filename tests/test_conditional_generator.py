"""The label-conditioned generator (``label_cvae``, ``label_cvae_encoder``): encoder (x, y) -> z,
decoder (z, y) -> x, with one-hot (integer) and multi-hot labels, and the classifier check of its
samples (:mod:`pyrovae.analysis.conditional`)."""

from __future__ import annotations

import pyrovae

import importlib.util
import itertools
import json
import math
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from pyrovae import DataSpec
from pyrovae.analysis import class_grid, generated_label_accuracy, label_samples
from pyrovae.analysis.conditional import label_classifier
from pyrovae.cli import main
from pyrovae.config import dump_toml, load_experiment, resolve_config
from pyrovae.data import make_splits
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.guides.cvae import ConditionalEncoderConfig, LabelConditionedEncoder
from pyrovae.models.cvae import LabelConditionedVAE, LabelConditionedVAEConfig
from pyrovae.objectives import ELBO
from pyrovae.pair import check_pair
from pyrovae.traces import trace_pair

ROOT = Path(__file__).resolve().parents[1]
CLASSES, BLOCK = 4, 4


@pyrovae.data_loader
def blocks(label_format: str = "integer", count: int = 1200, seed: int = 0):
    """16 pixels in 4 blocks of 4; label k lights block k (each pixel on with probability 0.95, off
    blocks 0.05). ``"integer"``: one class per row; ``"multi_hot"``: each label present with
    probability 1/2 independently, so every subset of the 4 labels occurs, the empty one included."""
    generator = torch.Generator().manual_seed(seed)

    def rows(n):
        if label_format == "integer":
            y = torch.randint(0, CLASSES, (n,), generator=generator)
            on = torch.nn.functional.one_hot(y, CLASSES).float()
        else:
            y = torch.bernoulli(torch.full((n, CLASSES), 0.5), generator=generator).long()
            on = y.float()
        probabilities = 0.05 + 0.9 * on.repeat_interleave(BLOCK, -1)
        return {"x": torch.bernoulli(probabilities, generator=generator), "y": y}

    spec = DataSpec(f"blocks-{label_format}", (CLASSES * BLOCK,), "binary", image_shape=(4, 4), num_classes=CLASSES, label_format=label_format)
    return make_splits(spec, rows(count), rows(count // 4), validation=0.1, binarize="none", seed=seed)


def pair(label_format: str):
    spec = blocks(label_format, count=80).spec
    torch.manual_seed(0)
    model = LabelConditionedVAE(LabelConditionedVAEConfig(latent_dim=3, hidden=[32]), spec)
    return model, LabelConditionedEncoder(ConditionalEncoderConfig(hidden=[32]), spec, model)


def table(data: dict, epochs: int = 3, **model):
    return {
        "seed": 0,
        "data": data,
        "model": {"name": "label_cvae", "latent_dim": 3, "hidden": [64], **model},
        "guide": {"name": "label_cvae_encoder", "hidden": [64]},
        "objective": {"name": "elbo"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 3e-3},
        "evaluate": {"particles": 20, "test_examples": 100},
    }


@lru_cache(maxsize=None)
def trained_on_blocks(label_format: str) -> Experiment:
    experiment = Experiment.from_config(table({"name": "tests.test_conditional_generator:blocks", "label_format": label_format}, epochs=25))
    with tempfile.TemporaryDirectory() as folder:
        experiment.train(folder, progress=False)
    return experiment


@pytest.mark.parametrize("label_format", ["integer", "multi_hot"])
def test_check_pair_and_sampling_shapes(label_format):
    model, guide = pair(label_format)
    data = blocks(label_format, count=80)
    batch = {key: value[:10] for key, value in data.test.items()}
    model.check_batch(data.train)
    check_pair(model, guide, batch)
    with torch.no_grad():
        model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=1, particles=6)
    assert tuple(guide_trace.nodes["z"]["value"].shape) == (6, 10, 3)
    fn = model_trace.nodes["x"]["fn"]
    assert tuple(fn.batch_shape) == (6, 10) and tuple(fn.event_shape) == (16,)
    labels = batch["y"] if label_format == "integer" else batch["y"]
    samples = label_samples(model, labels, 16)
    assert samples.shape == (10, 16) and bool(((samples > 0) & (samples < 1)).all())


@pytest.mark.parametrize("label_format", ["integer", "multi_hot"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(label_format):
    model, guide = pair(label_format)
    batch = blocks(label_format, count=80).train
    optimizer = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-2)

    def loss():
        torch.manual_seed(1)
        return ELBO()(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item() - 0.1


def test_samples_of_a_requested_class_light_its_block():
    model = trained_on_blocks("integer").model
    torch.manual_seed(0)
    for label in range(CLASSES):
        means = label_samples(model, torch.full((200,), label), 16).mean(0).reshape(CLASSES, BLOCK).mean(1)
        for block in range(CLASSES):
            # 0.95 inside the requested block, 0.05 elsewhere; a decoder ignoring y would give 0.5.
            assert (means[block] > 0.8) if block == label else (means[block] < 0.2), (label, means)


def test_samples_of_any_subset_of_labels_light_exactly_their_blocks():
    model = trained_on_blocks("multi_hot").model
    torch.manual_seed(0)
    subsets = torch.tensor(list(itertools.product([0, 1], repeat=CLASSES)))  # all 16, the empty set too
    means = label_samples(model, subsets.repeat_interleave(100, 0), 16).reshape(16, 100, CLASSES, BLOCK).mean((1, 3))
    lit = subsets.bool()
    assert bool((means[lit] > 0.8).all()) and bool((means[~lit] < 0.2).all()), means


def test_labels_are_required_and_must_all_be_observed():
    with pytest.raises(ValueError, match="label_cvae needs labelled data"):
        LabelConditionedVAE(LabelConditionedVAEConfig(), DataSpec("plain", (4,), "binary"))
    model, _ = pair("integer")
    batch = blocks("integer", count=80).train
    with pytest.raises(DataError, match=r"needs labels: batch\['y'\]"):
        model.check_batch({"x": batch["x"]})
    y_mask = torch.ones(len(batch["y"]), dtype=torch.bool)
    y_mask[5] = False
    with pytest.raises(DataError, match=r"batch\['y_mask'\] row 5 is False"):
        model.check_batch({**batch, "y_mask": y_mask})
    with pytest.raises(ConfigError, match="latent_dim"):
        Experiment.from_config(table({"name": "digits"}, latent_dim=0))


def test_fashion_experiment_file_resolves():
    config = resolve_config(load_experiment(ROOT / "experiments" / "conditional_fashion.toml"))
    assert config["model"]["name"] == "label_cvae" and config["data"]["name"] == "fashion-mnist"
    assert config["evaluate"]["particles"] == 1000


def test_digits_end_to_end_and_the_classifier_check(tmp_path, capsys):
    experiment = table({"name": "digits"}, epochs=30)
    experiment["model"].update(latent_dim=8, hidden=[128])
    experiment["guide"]["hidden"] = [128]
    path = tmp_path / "digits.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    assert final["test_log_likelihood"] >= final["test_elbo"] - 0.5 and math.isfinite(final["test_nll"])
    assert main(["evaluate", str(run), "--particles", "10", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["particles"] == 10
    assert main(["sample", str(run), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 100
    # The check of experiments/: a grid with one row per class, and the classifier's accuracies.
    script = ROOT / "experiments" / "conditional_fashion_check.py"
    spec = importlib.util.spec_from_file_location("conditional_fashion_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main([str(run), "--per-class", "50", "--grid", str(tmp_path / "classes.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "classes.png").stat().st_size > 1000
    assert report["real_test_accuracy"] > 0.9  # logistic regression on 8x8 digits
    assert report["generated_accuracy"] >= 0.8 and len(report["generated_per_class"]) == 10
    # The same samples scored against the wrong classes: the check measures the conditioning.
    loaded = Experiment.from_run(run)
    loaded.load_parameters(run)
    grey = module.grey_level_splits(loaded)
    classifier = label_classifier(grey.train["x"], grey.train["y"])
    torch.manual_seed(0)
    labels = torch.arange(10).repeat_interleave(50)
    predicted = torch.as_tensor(classifier.predict(label_samples(loaded.model, labels, 64).numpy()))
    assert float((predicted == labels).float().mean()) >= 0.8
    assert float((predicted == (labels + 1) % 10).float().mean()) < 0.2
    # From the command line: samples of one requested label (JSON rows here), and a grid of every class.
    capsys.readouterr()
    assert main(["sample", str(run), "--label", "3", "--count", "50", "--out", str(tmp_path / "three.json")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "three.json").read_text())["samples"]
    assert list(rows) == ["3"] and len(rows["3"]) == 50
    assert float((torch.as_tensor(classifier.predict(torch.tensor(rows["3"]).numpy())) == 3).float().mean()) >= 0.8
    assert main(["sample", str(run), "--label", "all", "--count", "4"]) == 0
    assert Path(capsys.readouterr().out.strip()) == run / "samples_label_all.png" and (run / "samples_label_all.png").stat().st_size > 1000
    assert main(["sample", str(run), "--label", "10"]) == 2
    assert "--label 10 is out of range: data set 'digits' has labels 0..9" in capsys.readouterr().err


def test_label_samples_are_refused_for_a_model_that_reads_no_label():
    experiment = Experiment.from_config(
        {
            "data": {"name": "digits"},
            "model": {"name": "vae", "latent_dim": 2, "hidden": [8]},
            "guide": {"name": "diag_normal", "hidden": [8]},
        }
    )
    assert not experiment.reads_label()
    with pytest.raises(ConfigError, match="GaussianVAE does not generate from a label y"):
        experiment.write_label_samples(3, Path(tempfile.mkdtemp()) / "three.png")
    assert experiment.decoding_labels(None, 4) is None


def test_generated_label_accuracy_against_known_generators():
    """Real images of the requested class score like real test images; samples that ignore the
    label score near chance."""
    data = blocks("integer")
    train_x, train_y, test_x, test_y = data.train["x"], data.train["y"], data.test["x"], data.test["y"]

    class Stub(torch.nn.Module):
        """A model whose p(x | z, y) has mean ``table[y]`` (one row per class)."""

        observed_site = "x"

        def __init__(self, rows):
            super().__init__()
            self.register_buffer("rows", rows)

        def forward(self, x, y, **batch):
            import pyro
            import pyro.distributions as dist

            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Bernoulli(probs=self.rows[y]).to_event(1), obs=x)

    prototypes = torch.stack([train_x[train_y == k].mean(0) for k in range(CLASSES)])
    faithful = generated_label_accuracy(Stub(prototypes), train_x, train_y, test_x, test_y, CLASSES, per_class=20)
    assert faithful["generated_accuracy"] == 1.0 and faithful["real_test_accuracy"] > 0.95
    ignoring = generated_label_accuracy(Stub(prototypes[[0, 0, 0, 0]]), train_x, train_y, test_x, test_y, CLASSES, per_class=20)
    assert ignoring["generated_accuracy"] == pytest.approx(1 / CLASSES)
    assert ignoring["generated_per_class"] == [1.0, 0.0, 0.0, 0.0]
    path = class_grid(Stub(prototypes), Path(tempfile.mkdtemp()) / "grid.png", CLASSES, (4, 4), per_class=3)
    assert path.stat().st_size > 500
