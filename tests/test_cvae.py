"""Sohn et al. 2015's CVAE for structured output prediction (``cvae``, ``cvae_recognition``), its
deterministic baseline (``cvae_baseline``, ``no_latents``) and the quadrant data
(``pyrovae.data.quadrants``), on scikit-learn's 8x8 digits cut into 4x4 quadrants."""

from __future__ import annotations

import pyrovae

import importlib.util
import json
import math
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from pyrovae.analysis import importance_log_likelihood, observation_means
from pyrovae.cli import main
from pyrovae.config import dump_toml, load_experiment, resolve_config
from pyrovae import DataSpec
from pyrovae.data import make_splits
from pyrovae.data.quadrants import quadrant_target, quadrants, split_quadrants
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment, load_trained_model
from pyrovae.guides.cvae import ConditionalEncoderConfig, NoLatentsConfig, NoLatentsGuide, RecognitionGuide
from pyrovae.models.cvae import (
    CVAEBaseline,
    CVAEBaselineConfig,
    StructuredOutputCVAE,
    StructuredOutputCVAEConfig,
)
from pyrovae.objectives import IWAE, ELBO
from pyrovae.pair import check_pair
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import trace_pair
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
QUADRANTS = "pyrovae.data.quadrants:quadrants"


@lru_cache(maxsize=None)
def digits_quadrants(given: int = 1):
    return quadrants(source="digits", given_quadrants=given)


def cvae_pair(given: int = 1, baseline_run=None, **options):
    """A small CVAE and its recognition guide; with ``baseline_run``, built on that run's trained
    baseline, loaded by the experiment layer and given to the model."""
    spec = digits_quadrants(given).spec
    torch.manual_seed(0)
    baseline = None if baseline_run is None else load_trained_model(baseline_run, spec)
    config = StructuredOutputCVAEConfig(latent_dim=4, hidden=[32], baseline_run=baseline_run, **options)
    model = StructuredOutputCVAE(config, spec, baseline=baseline)
    guide = RecognitionGuide(ConditionalEncoderConfig(hidden=[32]), spec, model)
    return model, guide


def baseline_pair(given: int = 1):
    spec = digits_quadrants(given).spec
    torch.manual_seed(0)
    model = CVAEBaseline(CVAEBaselineConfig(hidden=[32]), spec)
    return model, NoLatentsGuide(NoLatentsConfig(), spec, model)


def quadrant_batch(given: int = 1, rows: int = 32) -> dict:
    return {key: value[:rows] for key, value in digits_quadrants(given).test.items()}


def experiment_table(given=1, model=None, guide=None, objective=None, epochs=3, particles=20, **extra):
    return {
        "seed": 0,
        "data": {"name": QUADRANTS, "source": "digits", "given_quadrants": given},
        "model": model or {"name": "cvae", "latent_dim": 4, "hidden": [64]},
        "guide": guide or {"name": "cvae_recognition", "hidden": [64]},
        "objective": objective or {"name": "elbo"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 3e-3},
        "evaluate": {"particles": particles, "test_examples": 100},
        **extra,
    }


def baseline_table(given=1, epochs=3):
    return experiment_table(
        given,
        model={"name": "cvae_baseline", "hidden": [64]},
        guide={"name": "no_latents"},
        objective={"name": "pyro:Trace_ELBO"},
        epochs=epochs,
        particles=1,
    )


@pyrovae.data_loader
def two_modes(count: int = 2000, flip: float = 0.05, seed: int = 0):
    """4x4 images whose left half (the input) is random bits and whose right half (the output) is all
    ones or all zeros, by a fair coin the input says nothing about, with each pixel flipped with
    probability ``flip``. The output is bimodal given the input: a deterministic network can do no
    better than 1/2 per pixel (NLL 8 log 2), while a latent code can hold the coin."""
    generator = torch.Generator().manual_seed(seed)
    target = quadrant_target((4, 4), 2).reshape(-1)

    def rows(n):
        context = torch.bernoulli(torch.full((n, 16), 0.5), generator=generator)
        coin = torch.bernoulli(torch.full((n, 1), 0.5), generator=generator)
        noise = torch.bernoulli(torch.full((n, 16), flip), generator=generator)
        return {"x": torch.where(target, (coin + noise) % 2, context)}

    spec = DataSpec("two-modes", (16,), "binary", image_shape=(4, 4))
    splits = make_splits(spec, rows(count), rows(count // 4), validation=0.1, binarize="none", seed=seed)
    parts = {name: split_quadrants(splits.split(name), target) for name in ("train", "valid", "test")}
    return replace(splits, **parts)


TWO_MODES = {"name": "tests.test_cvae:two_modes"}


@lru_cache(maxsize=None)
def trained_on_two_modes(model: str = "cvae") -> tuple[Experiment, dict]:
    """A small CVAE (or the baseline) trained for 20 epochs on :func:`two_modes` (seconds)."""
    table = (baseline_table if model == "cvae_baseline" else experiment_table)(epochs=20)
    if model == "cvae":
        table["model"]["latent_dim"] = 2
    table = {**table, "data": TWO_MODES, "evaluate": {"particles": 100, "test_examples": 200}}
    experiment = Experiment.from_config(table)
    with tempfile.TemporaryDirectory() as folder:
        final = experiment.train(folder, progress=False)
    return experiment, final


# --- the data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, predicted", [(1, ["top-left", "top-right", "bottom-right"]), (2, ["top-right", "bottom-right"]), (3, ["bottom-right"])])
def test_quadrant_layouts_and_context(given, predicted):
    corners = {"top-left": (0, 0), "top-right": (0, 4), "bottom-left": (4, 0), "bottom-right": (4, 4)}
    target = quadrant_target((8, 8), given)
    for name, (row, column) in corners.items():
        assert bool(target[row : row + 4, column : column + 4].all()) == (name in predicted)
        assert bool(target[row : row + 4, column : column + 4].any()) == (name in predicted)
    splits = digits_quadrants(given)
    assert splits.spec.name == f"digits-quadrants-{given}" and splits.spec.support == "binary"
    for tensors in (splits.train, splits.valid, splits.test):
        x, c, mask = tensors["x"], tensors["c"], tensors["target"]
        assert mask.dtype == torch.bool and bool((mask == target.reshape(-1)).all())
        assert bool((c[mask] == -1).all()) and bool((c[~mask] == x[~mask]).all())
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert float(splits.test["target"].float().mean()) == pytest.approx(1 - given / 4)


def test_quadrant_loader_refuses_what_it_cannot_honour():
    for given in (0, 4, True):
        with pytest.raises(DataError, match="given_quadrants must be 1, 2 or 3"):
            quadrants(source="digits", given_quadrants=given)
    with pytest.raises(DataError, match="'dynamic' would redraw the target pixels"):
        quadrants(source="digits", binarize="dynamic")
    with pytest.raises(DataError, match="data.source must be one of"):
        quadrants(source="cifar")


def test_experiment_files_resolve_and_the_cli_reaches_given_quadrants():
    for name in ("cvae_quadrants.toml", "cvae_quadrants_baseline.toml"):
        config = resolve_config(load_experiment(ROOT / "experiments" / name, ["data.given_quadrants=3"]))
        assert config["data"]["given_quadrants"] == 3 and config["data"]["binarize"] == "static"
        assert Path(config["data"]["dir"]).resolve() == (ROOT.parent / "shared" / "data" / "mnist").resolve()
    config = resolve_config(load_experiment(ROOT / "experiments" / "cvae_quadrants.toml", ["model.baseline_run=runs/q1"]))
    assert config["model"]["baseline_run"] == str(Path.cwd() / "runs" / "q1")


@pytest.mark.skipif(not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST in ../shared/data")
def test_mnist_quadrants_from_the_experiment_file():
    experiment = Experiment.from_config(load_experiment(ROOT / "experiments" / "cvae_quadrants.toml", ["data.given_quadrants=2"]))
    data = experiment.data
    assert data.spec.name == "mnist-quadrants-2" and data.size("valid") == 5000 and data.size("test") == 10000
    assert float(data.test["target"][0].float().mean()) == 0.5
    assert bool((data.test["target"][0].reshape(28, 28)[:, 14:]).all())  # the right half is predicted


# --- the pair contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [cvae_pair, baseline_pair])
def test_check_pair_and_sampling_shapes(make):
    model, guide = make()
    batch = quadrant_batch()
    check_pair(model, guide, batch)
    model.check_batch(digits_quadrants(1).train)
    with torch.no_grad():
        model_trace, _ = trace_pair(model, guide, batch, max_plate_nesting=1, particles=5)
        means = observation_means(model, guide, batch, from_prior=True)
    fn = model_trace.nodes["x"]["fn"]
    assert tuple(fn.batch_shape) == (5, 32) and tuple(fn.event_shape) == (64,)
    assert means.shape == (32, 64)
    # Completions keep the given pixels; the model predicts only the target ones.
    given = ~batch["target"]
    assert torch.allclose(means[given], batch["c"][given], atol=1e-12)
    assert bool(((means[batch["target"]] > 0) & (means[batch["target"]] < 1)).all())


def test_completion_batches_are_checked_by_name():
    model, _ = cvae_pair()
    batch = quadrant_batch()
    with pytest.raises(DataError, match=r"needs batch\['c'\]"):
        model.check_batch({"x": batch["x"], "target": batch["target"]})
    with pytest.raises(DataError, match=r"batch\['c'\] row 0, feature 32 holds -1"):
        model.check_batch({**batch, "c": torch.where(batch["target"], batch["c"], torch.full_like(batch["c"], -1.0))})
    with pytest.raises(DataError, match=r"batch\['target'\] row 3 marks no pixel"):
        target = batch["target"].clone()
        target[3] = False
        model.check_batch({**batch, "target": target, "c": torch.where(target, -1.0, batch["x"])})


# No latents: the stock ``elbo`` cannot stack an empty list of KL terms, so the baseline uses Pyro's
# Trace_ELBO (as its experiment file does).
@pytest.mark.parametrize(
    "make, objective, options",
    [(cvae_pair, "elbo", {}), (cvae_pair, "iwae", {"particles": 5, "dreg": True}), (baseline_pair, "pyro:Trace_ELBO", {})],
)
def test_one_step_lowers_the_loss_on_a_fixed_batch(make, objective, options):
    model, guide = make()
    batch = quadrant_batch(rows=64)
    objective = OBJECTIVES.resolve(objective)(**options)
    parameters = list(model.parameters()) + list(guide.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-2)

    def loss():
        torch.manual_seed(1)  # the same noise before and after the step
        return objective(model, guide, batch)[0]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item() - 0.1


# --- the conditional log-likelihood ---------------------------------------------------------------


def test_importance_sampled_cll_bounds_the_elbo_and_converges_as_k_grows():
    experiment, _ = trained_on_two_modes()
    model, guide = experiment.model, experiment.guide
    batch = {key: value[:100] for key, value in experiment.data.test.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = float(torch.stack([ELBO()(model, guide, batch)[1]["elbo"] for _ in range(50)]).mean())
    estimates = {}
    for k in (1, 10, 100, 1000):
        runs = []
        for seed in range(4):
            torch.manual_seed(seed)
            runs.append(importance_log_likelihood(model, guide, batch, particles=k))
        estimates[k] = torch.stack(runs)  # (seeds, rows)
    means = {k: float(v.mean()) for k, v in estimates.items()}
    spread = {k: float(v.std(0).mean()) for k, v in estimates.items()}  # per-row spread over seeds
    # K = 1 is one log-weight: an unbiased estimate of the ELBO (400 draws; their mean's sd is ~0.03).
    assert means[1] == pytest.approx(elbo, abs=0.1)
    # The K-sample estimate rises with K (Burda et al. 2016) and ends well above the ELBO (gap ~0.17) ...
    assert means[1] < means[10] < means[100] < means[1000] + 0.02
    assert means[1000] > elbo + 0.1
    # ... and converges: each tenfold K gains less, and the estimates spread less over seeds.
    assert means[1000] - means[100] < means[100] - means[10] < means[10] - means[1]
    assert spread[1000] < spread[100] < spread[10] < spread[1]
    assert spread[1000] < 0.2 * spread[1]


def test_the_cvae_models_a_bimodal_output_that_the_deterministic_baseline_cannot():
    _, cvae = trained_on_two_modes("cvae")
    _, baseline = trained_on_two_modes("cvae_baseline")
    # The best deterministic guess is 1/2 per target pixel: 8 log 2 = 5.55 nats.
    assert baseline["test_nll"] > 8 * math.log(2) - 0.25
    # The coin is worth log 2 of them per pixel but one: the true CLL is about 2.3 nats.
    assert cvae["test_nll"] < 3.0
    assert cvae["test_kl/z"] > 0.5  # the latent code holds the coin


def test_masked_out_pixels_change_no_number():
    experiment, _ = trained_on_two_modes()
    model, guide = experiment.model, experiment.guide
    batch = {key: value[:50] for key, value in experiment.data.test.items()}
    given = ~batch["target"]
    flipped = {**batch, "x": torch.where(given, 1 - batch["x"], batch["x"])}  # c keeps the input

    def numbers(b):
        torch.manual_seed(0)
        loss, metrics = ELBO()(model, guide, b)
        torch.manual_seed(0)
        _, iwae = IWAE(particles=5)(model, guide, b)
        torch.manual_seed(0)
        log_likelihood = importance_log_likelihood(model, guide, b, particles=20)
        return [loss, *metrics.values(), *iwae.values(), log_likelihood]

    for a, b in zip(numbers(batch), numbers(flipped)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # A target pixel is data: flipping one changes the numbers (the comparison above can fail).
    pixel = int(batch["target"][0].nonzero()[0])
    one_target = {**batch, "x": batch["x"].clone()}
    one_target["x"][0, pixel] = 1 - one_target["x"][0, pixel]
    assert not torch.equal(numbers(batch)[-1], numbers(one_target)[-1])


# --- the baseline and the CVAE built on it --------------------------------------------------------


@lru_cache(maxsize=None)
def _baseline_run(folder: str) -> tuple[Path, dict]:
    run = Path(folder) / "baseline"
    experiment = Experiment.from_config(baseline_table(epochs=3))
    final = experiment.train(run, progress=False)
    return run, final


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    return _baseline_run(str(tmp_path_factory.mktemp("cvae")))


def test_the_baseline_nll_is_exact(baseline_run):
    run, final = baseline_run
    # No latents: the ELBO is log p(y | x) itself, and one particle gives it exactly.
    assert final["test_elbo"] == pytest.approx(final["test_log_likelihood"], rel=1e-6)
    assert final["particles"] == 1 and final["test_nll"] < 48 * math.log(2)  # beats coin flips on 48 target pixels


def test_a_cvae_built_on_the_baseline_reads_its_guess_and_keeps_it_frozen(baseline_run):
    run, _ = baseline_run
    baseline = Experiment.from_run(run)
    baseline.load_parameters(run)
    model, guide = cvae_pair(baseline_run=run)
    theirs = dict(baseline.model.named_parameters())
    assert set(dict(model.baseline.named_parameters())) == set(theirs)
    for name, ours in model.baseline.named_parameters():
        assert torch.equal(ours, theirs[name]), name
    batch = quadrant_batch()
    guess = observation_means(baseline.model, baseline.guide, batch, from_prior=True)
    # The baseline's guess fills the pixels to predict in the input of the prior and generation networks.
    h, _ = model.network_input(batch["c"], batch["target"])
    assert torch.allclose(h, guess, atol=1e-6)
    assert not torch.allclose(observation_means(model, guide, batch, from_prior=True), guess, atol=1e-2)
    # start_at_baseline: p(y | x, z) is the baseline's prediction at initialisation, whatever z.
    started, started_guide = cvae_pair(baseline_run=run, start_at_baseline=True)
    for seed in range(2):
        torch.manual_seed(seed)
        assert torch.allclose(observation_means(started, started_guide, batch, from_prior=True), guess, atol=1e-6)
    # Frozen: a training step moves the CVAE's networks, not the baseline's.
    frozen = [p.detach().clone() for p in model.baseline.parameters()]
    prior = [p.detach().clone() for p in model.prior_net.parameters()]
    optimizer = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-2)
    ELBO()(model, guide, batch)[0].backward()
    optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in model.baseline.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.baseline.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(prior, model.prior_net.parameters()))
    trained, trained_guide = cvae_pair(baseline_run=run, train_baseline=True)
    ELBO()(trained, trained_guide, batch)[0].backward()
    assert all(p.grad is not None for p in trained.baseline.parameters())


def test_a_baseline_of_other_data_or_another_model_is_refused(baseline_run, tmp_path):
    run, _ = baseline_run
    with pytest.raises(ValueError, match="trained on data 'digits-quadrants-1', but this experiment's data are 'digits-quadrants-2'"):
        cvae_pair(given=2, baseline_run=run)
    with pytest.raises(ValueError, match="holds no best.pt"):
        cvae_pair(baseline_run=tmp_path)
    spec = digits_quadrants(1).spec
    with pytest.raises(ValueError, match="is a StructuredOutputCVAE, not a trained 'cvae_baseline'"):
        StructuredOutputCVAE(StructuredOutputCVAEConfig(latent_dim=4, hidden=[32]), spec, baseline=cvae_pair()[0])
    # The model is given the trained baseline; it never opens the run folder itself.
    with pytest.raises(ValueError, match="give the trained baseline itself"):
        StructuredOutputCVAE(StructuredOutputCVAEConfig(latent_dim=4, hidden=[32], baseline_run=run), spec)
    # From an experiment, the baseline is loaded from baseline_run and its data are checked, in one line.
    table = experiment_table(given=2, model={"name": "cvae", "latent_dim": 4, "hidden": [32], "baseline_run": str(run)})
    with pytest.raises(ConfigError, match=r"\[model\] 'cvae': baseline_run = .* was trained on data 'digits-quadrants-1'"):
        Experiment.from_config(table)
    with pytest.raises(ValueError, match="train_baseline = true needs a baseline_run"):
        StructuredOutputCVAEConfig(train_baseline=True)
    with pytest.raises(ValueError, match="no_latents is for models without latent variables"):
        NoLatentsGuide(NoLatentsConfig(), digits_quadrants(1).spec, cvae_pair()[0])


# --- end to end through the CLI -------------------------------------------------------------------


def _cli_run(tmp_path: Path, capsys, name: str, table: dict) -> tuple[dict, Path]:
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_toml(table))
    run = tmp_path / name
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    return final, run


def test_train_evaluate_sample_and_the_completion_figure(tmp_path, capsys, baseline_run):
    baseline, _ = baseline_run
    table = experiment_table(given=2, epochs=3)
    final, run = _cli_run(tmp_path, capsys, "cvae", table)
    assert math.isfinite(final["test_log_likelihood"])
    assert final["test_log_likelihood"] >= final["test_elbo"] - 0.5  # log p(y | x) >= ELBO, up to MC error
    assert main(["evaluate", str(run), "--particles", "30", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["particles"] == 30 and math.isfinite(evaluated["test_log_likelihood"])
    assert main(["sample", str(run), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 100
    # The completion figure of experiments/: inputs, truth and sampled completions.
    script = ROOT / "experiments" / "cvae_quadrants_completions.py"
    spec = importlib.util.spec_from_file_location("cvae_quadrants_completions", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(run), "--out", str(tmp_path / "completions.png"), "--samples", "3", "--count", "4"]) == 0
    assert (tmp_path / "completions.png").stat().st_size > 1000
    capsys.readouterr()  # the paths sample and the script printed
    # The baseline-initialised variant trains from the CLI too (given_quadrants as its baseline's).
    on_baseline = experiment_table(given=1, epochs=2, model={"name": "cvae", "latent_dim": 4, "hidden": [32], "baseline_run": str(baseline)})
    final, _ = _cli_run(tmp_path, capsys, "on_baseline", on_baseline)
    assert final["test_log_likelihood"] >= final["test_elbo"] - 0.5
