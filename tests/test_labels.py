"""Built-in loaders give labels, and ``labels_per_class`` keeps a balanced, seeded handful of them in
the training split: exact counts, balance, determinism, no leak of a hidden label, true labels (all
unobserved) in valid/test, and an error when a class is too small."""

import inspect

import numpy as np
import pytest
import torch

from pyrovae.data import digits, fashion_mnist, keep_labels_per_class, mnist
from pyrovae.errors import DataError
from pyrovae.experiment import Experiment
from pyrovae.pair import DataSpec, check_pair
from tests.conftest import tiny_experiment
from tests.test_errors import write_idx


def test_loaders_give_integer_labels_and_take_labels_per_class():
    for loader in (digits, mnist, fashion_mnist):
        assert inspect.signature(loader).parameters["labels_per_class"].default == 0
    data = digits()
    assert data.spec.num_classes == 10 and data.spec.label_format == "integer"
    for name in ("train", "valid", "test"):
        split = data.split(name)
        assert "y_mask" not in split  # 0: every label observed, no y_mask key
        assert split["y"].dtype == torch.int64 and split["y"].shape == (data.size(name),)
        data.spec.check_batch(split)


def test_labels_per_class_keeps_a_balanced_seeded_subset_without_leaks():
    full = digits(seed=4)
    data = digits(seed=4, labels_per_class=7)
    train, y_mask = data.train, data.train["y_mask"]
    assert y_mask.dtype == torch.bool and int(y_mask.sum()) == 70
    assert torch.bincount(train["y"][y_mask], minlength=10).tolist() == [7] * 10
    # Same rows in the same order; kept labels are the true ones, hidden ones are all 0.
    assert torch.equal(train["x"], full.train["x"])
    assert torch.equal(train["y"][y_mask], full.train["y"][y_mask])
    assert int(train["y"][~y_mask].abs().sum()) == 0
    # Valid and test: true labels for accuracy, none observed (ELBO over unlabelled x).
    for name in ("valid", "test"):
        assert torch.equal(data.split(name)["y"], full.split(name)["y"])
        assert data.split(name)["y_mask"].shape == (data.size(name),) and not data.split(name)["y_mask"].any()
    for name in ("train", "valid", "test"):
        data.spec.check_batch(data.split(name))
    # Deterministic in the seed, different across seeds.
    assert torch.equal(digits(seed=4, labels_per_class=7).train["y_mask"], y_mask)
    other = digits(seed=5, labels_per_class=7)
    assert int(other.train["y_mask"].sum()) == 70 and not torch.equal(other.train["x"][other.train["y_mask"]], train["x"][y_mask])
    # Batches carry y_mask along with their rows.
    batch = next(data.batches("train", 64, shuffle=True))
    assert set(batch) == {"x", "y", "y_mask"} and int(batch["y"][~batch["y_mask"]].abs().sum()) == 0


def test_labels_per_class_refuses_too_few_examples_and_bad_values():
    with pytest.raises(DataError, match=r"data.labels_per_class = 1000, but class 0 of data set 'digits' has only \d+ training examples"):
        digits(labels_per_class=1000)
    with pytest.raises(DataError, match=r"labels_per_class must be an integer >= 0"):
        digits(labels_per_class=-1)
    spec = DataSpec("tagged", (2,), num_classes=3, label_format="multi_hot")
    from pyrovae.data import make_splits

    multi = make_splits(spec, {"x": torch.zeros(10, 2), "y": torch.zeros(10, 3)}, {"x": torch.zeros(2, 2), "y": torch.zeros(2, 3)}, validation=2, binarize="none", seed=0)
    with pytest.raises(DataError, match="needs integer class labels"):
        keep_labels_per_class(multi, 1, seed=0)


def test_mnist_files_with_labels_per_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 6)  # 6 of each class
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    # A validation split of 5 leaves at least 1 example of every class.
    data = mnist(dir=str(tmp_path), validation=5, labels_per_class=1)
    assert int(data.train["y_mask"].sum()) == 10
    assert sorted(data.train["y"][data.train["y_mask"]].tolist()) == list(range(10))
    assert data.test["y"].tolist() == list(range(10)) and not data.test["y_mask"].any()
    with pytest.raises(DataError, match=r"but class \d of data set 'mnist' has only [0-5] training examples"):
        mnist(dir=str(tmp_path), validation=5, labels_per_class=6)


def test_labels_per_class_from_toml_feeds_an_m2_pair():
    from tests.families import M2, M2Guide, ConditionalConfig, GuideConfig

    experiment = Experiment.from_config(tiny_experiment(data={"name": "digits", "labels_per_class": 3}))
    data = experiment.data
    assert int(data.train["y_mask"].sum()) == 30
    model = M2(ConditionalConfig(), data.spec)
    guide = M2Guide(GuideConfig(), data.spec, model)
    for name in ("train", "test"):
        batch = next(data.batches(name, 32))
        model.check_batch(batch)
        check_pair(model, guide, batch)
