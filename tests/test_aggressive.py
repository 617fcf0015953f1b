"""Aggressive guide updates (He et al. 2019) as a strategy of the one fit loop: guide-only inner
steps, model-only outer steps while the mode is on, the switch on validation I(x; z), logging and resume."""

import json

import pytest
import torch

from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from pyrovae.objectives import ELBO
from pyrovae.train import LATEST, TrainConfig, fit, load_checkpoint, make_optimizer
from pyrovae.train.strategies import AggressiveGuideUpdates
from tests.conftest import tiny_experiment, tiny_pair


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return [not torch.equal(a, p.detach()) for a, p in zip(before, module.parameters())]


def _guide_step_setup(binary_batch, max_steps=5, check_every=100):
    torch.manual_seed(0)
    model, guide = tiny_pair()
    optimizer = make_optimizer(model, guide, TrainConfig(lr=1e-2))
    objective = ELBO()
    strategy = AggressiveGuideUpdates(check_every=check_every, max_steps=max_steps, mi_examples=10)

    def step_on(batch):
        loss, _ = objective(model, guide, batch)
        loss.backward()
        return loss.detach()

    return model, guide, optimizer, strategy, step_on


def test_an_inner_step_changes_guide_parameters_only(binary_batch):
    model, guide, optimizer, strategy, step_on = _guide_step_setup(binary_batch, max_steps=3)
    model_before, guide_before = _snapshot(model), _snapshot(guide)
    drawn = []

    def draw():
        drawn.append(1)
        return binary_batch

    taken = strategy.guide_steps(step_on, binary_batch, draw, optimizer, clip=100.0)
    assert taken == 3 and len(drawn) == 2  # the first inner step reuses the model step's batch
    assert not any(_changed(model_before, model))
    assert all(_changed(guide_before, guide))
    # Adam kept no state for the model's parameters: they were left out of every inner step.
    assert all(not optimizer.state.get(p) for p in model.parameters())


def test_the_model_step_of_aggressive_mode_changes_model_parameters_only(binary_batch):
    model, guide, optimizer, strategy, step_on = _guide_step_setup(binary_batch)
    model_before, guide_before = _snapshot(model), _snapshot(guide)
    optimizer.zero_grad()
    step_on(binary_batch)
    strategy.model_only(optimizer)
    optimizer.step()
    assert all(_changed(model_before, model))
    assert not any(_changed(guide_before, guide))


def test_the_inner_loop_stops_when_the_windowed_guide_loss_stops_falling():
    strategy = AggressiveGuideUpdates(check_every=2, max_steps=50, mi_examples=10)
    losses = iter([5.0, 5.0, 4.0, 4.0, 4.5, 4.5, 1.0, 1.0])  # window means 5, 4, 4.5: stop after the third window
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "name": "guide"}], lr=0.1)

    def step_on(batch):
        (parameter * 1.0).sum().backward()
        return torch.tensor(next(losses))

    assert strategy.guide_steps(step_on, {}, lambda: {}, optimizer, clip=1.0) == 6


def test_a_non_finite_inner_loss_is_named():
    strategy = AggressiveGuideUpdates(check_every=1, max_steps=5, mi_examples=10)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "name": "guide"}], lr=0.1)

    def step_on(batch):
        (parameter * 1.0).sum().backward()
        return torch.tensor(float("nan"))

    with pytest.raises(FloatingPointError, match="inner step 1"):
        strategy.guide_steps(step_on, {}, lambda: {}, optimizer, clip=1.0)


AGGRESSIVE = {"strategy": "aggressive", "aggressive_check_every": 2, "aggressive_max_steps": 6, "aggressive_mi_examples": 100}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_aggressive_training_logs_the_mode_the_inner_steps_and_validation_mutual_information(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2, **AGGRESSIVE}))
    experiment.train(tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")
    assert records[0]["aggressive"] is True
    assert 1 <= records[0]["train/guide_steps"] <= 6
    assert 0 <= records[0]["valid/mutual_information"] <= torch.log(torch.tensor(100.0)).item() + 0.1
    assert all(torch.isfinite(torch.tensor(r["valid/elbo"])) for r in records)


def test_the_mode_ends_after_the_first_epoch_whose_mutual_information_does_not_rise_and_a_resume_keeps_it(tmp_path, monkeypatch):
    # Validation I(x; z) rises, then falls: the mode ends after epoch 2.
    values = iter([0.5, 0.3, 0.9, 0.9])
    monkeypatch.setattr(AggressiveGuideUpdates, "validation_mutual_information", lambda self, *a, **k: next(values))
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2, **AGGRESSIVE}))
    experiment.train(tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")
    assert [r["aggressive"] for r in records] == [True, True]
    assert records[1].get("aggressive_ended") is True and "aggressive_ended" not in records[0]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / LATEST)["state"]
    assert state["aggressive"] is False and state["aggressive_ended_epoch"] == 2

    resumed = Experiment.from_config(tiny_experiment(train={"epochs": 4, **AGGRESSIVE}))
    resumed.train(tmp_path / "run", resume=True, progress=False)
    records = _records(tmp_path / "run")
    assert [r["aggressive"] for r in records] == [True, True, False, False]
    # Plain steps again: no guide-only steps and no MI estimate once the mode has ended.
    assert "train/guide_steps" not in records[2] and "valid/mutual_information" not in records[2]


def test_a_resumed_aggressive_run_continues_exactly(tmp_path):
    whole = Experiment.from_config(tiny_experiment(train={"epochs": 2, **AGGRESSIVE}))
    whole.train(tmp_path / "whole", progress=False)
    first = Experiment.from_config(tiny_experiment(train={"epochs": 1, **AGGRESSIVE}))
    first.train(tmp_path / "split", progress=False)
    second = Experiment.from_config(tiny_experiment(train={"epochs": 2, **AGGRESSIVE}))
    second.train(tmp_path / "split", resume=True, progress=False)
    for a, b in zip(whole.guide.parameters(), second.guide.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert _records(tmp_path / "whole")[-1]["valid/mutual_information"] == pytest.approx(
        _records(tmp_path / "split")[-1]["valid/mutual_information"], abs=1e-6
    )


def test_bad_aggressive_settings_are_refused():
    with pytest.raises(ValueError, match="train.strategy"):
        TrainConfig(strategy="lagging")
    with pytest.raises(ValueError, match="aggressive_check_every"):
        TrainConfig(strategy="aggressive", aggressive_check_every=0)
    with pytest.raises(ConfigError):
        Experiment.from_config(tiny_experiment(train={"strategy": "sometimes"}))


# --- paying only for what is asked (the loop's fixed per-step and per-epoch costs) -----------------


def test_without_clipping_no_gradient_norm_is_computed_or_logged(tmp_path, monkeypatch):
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or original(*a, **k))
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 1, "clip_norm": 0}, evaluate={"particles": 2}))
    experiment.train(tmp_path / "run", progress=False)
    assert not calls and "train/grad_norm" not in _records(tmp_path / "run")[0]
    clipped = Experiment.from_config(tiny_experiment(train={"epochs": 1}, evaluate={"particles": 2}))
    clipped.train(tmp_path / "clipped", progress=False)
    assert calls and "train/grad_norm" in _records(tmp_path / "clipped")[0]


def test_validation_can_be_turned_off(tmp_path, monkeypatch):
    import pyrovae.train.loop as loop

    evaluated = []
    original = loop.evaluate_objective
    monkeypatch.setattr(loop, "evaluate_objective", lambda *a, **k: evaluated.append(a[4]) or original(*a, **k))
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2, "validate": False}, evaluate={"particles": 2}))
    experiment.train(tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")
    assert "valid" not in evaluated and not any(key.startswith("valid/") for record in records for key in record)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / LATEST)["state"]
    assert state["best_epoch"] == 2  # best.pt is the latest epoch's
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(validate=False, patience=3)
