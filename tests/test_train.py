import json
import re
import math

import pytest
import torch

from pyrovae.errors import NonFiniteLossError
from pyrovae.experiment import Experiment
from pyrovae.objectives import ELBO
from pyrovae.train import LATEST, TrainConfig, fit, load_checkpoint
from tests.conftest import tiny_experiment


def parameters(experiment):
    return {**{f"model.{k}": v for k, v in experiment.model.state_dict().items()}, **{f"guide.{k}": v for k, v in experiment.guide.state_dict().items()}}


def test_resume_gives_the_same_parameters_as_an_unbroken_run(tmp_path):
    config = tiny_experiment(train={"epochs": 4}, anneal={"name": "linear", "warmup_steps": 25})
    straight = Experiment.from_config(config)
    straight.train(tmp_path / "straight", progress=False)
    straight_latest = load_checkpoint(tmp_path / "straight" / "checkpoints" / LATEST)

    first = Experiment.from_config(tiny_experiment(train={"epochs": 2}, anneal={"name": "linear", "warmup_steps": 25}))
    first.train(tmp_path / "split", progress=False)
    second = Experiment.from_config(config)
    second.train(tmp_path / "split", resume=True, progress=False)
    split_latest = load_checkpoint(tmp_path / "split" / "checkpoints" / LATEST)

    assert split_latest["state"]["epoch"] == straight_latest["state"]["epoch"] == 4
    assert split_latest["state"]["step"] == straight_latest["state"]["step"]
    for part in ("model", "guide"):
        for name, tensor in straight_latest[part].items():
            assert torch.equal(tensor, split_latest[part][name]), f"{part}.{name} differs after resume"
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    straight_records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid/elbo"] for r in records] == [r["valid/elbo"] for r in straight_records]


def test_resume_removes_temporaries_left_by_a_kill_mid_write(tmp_path):
    Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(tmp_path, progress=False)
    # What SIGKILL during save_checkpoint leaves: a partial temporary beside the intact target.
    stale = tmp_path / "checkpoints" / ".latest.pt.4242.tmp"
    stale.write_bytes(b"half a checkpo")
    Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(tmp_path, resume=True, progress=False)
    assert not stale.exists()
    assert load_checkpoint(tmp_path / "checkpoints" / LATEST)["state"]["epoch"] == 2


def test_resume_refuses_a_different_experiment(tmp_path):
    Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(tmp_path, progress=False)
    from pyrovae.errors import ConfigError

    with pytest.raises(ConfigError, match="model.latent_dim"):
        Experiment.from_config(tiny_experiment(model={"latent_dim": 5})).train(tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        Experiment.from_config(tiny_experiment()).train(tmp_path, progress=False)


class FlakyELBO(ELBO):
    """An ELBO whose training loss turns NaN at chosen training calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.training_calls = set(bad_calls), 0

    def __call__(self, model, guide, batch):
        loss, metrics = super().__call__(model, guide, batch)
        if torch.is_grad_enabled():
            self.training_calls += 1
            if self.training_calls in self.bad_calls or "always" in self.bad_calls and self.training_calls > 3:
                loss = loss * float("nan")
                metrics = dict(metrics, reconstruction=metrics["reconstruction"] * float("nan"))
        return loss, metrics


def test_a_nonfinite_loss_mid_run_is_recovered(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 3}))
    config = experiment.train_config
    result = fit(experiment.model, experiment.guide, FlakyELBO({15}), experiment.data, config, run_dir=tmp_path, progress=False)
    assert result.state.epoch == 3
    assert result.state.nonfinite_retries == 1
    # The failed epoch was redone from its start at half the learning rate.
    assert [r["lr"] for r in result.state.history] == [config.lr, config.lr / 2, config.lr / 2]
    assert all(math.isfinite(r["valid/elbo"]) for r in result.state.history)
    assert all(torch.isfinite(p).all() for p in experiment.model.parameters())
    assert all(math.isfinite(r["train/grad_norm"]) for r in result.state.history)


def test_the_message_names_the_first_nonfinite_step(tmp_path):
    # Training call 5 is step 4 (steps count from 0); the device is read only at the epoch's end.
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 1, "max_nonfinite_retries": 0, "log_every": 1000}))
    with pytest.raises(NonFiniteLossError, match=r"non-finite reconstruction, loss, gradient at step 4 \(epoch 1\)"):
        fit(experiment.model, experiment.guide, FlakyELBO({5}), experiment.data, experiment.train_config, progress=False)


def test_persistent_nonfinite_losses_stop_with_a_clear_message(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 3, "max_nonfinite_retries": 2}))
    with pytest.raises(NonFiniteLossError) as failure:
        fit(experiment.model, experiment.guide, FlakyELBO({"always"}), experiment.data, experiment.train_config, progress=False)
    message = str(failure.value)
    assert "reconstruction" in message and "loss" in message
    assert re.search(r"at step \d+ \(epoch 1\) after 2 recoveries", message), message
    # It stopped in epoch 1: no checkpoint exists, so the advice is to train again, not to resume.
    assert "no epoch has finished, so there is no checkpoint: train again (the same --out works) with --set train.lr=" in message
    assert "--resume" not in message and "latest.pt" not in message


def test_early_stopping_and_checkpoints(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 50, "patience": 1, "lr": 0.3}))
    result = fit(experiment.model, experiment.guide, experiment.objective, experiment.data, experiment.train_config, run_dir=tmp_path, progress=False)
    assert result.stopped_early and result.state.epoch < 50
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["state"]["epoch"] == result.state.best_epoch
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_best_checkpoint_follows_the_objectives_own_bound(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(objective={"name": "iwae", "particles": 3}, train={"epochs": 4, "lr": 0.03}))
    result = fit(experiment.model, experiment.guide, experiment.objective, experiment.data, experiment.train_config, run_dir=tmp_path, progress=False)
    scores = [record["valid/iwae"] for record in result.state.history]
    assert result.state.best_epoch == 1 + scores.index(max(scores))
    assert result.state.best_valid_score == max(scores)
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["state"]["epoch"] == result.state.best_epoch


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainConfig(optimizer="adamax2")
    with pytest.raises(ValueError, match="train.device"):
        TrainConfig(device="tpu")


class WatchingELBO(ELBO):
    """An ELBO that records, at each call, whether subnormal floats are being flushed to zero."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __call__(self, model, guide, batch):
        from pyrovae.train.denormals import flushing_denormals

        self.seen.add(flushing_denormals())
        return super().__call__(model, guide, batch)


@pytest.mark.parametrize("flush", [True, False])
def test_subnormals_are_flushed_while_fitting_and_the_setting_is_restored(flush):
    from pyrovae.train.denormals import denormals_flushed, flushing_denormals

    assert not flushing_denormals()
    subnormal = torch.tensor([1e-30]) * 1e-10
    assert subnormal.item() != 0.0  # torch's default: computed, slowly
    with denormals_flushed():
        assert flushing_denormals() and (torch.tensor([1e-30]) * 1e-10).item() == 0.0
        with denormals_flushed():
            pass
        assert flushing_denormals()  # a nested block restores what it found
    assert not flushing_denormals()

    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 1, "flush_denormal": flush}))
    objective = WatchingELBO()
    fit(experiment.model, experiment.guide, objective, experiment.data, experiment.train_config, progress=False)
    assert objective.seen == {flush}
    assert not flushing_denormals()
