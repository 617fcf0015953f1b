"""Fault injection on run folders and checkpoints: concurrent trains, finished and early-stopped
resumes, truncated and malicious checkpoints, foreign folders, moved data, Ctrl-C. Each test checks
that no result is lost and that the message says what to do."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae.cli import main
from pyrovae.errors import CheckpointError, RunFolderError
from pyrovae.experiment import Experiment
from pyrovae.train import LATEST, load_checkpoint, previous_path
from tests.conftest import tiny_experiment
from tests.test_errors import write_idx

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def long_training(run: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pyrovae.cli", "train", str(QUICKSTART), "--out", str(run), "--no-progress",
               "--set", "train.epochs=400", "--set", "evaluate.particles=10"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(run: Path, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < count):
        time.sleep(0.05)
    assert metrics.exists() and len(metrics.read_text().splitlines()) >= count, "the training process made no progress"


def test_a_second_train_on_a_busy_folder_fails_at_once_and_the_first_is_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    first = long_training(run)
    try:
        wait_for_epochs(run, 2)
        started = time.time()
        code = main(["train", str(QUICKSTART), "--out", str(run), "--no-progress", "--set", "train.epochs=2"])
        assert code == 2 and time.time() - started < 30
        assert "in use by another pyrovae process" in capsys.readouterr().err
        code = main(["train", str(QUICKSTART), "--out", str(run), "--no-progress", "--resume"])
        assert code == 2
        wait_for_epochs(run, 4)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    epochs = [record["epoch"] for record in records(run)]
    assert epochs == list(range(1, len(epochs) + 1)), "records of two processes interleaved"
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["train"]["epochs"] == 400, "the second process rewrote the first one's config"


def test_a_finished_run_resumes_to_the_same_result(tmp_path):
    run = tmp_path / "run"
    final = Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(run, progress=False)
    before = records(run)
    again = Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(run, resume=True, progress=False)
    assert records(run) == before
    for key in set(final) - {"train_seconds_this_session"}:
        assert again[key] == final[key], key


def test_a_resume_that_lowers_the_epochs_below_those_trained_is_refused_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 3})).train(run, progress=False)
    files = {path.name: path.read_bytes() for path in (run / "config.toml", run / "metrics.jsonl", run / "final.json")}
    assert main(["train", str(run), "--resume", "--set", "train.epochs=2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "--resume: train.epochs = 2, but" in error and "has already trained 3 epochs; a resume may raise train.epochs, not lower it" in error
    assert {name: (run / name).read_bytes() for name in files} == files


def test_an_early_stopped_run_stays_stopped_on_resume(tmp_path):
    run = tmp_path / "run"
    settings = {"epochs": 60, "patience": 1, "lr": 0.3}
    final = Experiment.from_config(tiny_experiment(train=settings)).train(run, progress=False)
    assert final["stopped_early"] and final["epochs"] < 60
    assert load_checkpoint(run / "checkpoints" / LATEST)["state"]["stopped_early"] is True
    again = Experiment.from_config(tiny_experiment(train=settings)).train(run, resume=True, progress=False)
    assert again["epochs"] == final["epochs"] and again["stopped_early"]
    assert again["test_elbo"] == final["test_elbo"]
    assert len(records(run)) == final["epochs"]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 3})).train(run, progress=False)
    latest = run / "checkpoints" / LATEST
    assert load_checkpoint(previous_path(latest))["state"]["epoch"] == 2
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    final = Experiment.from_config(tiny_experiment(train={"epochs": 4})).train(run, resume=True, progress=False)
    assert "damaged or truncated" in capsys.readouterr().err
    assert final["epochs"] == 4
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4]


def test_a_missing_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(run, progress=False)
    latest = run / "checkpoints" / LATEST
    assert load_checkpoint(previous_path(latest))["state"]["epoch"] == 1
    latest.unlink()  # e.g. deleted by hand
    final = Experiment.from_config(tiny_experiment(train={"epochs": 3})).train(run, resume=True, progress=False)
    assert final["epochs"] == 3 and [r["epoch"] for r in records(run)] == [1, 2, 3]


def test_a_damaged_checkpoint_without_a_previous_one_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(run, progress=False)
    for name in ("best.pt", LATEST):
        (run / "checkpoints" / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="no previous checkpoint .* new --out folder"):
        Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(run, resume=True, progress=False)
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert "best.pt is damaged or truncated" in capsys.readouterr().err


def test_a_run_folder_written_before_the_newest_options_still_evaluates_and_resumes(tmp_path, capsys):
    # Options added later (here train.lr_plateau_*) are absent from an older run's config.toml and
    # from its checkpoints' fingerprints: the run trained as their defaults do, so it must not be
    # refused as "written by another experiment". A value other than the default still is.
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(run, progress=False)
    added = ("lr_plateau_patience", "lr_plateau_factor", "lr_plateau_max_decays")
    config_file = run / "config.toml"
    config_file.write_text("\n".join(line for line in config_file.read_text().splitlines() if not line.startswith(added)) + "\n")
    assert not any(key in tomllib.loads(config_file.read_text())["train"] for key in added)
    for name in ("best.pt", LATEST):
        checkpoint = load_checkpoint(run / "checkpoints" / name)
        for key in added:
            del checkpoint["fingerprint"]["train"][key]
        torch.save(checkpoint, run / "checkpoints" / name)
    assert main(["evaluate", str(run), "--no-progress", "--particles", "5"]) == 0
    final = Experiment.from_config(tiny_experiment(train={"epochs": 2})).train(run, resume=True, progress=False)
    assert final["epochs"] == 2
    checkpoint = load_checkpoint(run / "checkpoints" / LATEST)
    checkpoint["fingerprint"]["train"].pop("lr_plateau_factor")
    checkpoint["fingerprint"]["train"]["lr_plateau_patience"] = 3  # as if trained with another setting
    torch.save(checkpoint, run / "checkpoints" / LATEST)
    with pytest.raises(CheckpointError, match=r"written by another experiment: .*train.lr_plateau_patience \(3 there, 0 here\)"):
        Experiment.from_config(tiny_experiment(train={"epochs": 3})).train(run, resume=True, progress=False)


class Exploit:
    """Unpickling this runs a shell command (what a crafted checkpoint can do with weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(run, progress=False)
    marker = tmp_path / "pwned"
    saved = load_checkpoint(run / "checkpoints" / "best.pt")
    saved["payload"] = Exploit(marker)
    torch.save(saved, run / "checkpoints" / "best.pt")
    assert main(["evaluate", str(run), "--no-progress", "--particles", "5"]) == 2
    error = capsys.readouterr().err
    assert "is refused, not loaded: it holds code" in error and "(it asks for " in error
    assert "weights_only" not in error and "likely succeed" not in error  # torch's advice to load it unsafely
    assert not marker.exists()
    # The unsafe file is not silently replaced by its previous copy either.
    with pytest.raises(CheckpointError, match="is refused, not loaded"):
        Experiment.from_run(run).load_parameters(run, "best")
    assert not marker.exists()


def test_out_into_a_folder_of_the_users_files_is_refused_and_nothing_is_overwritten(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.toml").write_text("my = 'own config'\n")
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="holds files that are not a pyrovae run .*config.toml"):
        Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(folder, progress=False)
    assert (folder / "config.toml").read_text() == "my = 'own config'\n"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["config.toml", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Experiment.from_config(tiny_experiment(train={"epochs": 1})).train(empty, progress=False)["epochs"] == 1


def write_mnist_like(folder: Path, train: int = 60, test: int = 20) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (train, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, train, dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (test, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, test, dtype=np.uint8))


MNIST_LIKE = """
seed = 0
[data]
name = "mnist"
dir = "data/mnist"
validation = 10
[model]
name = "vae"
latent_dim = 2
hidden = [16]
[guide]
name = "diag_normal"
hidden = [16]
[train]
epochs = 1
batch_size = 25
[evaluate]
particles = 5
"""


def test_relative_paths_follow_the_experiment_file_and_moved_data_can_be_pointed_at(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    write_mnist_like(project / "data" / "mnist")
    (project / "exp.toml").write_text(MNIST_LIKE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the experiment's folder
    run = tmp_path / "run"
    assert main(["train", str(project / "exp.toml"), "--out", str(run), "--no-progress"]) == 0
    stored = tomllib.loads((run / "config.toml").read_text())["data"]["dir"]
    assert stored == str(project / "data" / "mnist")

    moved = tmp_path / "moved"
    shutil.move(project / "data" / "mnist", moved)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--no-progress", "--set", f"data.dir={moved}"]) == 0
    assert main(["sample", str(run), "--set", "data.dir=../moved", "--out", str(tmp_path / "grid.png")]) == 0  # relative to the cwd
    assert main(["evaluate", str(run), "--set", "model.latent_dim=3"]) == 2
    assert "would change the trained run" in capsys.readouterr().err
    # A resume at the new place, with a lower learning rate and other clipping (what the non-finite guard advises).
    (project / "exp.toml").write_text(MNIST_LIKE.replace('"data/mnist"', f'"{moved}"'))
    assert main(["train", str(project / "exp.toml"), "--out", str(run), "--no-progress", "--resume",
                 "--set", "train.epochs=2", "--set", "train.lr=1e-4", "--set", "train.clip_norm=5"]) == 0
    assert [r["epoch"] for r in records(run)] == [1, 2] and records(run)[1]["lr"] == 1e-4


def test_evaluate_gives_the_numbers_of_final_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(QUICKSTART), "--out", str(run), "--no-progress", "--set", "train.epochs=2", "--set", "evaluate.particles=20"]) == 0
    final = json.loads((run / "final.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("test_elbo", "test_log_likelihood", "test_kl/z", "test_reconstruction"):
        assert evaluated[key] == final[key], key


def test_ctrl_c_prints_how_to_resume_and_no_traceback(tmp_path):
    run = tmp_path / "run"
    process = long_training(run)
    wait_for_epochs(run, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr and "--resume" in stderr and str(run) in stderr, stderr
    assert load_checkpoint(run / "checkpoints" / LATEST)["state"]["epoch"] >= 2


def test_out_naming_a_file_is_refused_in_one_line(tmp_path, capsys):
    from pyrovae.cli import main

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for out in (target, target / "run"):
        assert main(["train", str(QUICKSTART), "--out", str(out), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"{target} is a file, not a folder" in error[0], error
    assert target.read_text() == "mine"
