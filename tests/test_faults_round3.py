"""Fault injection, third round: a config runs no code it was not declared to run, run-folder files are
written atomically and restored from checkpoints, checkpoints are checked against the run folder, and
each bad input or fault gets one line that names it. Every case here failed (or passed silently) before
the fix it tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyrovae
from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.data.splits import split_rows
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.registry import DATASETS, GUIDES, LIKELIHOODS, MODELS, OBJECTIVES, SCHEDULES
from tests.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


# --- a config names only declared parts --------------------------------------------------------------


@pytest.mark.parametrize(
    "registry, name",
    [
        (DATASETS, "os:system"),
        (MODELS, "os:system"),
        (GUIDES, "builtins:print"),
        (OBJECTIVES, "os:getcwd"),
        (SCHEDULES, "subprocess:run"),
        (LIKELIHOODS, "shutil:rmtree"),
        (MODELS, "torch.nn:Linear"),  # a class, but not a pyrovae.Model
        (GUIDES, "pyrovae.models.vae:GaussianVAE"),  # a model is not a guide
        (DATASETS, "pyrovae.cli:main"),  # pyrovae's own code, but no loader
    ],
)
def test_an_import_path_must_name_a_declared_part_of_its_kind(registry, name):
    with pytest.raises(ConfigError, match=rf"{name!r} is not declared as a pyrovae {registry.kind} .*refused without being called"):
        registry.resolve(name, "[x] name")


def test_declared_parts_and_registered_ones_resolve():
    assert MODELS.resolve("pyrovae.models.vae:GaussianVAE") is MODELS.resolve("vae")
    assert DATASETS.resolve("pyrovae.data.semisupervised:digits").__pyrovae_kind__ == "data set"
    assert DATASETS.resolve("tests.fault_loaders:bad_row").__name__ == "bad_row"
    assert OBJECTIVES.resolve("tests.test_distributed:MeanELBO").__name__ == "MeanELBO"
    with pytest.raises(ValueError, match="unknown part kind 'loader'"):
        pyrovae.declare("loader")


def test_a_run_folder_naming_os_system_runs_nothing(tmp_path, capsys):
    """The issue's case: a crafted config.toml in a run folder names os:system with a command."""
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "experiments" / "quickstart.toml"), "--out", str(run), "--no-progress", "--set", "train.epochs=1"]) == 0
    marker = tmp_path / "pwned"
    text = (run / "config.toml").read_text()
    head, _, rest = text.partition("[data]\n")
    rest = rest.split("\n[", 1)[1]
    (run / "config.toml").write_text(f'{head}[data]\nname = "os:system"\ncommand = "touch {marker}"\n\n[{rest}')
    capsys.readouterr()
    for command in (["evaluate", str(run)], ["sample", str(run)], ["analyze", str(run)], ["train", str(tmp_path / "exp.toml")]):
        if command[0] == "train":
            (tmp_path / "exp.toml").write_text((run / "config.toml").read_text())
        assert main([*command, "--no-progress"] if command[0] in ("evaluate", "analyze", "train") else command) == 2
        error = capsys.readouterr().err
        assert "'os:system' is not declared as a pyrovae data set" in error and "Traceback" not in error
        assert not marker.exists(), f"{command[0]} ran the command"


# --- split sizes name their key and refuse the ambiguous ---------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"validation": 1.0}, ConfigError, r"data.validation = 1.0 is ambiguous: .*\(data.validation = 1\)"),
        ({"validation": -0.1}, ConfigError, r"data.validation = -0.1 is not allowed: give a fraction in \(0, 1\)"),
        ({"validation": 1.5}, ConfigError, r"data.validation = 1.5 is not allowed"),
        ({"test": 1.5}, ConfigError, r"data.test = 1.5 is not allowed"),
        ({"test": 1.0}, ConfigError, r"data.test = 1.0 is ambiguous"),
        ({"test": 0}, (ConfigError, DataError), r"data.test = 0.0 holds out no rows"),
        ({"validation": 5000}, (ConfigError, DataError), r"data.validation = 5000 holds out 5000 of the 1438 rows and leaves none for training"),
        ({"validation": "10%"}, ConfigError, r"validation"),
    ],
)
def test_split_sizes_name_the_right_key_and_reason(change, error, message):
    with pytest.raises(error, match=message):
        Experiment.from_config(tiny_experiment(data={"name": "digits", **change}))


def test_split_rows_reads_fractions_and_counts():
    assert split_rows(0.1, 1000, "validation") == 100
    assert split_rows(7, 1000, "validation") == 7
    assert split_rows(0, 1000, "validation") == 0
