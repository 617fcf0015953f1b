"""Fault injection on settings and inputs: every numeric bound names its key, bad data anywhere and
broken loaders stop before the first step, divergence without NaN is warned about, and the CLI
answers in one line."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from pyrovae.cli import main
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.objectives import ELBO
from pyrovae.train import fit
from tests.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"patience": -1}}, r"train.patience = -1 is not allowed: it must be >= 0"),
        ({"train": {"guide_lr": 0.0}}, r"train.guide_lr = 0.0 is not allowed"),
        ({"train": {"guide_lr": -1e-3}}, r"train.guide_lr = -0.001 is not allowed"),
        ({"train": {"clip_norm": -1.0}}, r"train.clip_norm = -1.0 is not allowed: it must be >= 0"),
        ({"train": {"lr": float("inf")}}, r"\[train\] lr = inf: expected a finite number"),
        ({"train": {"lr": float("nan")}}, r"\[train\] lr = nan: expected a finite number"),
        ({"train": {"lr": 0.0}}, r"train.lr = 0.0 is not allowed"),
        ({"train": {"weight_decay": -0.1}}, r"train.weight_decay = -0.1 is not allowed"),
        ({"train": {"valid_examples": -1}}, r"train.valid_examples = -1 is not allowed: it must be >= 0"),
        ({"model": {"latent_dim": 0}}, r"\[model\] 'vae': latent_dim = 0 is not allowed"),
        ({"model": {"hidden": [32, 0]}}, r"\[model\] 'vae': hidden = \[32, 0\] is not allowed"),
        ({"guide": {"hidden": [-4]}}, r"\[guide\] 'diag_normal': hidden = \[-4\] is not allowed"),
        ({"evaluate": {"batch_size": 0}}, r"evaluate.batch_size = 0 is not allowed: it must be >= 1"),
        ({"evaluate": {"particles": -1}}, r"evaluate.particles = -1 is not allowed: it must be >= 0 \(0: automatic\)"),
        ({"evaluate": {"test_examples": -5}}, r"evaluate.test_examples = -5 is not allowed: it must be >= 0"),
    ],
)
def test_every_bound_names_its_key(change, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.from_config(tiny_experiment(**change))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--particles", "0"], "--particles: must be >= 1, got 0"),
        (["--particles", "many"], "--particles: expected an integer >= 1"),
        (["--test-examples", "-1"], "--test-examples: must be >= 0 (0: all), got -1"),
    ],
)
def test_cli_counts_are_bounded_and_zero_particles_is_not_the_default(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tmp_path), *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    experiment = Experiment.from_config(tiny_experiment())
    with pytest.raises(ConfigError, match="at least 1 particle"):
        experiment.test_metrics(particles=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", str(QUICKSTART), "--out", str(tmp_path / "run"), "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.device = 'cuda', but CUDA is not available" in err and "Traceback" not in err


def test_version_and_the_python_the_code_needs():
    result = subprocess.run([sys.executable, "-m", "pyrovae.cli", "--version"], capture_output=True, text=True)
    import pyrovae

    assert result.returncode == 0 and result.stdout.strip() == f"pyrovae {pyrovae.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # config.py reads TOML with tomllib, which arrived in Python 3.11.
    assert project["requires-python"] == ">=3.11" and project["version"] == pyrovae.__version__


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_bad_row_in_any_split_stops_before_the_first_step(tmp_path, split):
    config = tiny_experiment(data={"name": "tests.fault_loaders:bad_row", "split": split, "row": 17}, train={"epochs": 1})
    with pytest.raises(DataError, match=rf"{split} split: .*row 17"):
        Experiment.from_config(config).train(tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists(), "a step ran before the data were checked"


@pytest.mark.parametrize(
    "loader, message",
    [
        ("tests.fault_loaders:not_splits", "returned builtins.dict; it must return pyrovae.data.DataSplits"),
        ("tests.fault_loaders:without_x", "the test split has no key 'x'"),
    ],
)
def test_broken_loaders_get_one_line_from_the_cli(tmp_path, capsys, loader, message):
    experiment = tmp_path / "exp.toml"
    experiment.write_text(f'[data]\nname = "{loader}"\n[model]\nname = "vae"\nlatent_dim = 2\nhidden = [8]\n[train]\nepochs = 1\n')
    assert main(["train", str(experiment), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and f"data loader '{loader}'" in err and len(err.strip().splitlines()) == 1


class DivergingELBO(ELBO):
    """An ELBO whose validation value falls by 40 nats at every evaluation call, with no NaN."""

    evaluations = 0

    def __call__(self, model, guide, batch):
        loss, metrics = super().__call__(model, guide, batch)
        if not torch.is_grad_enabled():
            type(self).evaluations += 1
            metrics = dict(metrics, elbo=metrics["elbo"] - 40.0 * self.evaluations)
        return loss, metrics


def test_divergence_without_nan_is_warned_about_once(capsys):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 4}))
    fit(experiment.model, experiment.guide, DivergingELBO(), experiment.data, experiment.train_config, progress=False)
    err = capsys.readouterr().err
    assert err.count("training is diverging without a NaN") == 1 and "lower train.lr" in err


def test_a_healthy_run_gets_no_divergence_warning(capsys):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 3}))
    fit(experiment.model, experiment.guide, experiment.objective, experiment.data, experiment.train_config, progress=False)
    assert "diverging" not in capsys.readouterr().err


class NaNValidationELBO(ELBO):
    """Finite in training, NaN in every validation pass."""

    def __call__(self, model, guide, batch):
        loss, metrics = super().__call__(model, guide, batch)
        if not torch.is_grad_enabled():
            metrics = dict(metrics, elbo=metrics["elbo"] * float("nan"))
        return loss, metrics


def test_a_nan_validation_bound_still_leaves_a_best_checkpoint_and_a_warning(tmp_path, capsys):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2}))
    fit(experiment.model, experiment.guide, NaNValidationELBO(), experiment.data, experiment.train_config, run_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / "best.pt").exists()
    assert "validation elbo is nan at epoch 1" in capsys.readouterr().err
