import pytest

from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from tests.conftest import tiny_experiment


def test_a_user_model_declared_by_import_path_trains_with_the_stock_guide(tmp_path):
    config = tiny_experiment(
        model={"name": "tests.user_models:TwoLatentVAE", "content_dim": 6, "style_dim": 2, "hidden": [32]},
        objective={"name": "iwae", "particles": 3, "dreg": True},
        train={"epochs": 2},
    )
    experiment = Experiment.from_config(config)
    final = experiment.train(tmp_path, progress=False)
    assert {"test_kl/z_c", "test_kl/z_s"} <= set(final)
    assert final["test_kl/z_c"] > 0 and final["test_log_likelihood"] > final["test_elbo"] - 1.0


def test_user_model_config_keys_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key 'content' for model 'tests.user_models:TwoLatentVAE'"):
        Experiment.from_config(tiny_experiment(model={"name": "tests.user_models:TwoLatentVAE", "content": 6}))
