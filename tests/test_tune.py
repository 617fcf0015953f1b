"""pyrovae tune: the search space, pruning on each epoch's validation value, and two processes
working on one SQLite study."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_experiment

from pyrovae.config import dump_toml, load_toml, resolve_config
from pyrovae.errors import ConfigError
from pyrovae.tuning import PruningReporter, best_value, load_space

optuna = pytest.importorskip("optuna")

SPACE = """
[train.lr]
type = "float"
low = 1e-3
high = 3e-2
log = true

[model.latent_dim]
type = "int"
low = 2
high = 6

[model.hidden]
type = "choice"
choices = [[16], [16, 8]]
"""


def test_the_space_is_read_and_every_mistake_is_one_line(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    lr, latent, hidden = load_space(path)
    assert (lr.key, lr.kind, lr.low, lr.high, lr.log) == ("train.lr", "float", 1e-3, 3e-2, True)
    assert (latent.kind, latent.low, latent.high) == ("int", 2, 6)
    assert hidden.choices == ([16], [16, 8]) and hidden.override([16, 8]) == "model.hidden=[16, 8]"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        value, size, layers = lr.suggest(trial), latent.suggest(trial), hidden.suggest(trial)
        assert 1e-3 <= value <= 3e-2 and size in range(2, 7) and layers in ([16], [16, 8])
        study.tell(trial, -value)
    wrong = {
        '[a.b]\ntype = "float"\nlow = 1\nhigh = 0': "low = 1 must be below high = 0",
        '[a.b]\ntype = "float"\nlow = 0\nhigh = 1\nlog = true': "a log scale needs low > 0",
        '[a.b]\ntype = "int"\nlow = 0.5\nhigh = 3': "low and high must be integers",
        '[a.b]\ntype = "set"': "type = 'set'",
        '[a.b]\ntype = "choice"\nchoices = []': "choices must be a non-empty list",
        '[a.b]\ntype = "float"\nlow = 0\nhigh = 1\nlow_bound = 2': "unknown key 'low_bound'",
        "[a]\nb = 1": "expected a table",
    }
    for text, message in wrong.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_space(path)


def test_each_epoch_is_reported_and_a_poor_trial_is_pruned_by_the_median():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    reporter = PruningReporter(good, "valid/elbo")
    for epoch, value in enumerate([-50.0, -40.0, -35.0], start=1):
        reporter.epoch(None, {"epoch": epoch, "valid/elbo": value})
    study.tell(good, -35.0)
    assert good.number == 0 and study.trials[0].intermediate_values == {1: -50.0, 2: -40.0, 3: -35.0}
    poor = study.ask()
    reporter = PruningReporter(poor, "valid/elbo")
    reporter.epoch(None, {"epoch": 1, "valid/elbo": -49.0})  # above the median so far: goes on
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 2"):
        reporter.epoch(None, {"epoch": 2, "valid/elbo": -45.0})
    with pytest.raises(ConfigError, match="--metric valid/iwae: the epoch records have no such value"):
        PruningReporter(study.ask(), "valid/iwae").epoch(None, {"epoch": 1, "valid/elbo": -1.0})
    assert best_value([{"valid/elbo": -3.0}, {"valid/elbo": float("nan")}, {"valid/elbo": -2.0}], "valid/elbo", "maximize") == -2.0
    assert best_value([{"h": 0.3}, {"h": 0.2}], "h", "minimize") == 0.2


def test_two_processes_share_one_sqlite_study(tmp_path):
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(dump_toml(tiny_experiment(train={"epochs": 2}, evaluate={"particles": 5})))
    (tmp_path / "space.toml").write_text(SPACE)
    out, storage = tmp_path / "search", f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "pyrovae", "tune", str(experiment), "--space", str(tmp_path / "space.toml"), "--trials", "4"]
    command += ["--out", str(out), "--storage", storage, "--study", "shared", "--no-progress"]
    processes = [subprocess.Popen(command + ["--seed", str(seed)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err

    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) >= 4
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2, "both processes ran trials of the one study"
    for trial in done:
        folder = out / f"trial_{trial.number:04d}"
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        # Every epoch's validation value was reported; the objective is the best of them.
        assert trial.intermediate_values == {r["epoch"]: pytest.approx(r["valid/elbo"]) for r in records}
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == pytest.approx(max(r["valid/elbo"] for r in records))
            assert json.loads((folder / "final.json").read_text())["epochs"] == 2
    best = study.best_trial
    config = resolve_config(load_toml(out / "best.toml"))
    assert config["train"]["lr"] == pytest.approx(best.params["train.lr"])
    assert config["model"]["latent_dim"] == best.params["model.latent_dim"]
    assert json.dumps(config["model"]["hidden"]) == best.params["model.hidden"]
    assert (out / "trials.csv").read_text().count("\n") == len(study.trials) + 1


def test_the_readme_space_is_read_as_written(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("**Search** (`pyrovae tune`") :]
    block = block[block.index("```toml\n") + 8 :]
    (tmp_path / "space.toml").write_text(block[: block.index("```")])
    assert [(p.key, p.kind) for p in load_space(tmp_path / "space.toml")] == [
        ("train.lr", "float"),
        ("model.latent_dim", "int"),
        ("model.hidden", "choice"),
    ]
