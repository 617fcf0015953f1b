"""Bad configs, bad data and mismatched pairs fail early with messages that name the culprit."""

import gzip
import struct

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.config import apply_overrides, resolve_config
from pyrovae.data import load_idx_images, read_idx
from pyrovae.errors import ConfigError, DataError, PairMismatchError
from pyrovae.experiment import Experiment
from pyrovae.pair import Guide, check_pair
from tests.conftest import tiny_experiment, tiny_pair


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"name": "vea"}}, r"\[model\] name: unknown model 'vea'; registered: .*\bvae\b"),
        ({"model": {"latent_dim": "big"}}, r"\[model\] latent_dim = 'big': expected an integer"),
        ({"model": {"hidden": [32, "x"]}}, r"\[model\] hidden = \[32, 'x'\]: expected a list of integers"),
        ({"model": {"latnt_dim": 4}}, r"\[model\] unknown key 'latnt_dim' for model 'vae'; expected one of: latent_dim"),
        ({"anneal": {"name": "logistic"}}, r"\[anneal\] missing required key 'midpoint'"),
        ({"train": {"epochs": 2.5}}, r"\[train\] epochs = 2.5: expected an integer"),
        ({"train": {"optimizer": "adamax2"}}, r"train.optimizer = 'adamax2' is not allowed: it must be one of adam"),
        ({"objective": {"name": "iwae", "particles": True}}, r"\[objective\] particles = True: expected an integer"),
        ({"data": {"name": "mymod.nowhere:Loader"}}, r"cannot find module 'mymod.nowhere' in .* \(the working directory\) or on the import path"),
        ({"extra": {"a": 1}}, r"unknown top-level key 'extra'"),
    ],
)
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(tiny_experiment(**change))


def test_missing_model_table():
    config = tiny_experiment()
    del config["model"]
    with pytest.raises(ConfigError, match=r"\[model\] missing required key 'name'"):
        resolve_config(config)


def test_overrides_are_parsed_as_toml():
    config = apply_overrides(tiny_experiment(), ["train.lr=0.01", "model.hidden=[8, 8]", "data.name=digits", "train.device=cpu"])
    resolved = resolve_config(config)
    assert resolved["train"]["lr"] == 0.01 and resolved["model"]["hidden"] == [8, 8] and resolved["train"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(config, ["train.lr"])


def test_integer_given_for_a_float_is_accepted():
    assert resolve_config(tiny_experiment(train={"lr": 1}))["train"]["lr"] == 1.0


def test_models_by_import_path():
    config = tiny_experiment(model={"name": "pyrovae.models.vae:GaussianVAE"})
    experiment = Experiment.from_config(config)
    assert type(experiment.model).__name__ == "GaussianVAE"


def test_non_binary_data_under_a_bernoulli_likelihood(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(data={"name": "digits", "binarize": "none"}))
    with pytest.raises(DataError, match=r"Bernoulli likelihood needs binary data \(0 or 1\), but x has values in \[0, 1\]"):
        experiment.train(tmp_path, progress=False)


def test_shape_mismatch_between_data_and_model():
    model, _ = tiny_pair(features=12)
    with pytest.raises(DataError, match=r"batch\['x'\] has shape \(5, 64\), but GaussianVAE was built for x of shape \(batch, 12\)"):
        model.check_batch({"x": torch.zeros(5, 64)})


def test_nan_in_data_is_refused():
    model, _ = tiny_pair(likelihood="gaussian")
    x = torch.zeros(3, 12)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite"):
        model.check_batch({"x": x})


def guide_sampling(site: str, size: int) -> type:
    """A guide class that samples one site of event shape (size,), whatever the model declares."""

    class OneSiteGuide(Guide):
        def forward(self, x, **batch):
            with pyro.plate("data", x.shape[0]):
                pyro.sample(site, dist.Normal(torch.zeros(x.shape[0], size), 1.0).to_event(1))

    return OneSiteGuide


def test_guide_missing_a_latent_site():
    model, _ = tiny_pair()
    with pytest.raises(PairMismatchError, match=r"guide has no site 'z' of GaussianVAE \(OneSiteGuide samples: \['w'\]\)"):
        check_pair(model, guide_sampling("w", 3)(model.data), {"x": torch.zeros(4, 12)})


def test_guide_with_wrong_event_shape():
    model, _ = tiny_pair(latent_dim=3)
    with pytest.raises(PairMismatchError, match=r"samples site 'z' with event shape \(2,\), but GaussianVAE declares \(3,\)"):
        check_pair(model, guide_sampling("z", 2)(model.data), {"x": torch.zeros(4, 12)})


def write_idx(path, array):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def test_idx_reader_round_trip_and_errors(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "images.gz", images)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    with gzip.open(tmp_path / "bad.gz", "wb") as handle:
        handle.write(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    truncated = struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 10) + b"\x00" * 4
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(truncated)
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "short.gz")


def test_mnist_loader_reads_a_local_folder_and_reports_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 30, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte.gz .* data.download = true"):
        load_idx_images(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 10, dtype=np.uint8))
    train_x, train_y, test_x, test_y = load_idx_images(tmp_path)
    assert train_x.shape == (30, 28, 28) and test_y.shape == (10,)
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0
    from pyrovae.data import mnist

    splits = mnist(dir=str(tmp_path), validation=5)
    assert splits.size("train") == 25 and splits.size("valid") == 5 and splits.spec.x_shape == (784,)
    assert set(splits.valid["x"].unique().tolist()) <= {0.0, 1.0}
    # Dynamic binarization: a fresh draw per training batch.
    first, second = next(splits.batches("train", 25))["x"], next(splits.batches("train", 25))["x"]
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)
