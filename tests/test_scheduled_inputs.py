"""Schedules are named inputs: a model or guide declares ``scheduled_inputs``, the experiment drives
them with ``[schedules.<input>]``, the loop passes their values in the batch at every step, logs them
and restores them on resume; per-site beta comes from ``[anneal.sites.<site>]``."""

import json
import tomllib

import pyro
import pytest
import torch

from pyrovae.config import dump_toml, resolve_config
from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from pyrovae.guides import DiagonalNormalGuide
from pyrovae.handlers import kl_scale
from pyrovae.models import GaussianVAE
from pyrovae.objectives import ELBO
from pyrovae.schedules import ExponentialDecay, StepSchedules
from pyrovae.train import LATEST, fit, load_checkpoint
from tests.conftest import tiny_experiment


class TemperedVAE(GaussianVAE):
    """The Gaussian VAE with tempered decoder logits: x ~ Bernoulli(decoder(z) / temperature).
    Records the temperatures it is called with (training and evaluation separately)."""

    scheduled_inputs = {"temperature": 1.0}

    def __init__(self, config, data):
        super().__init__(config, data)
        self.seen, self.seen_evaluating = [], []

    def forward(self, x, temperature, **batch):
        (self.seen if torch.is_grad_enabled() else self.seen_evaluating).append(temperature)
        assert isinstance(temperature, float)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(x.shape[0], self.config.latent_dim), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=self.decoder(z) / temperature).to_event(1), obs=x)


class KeepRateGuide(DiagonalNormalGuide):
    """The stock guide, reading a declared input it keeps at its default unless scheduled."""

    scheduled_inputs = {"keep_rate": 0.75}

    def __init__(self, config, data, model):
        super().__init__(config, data, model)
        self.seen = []

    def forward(self, x, keep_rate, **batch):
        if torch.is_grad_enabled():
            self.seen.append(keep_rate)
        return super().forward(x, **batch)


TEMPERED = {"name": "tests.test_scheduled_inputs:TemperedVAE", "latent_dim": 4, "hidden": [32]}
KEEP_RATE = {"name": "tests.test_scheduled_inputs:KeepRateGuide", "hidden": [32]}
DECAY = {"name": "exponential_decay", "rate": 0.01, "initial": 1.0, "minimum": 0.5}


def tempered(**overrides):
    config = tiny_experiment(model=TEMPERED, guide=KEEP_RATE, **overrides)
    config.setdefault("schedules", {"temperature": dict(DECAY)})
    return config


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scheduled_inputs_reach_the_model_and_guide_at_every_step_and_are_logged(tmp_path):
    experiment = Experiment.from_config(tempered(train={"epochs": 2}))
    experiment.train(tmp_path, progress=False)
    schedule = ExponentialDecay(rate=0.01, initial=1.0, minimum=0.5)
    steps = records(tmp_path)[-1]["step"]
    # Each training step calls the model and the guide once (look-aheads and evaluation run
    # without gradients), with the values at that step.
    assert experiment.model.seen == [schedule(t) for t in range(steps)]
    assert experiment.guide.seen == [0.75] * steps  # declared default: not scheduled
    for record in records(tmp_path):
        assert record["schedule/temperature"] == schedule(record["step"])
        assert record["schedule/keep_rate"] == 0.75
    resolved = tomllib.loads((tmp_path / "config.toml").read_text())
    assert resolved["schedules"] == {"temperature": DECAY}
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["schedule/temperature"] == schedule(final["step"])


def test_evaluation_uses_the_values_at_the_checkpointed_step(tmp_path):
    Experiment.from_config(tempered(train={"epochs": 2})).train(tmp_path, progress=False)
    evaluated = Experiment.from_run(tmp_path)
    saved = evaluated.load_parameters(tmp_path, "latest")
    evaluated.model.seen_evaluating.clear()  # the trace taken on building the model used the declared default
    step = saved["state"]["step"]
    expected = ExponentialDecay(rate=0.01)(step)
    assert evaluated.inputs() == {"temperature": expected, "keep_rate": 0.75}
    metrics = evaluated.test_metrics(particles=3)
    assert metrics["schedule/temperature"] == expected and metrics["step"] == step
    assert evaluated.model.seen_evaluating and set(evaluated.model.seen_evaluating) == {expected}
    evaluated.write_samples(tmp_path / "grid.png")
    assert set(evaluated.model.seen_evaluating) == {expected}


def test_a_resumed_run_passes_the_values_an_unbroken_run_passes(tmp_path):
    straight = Experiment.from_config(tempered(train={"epochs": 4}))
    straight.train(tmp_path / "straight", progress=False)
    first = Experiment.from_config(tempered(train={"epochs": 2}))
    first.train(tmp_path / "split", progress=False)
    second = Experiment.from_config(tempered(train={"epochs": 4}))
    second.train(tmp_path / "split", resume=True, progress=False)
    assert first.model.seen + second.model.seen == straight.model.seen
    assert len(set(straight.model.seen)) > 10  # the value really moves
    unbroken = load_checkpoint(tmp_path / "straight" / "checkpoints" / LATEST)
    resumed = load_checkpoint(tmp_path / "split" / "checkpoints" / LATEST)
    for part in ("model", "guide"):
        for name, tensor in unbroken[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name}"
    assert [r["schedule/temperature"] for r in records(tmp_path / "split")] == [
        r["schedule/temperature"] for r in records(tmp_path / "straight")
    ]


def test_a_schedule_for_an_input_no_part_declares_is_refused():
    config = tempered()
    config["schedules"] = {"temprature": dict(DECAY)}
    with pytest.raises(ConfigError, match=r"\[schedules.temprature\] no part reads an input named 'temprature'; the model and guide declare: keep_rate, temperature"):
        resolve_config(config)
    plain = tiny_experiment()
    plain["schedules"] = {"temperature": dict(DECAY)}
    with pytest.raises(ConfigError, match=r"declare: \(none\)"):
        resolve_config(plain)


def test_schedule_tables_are_type_checked():
    config = tempered()
    config["schedules"]["temperature"]["rate"] = "fast"
    with pytest.raises(ConfigError, match=r"\[schedules.temperature\] rate = 'fast': expected a number"):
        resolve_config(config)
    config["schedules"]["temperature"] = {"rate": 0.1}
    with pytest.raises(ConfigError, match=r"\[schedules.temperature\] missing required key 'name'"):
        resolve_config(config)
    config["schedules"]["temperature"] = {"name": "exponential_decay", "rat": 0.1}
    with pytest.raises(ConfigError, match=r"unknown key 'rat'"):
        resolve_config(config)
    # A decay that grows, falls below zero or starts under its floor is refused when the config is read.
    for bad, message in [({"rate": -1.0}, "needs rate >= 0"), ({"minimum": -1.0}, "needs minimum >= 0"), ({"initial": 0.2}, "needs initial >= minimum")]:
        config["schedules"]["temperature"] = {**DECAY, **bad}
        with pytest.raises(ConfigError, match=r"\[schedules.temperature\] 'exponential_decay': exponential_decay " + message):
            Experiment.from_config(config)


def test_a_temperature_schedule_is_not_accepted_as_beta():
    with pytest.raises(ConfigError, match=r"\[anneal\] schedule 'exponential_decay' is meant for \[schedules.<input>\].*schedules that fit: autoencoder_pretraining, capped_linear, constant, cyclical, linear, logistic"):
        resolve_config(tiny_experiment(anneal=dict(DECAY)))
    with pytest.raises(ConfigError, match=r"\[anneal.sites.z\] schedule 'exponential_decay'"):
        resolve_config(tiny_experiment(anneal={"name": "constant", "sites": {"z": dict(DECAY)}}))
    with pytest.raises(ConfigError, match="schedules that fit"):
        StepSchedules.for_pair(None, None, beta=ExponentialDecay(rate=0.1))  # the Python API checks too


TWO_LATENT = {"name": "tests.user_models:TwoLatentVAE", "content_dim": 3, "style_dim": 2, "hidden": [32]}


class BetaRecorder(ELBO):
    """The ELBO, recording the kl_scale handler active at each training call."""

    def __init__(self):
        super().__init__()
        self.betas = []

    def __call__(self, model, guide, batch):
        if torch.is_grad_enabled():
            handlers = [m for m in pyro.poutine.runtime._PYRO_STACK if isinstance(m, kl_scale)]
            self.betas.append((handlers[0].beta, handlers[0].beta_by_site) if handlers else None)
        return super().__call__(model, guide, batch)


def test_per_site_beta_from_toml_is_applied_logged_and_shown(tmp_path):
    config = tiny_experiment(
        model=TWO_LATENT,
        anneal={"name": "linear", "warmup_steps": 20, "sites": {"z_s": {"name": "constant", "value": 0.25}}},
        train={"epochs": 2, "log_every": 1},
    )
    experiment = Experiment.from_config(config)
    assert set(experiment.anneal_sites) == {"z_s"}
    recorder = BetaRecorder()
    result = fit(
        experiment.model, experiment.guide, recorder, experiment.data, experiment.train_config,
        anneal=experiment.anneal, anneal_sites=experiment.anneal_sites, run_dir=tmp_path, progress=True,
    )
    assert recorder.betas[0] == (0.0, {"z_s": 0.25})
    assert recorder.betas[5] == (0.25, {"z_s": 0.25})
    assert recorder.betas[-1] == (1.0, {"z_s": 0.25})  # default 1, but z_s is still scaled
    for record in result.state.history:
        assert record["beta"] == min(1.0, record["step"] / 20) and record["beta/z_s"] == 0.25
    # The resolved config keeps the per-site tables and reads back to itself.
    resolved = experiment.config
    assert resolved["anneal"]["sites"] == {"z_s": {"name": "constant", "value": 0.25}}
    assert resolve_config(tomllib.loads(dump_toml(resolved))) == resolved


def test_no_handler_when_every_beta_is_one_and_a_dict_valued_schedule_works():
    experiment = Experiment.from_config(tiny_experiment(model=TWO_LATENT, train={"epochs": 1, "log_every": 1}))
    recorder = BetaRecorder()
    fit(experiment.model, experiment.guide, recorder, experiment.data, experiment.train_config,
        anneal_sites={"z_c": lambda step: 1.0}, progress=True)
    assert set(recorder.betas) == {None}
    recorder = BetaRecorder()
    result = fit(experiment.model, experiment.guide, recorder, experiment.data, experiment.train_config,
                 anneal=lambda step: {"z_c": 0.5}, progress=True)
    assert recorder.betas[0] == (1.0, {"z_c": 0.5})
    assert result.state.history[-1]["beta/z_c"] == 0.5


def test_unknown_sites_and_negative_betas_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"\[anneal.sites.z2\] GaussianVAE has no latent site 'z2' \(its latent sites: z\)"):
        Experiment.from_config(tiny_experiment(anneal={"name": "constant", "sites": {"z2": {"name": "constant", "value": 0.5}}}))
    with pytest.raises(ConfigError, match=r"\[anneal\] schedule gives beta = -1.0 at step 0; a KL weight must be >= 0"):
        Experiment.from_config(tiny_experiment(anneal={"name": "constant", "value": -1.0}))
    # Negative only later: refused at the step it would be used, as a ConfigError.
    experiment = Experiment.from_config(tiny_experiment(anneal={"name": "linear", "warmup_steps": 10, "start": 0.5, "end": -1.0}))
    with pytest.raises(ConfigError, match=r"beta = -0.1.* at step 4"):
        experiment.train(tmp_path, progress=False)


class LabelNamedInputVAE(GaussianVAE):
    scheduled_inputs = {"y": 1.0}  # digits batches already hold labels under "y"


def test_a_scheduled_input_may_not_shadow_a_batch_key(tmp_path):
    experiment = Experiment.from_config(tiny_experiment(model={**TEMPERED, "name": "tests.test_scheduled_inputs:LabelNamedInputVAE"}))
    with pytest.raises(ConfigError, match=r"scheduled input 'y' has the name of a batch key"):
        experiment.train(tmp_path, progress=False)
