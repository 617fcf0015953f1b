"""Integration on the real data sets in ../shared/data; skipped when that folder is missing."""

import pytest
import torch

from pyrovae.experiment import Experiment
from tests.conftest import SHARED_DATA, tiny_experiment

MNIST = SHARED_DATA / "mnist"
pytestmark = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason=f"no MNIST at {MNIST}")


def test_mnist_loader_on_the_real_files():
    from pyrovae.data import mnist

    splits = mnist(dir=str(MNIST), validation=5000)
    assert (splits.size("train"), splits.size("valid"), splits.size("test")) == (55000, 5000, 10000)
    assert splits.spec.x_shape == (784,) and splits.spec.image_shape == (28, 28)
    # The README of the data says the labels begin 5 0 4 1 9 (before our shuffle): class counts are intact.
    labels = torch.cat([splits.train["y"], splits.valid["y"]])
    assert torch.bincount(labels).tolist()[:2] == [5923, 6742]
    assert 0.12 < float(splits.test["x"].mean()) < 0.14  # binarized ink density of MNIST


def test_a_limit_keeps_the_first_training_images_for_quick_runs():
    from pyrovae.data import mnist
    from pyrovae.data.images import IDX_FILES, read_idx

    splits = mnist(dir=str(MNIST), validation=200, limit=1000, binarize="none")
    assert (splits.size("train"), splits.size("valid"), splits.size("test")) == (800, 200, 10000)
    first = torch.from_numpy(read_idx(MNIST / IDX_FILES["train_labels"])[:1000].astype("int64"))
    assert torch.equal(torch.bincount(torch.cat([splits.train["y"], splits.valid["y"]]), minlength=10), torch.bincount(first, minlength=10))


@pytest.mark.slow
def test_one_short_epoch_on_mnist_learns(tmp_path):
    config = tiny_experiment(
        data={"name": "mnist", "dir": str(MNIST), "validation": 1000},
        model={"latent_dim": 10, "hidden": [200]},
        guide={"hidden": [200]},
        train={"epochs": 1, "batch_size": 256},
        evaluate={"particles": 50, "test_examples": 500},
    )
    final = Experiment.from_config(config).train(tmp_path, progress=False)
    # A single epoch already beats a uniform Bernoulli model (784 log 2 = 543 nats) by far.
    assert final["test_nll"] < 160
    assert final["test_log_likelihood"] >= final["test_elbo"] - 1.0
